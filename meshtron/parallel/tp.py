"""Tensor (and sequence) parallel applied with DTensor from a family's plan (`ParallelPlan`, data:
module name -> ParallelStyle; the dense plan is in models/common/parallelize.py), and the
parallel styles of our own that plans use.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from meshtron.lora.parallel import parallelize_with_adapters
from meshtron.parallel.plan import ParallelPlan


class ReplicatedHead(ParallelStyle):
    """The head's weight replicated over the TP ranks; its input (the stream, `input_layout`)
    gathered; its output a replicated DTensor."""

    def __init__(self, input_layout):
        super().__init__()
        self.input_layout = input_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def gather_input(mod, inputs, mesh):
            x = inputs[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
            return (x.redistribute(mesh, (Replicate(),)), *inputs[1:])

        return distribute_module(module, device_mesh, input_fn=gather_input)


def apply_tp(model: nn.Module, plan: ParallelPlan, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (on the meta device) over `tp_mesh` in place."""
    # A pipeline stage lacks the embedding (all but the first) or the norm and head (all but the last).
    outer = {name: style for name, style in plan.tp_model(model.args, sequence_parallel).items()
             if getattr(model, name) is not None}
    parallelize_module(model, tp_mesh, outer)
    for block, block_plan in plan.block_plans(model, sequence_parallel):
        # Same as parallelize_module, and places LoRA adapters (if any) to match their base layers.
        parallelize_with_adapters(block, tp_mesh, block_plan)
    # parallelize_module gave lm_head a new (sharded) weight; tie it back to the embedding's, which
    # has the same Shard(0) layout.
    model.tie_weights()
