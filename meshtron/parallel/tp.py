"""Tensor (and sequence) parallel plans for the dense decoder, as data, applied with DTensor.

Attention heads and MLP columns are split Megatron-style: q/k/v and gate/up column-wise,
o/down row-wise. The embedding is split over the vocabulary (row-wise) and the output head
over the vocabulary too (column-wise), and its logits stay sharded so that the loss is
computed under `loss_parallel` without gathering a (B, S, V) tensor. A classification head
(`num_labels`, e.g. a reward model's one-output score) has too few rows to split: it is
replicated on every rank and reads the gathered stream.

With sequence parallel the residual stream between blocks is a DTensor sharded on the
sequence dimension (dim 1): norms run on a slice of the tokens, and the row-wise projections
reduce-scatter instead of all-reduce. The stream is kept as a DTensor (not a local tensor) so
that the model still sees the global sequence length when it builds positions and masks.
Without sequence parallel the stream is an ordinary replicated tensor and norms are untouched.
"""

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from meshtron.lora.parallel import parallelize_with_adapters

# Attention takes (x, cos, sin, masks, cache); only x is distributed.
_ATTN_EXTRA_INPUTS = (None, None, None, None)


def model_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan for the modules outside the blocks."""
    stream = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=not sequence_parallel),
        "lm_head": ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    return plan


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


def block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The plan for one transformer block (names relative to the block)."""
    if not sequence_parallel:
        return {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
    return {
        "attn_norm": SequenceParallel(),
        # Gather the sequence before attention; the projections then see local (full-sequence) tensors.
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1), *_ATTN_EXTRA_INPUTS),
            desired_input_layouts=(Replicate(), *_ATTN_EXTRA_INPUTS),
            use_local_output=True,
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard `model` (on the meta device) over `tp_mesh` in place."""
    # A pipeline stage lacks the embedding (all but the first) or the norm and head (all but the last).
    plan = {name: style for name, style in model_plan(sequence_parallel).items() if getattr(model, name) is not None}
    if "lm_head" in plan and model.args.num_labels:
        plan["lm_head"] = ReplicatedHead(Shard(1) if sequence_parallel else Replicate())
    parallelize_module(model, tp_mesh, plan)
    layer_plan = block_plan(sequence_parallel)
    for block in model.layers.values():
        # Same as parallelize_module, and places LoRA adapters (if any) to match their base layers.
        parallelize_with_adapters(block, tp_mesh, layer_plan)
    # parallelize_module gave lm_head a new (sharded) weight; tie it back to the embedding's, which
    # has the same Shard(0) layout.
    model.tie_weights()
