"""What `parallel/` needs to know about a model family: its parallelize plan, as data.

Each family names one `ParallelPlan` in its registry entry; tp.py, recompute.py and fsdp.py apply
whatever plan they are given, so a new family changes its plan, not the code that applies it.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle

TPPlan = Callable[[object, bool], dict[str, ParallelStyle]]  # (ModelArgs, sequence_parallel) -> plan


@dataclass(frozen=True)
class ParallelPlan:
    # Tensor (+ sequence) parallel styles of the modules outside the blocks, by name; a module a
    # pipeline stage lacks is left out when applying.
    tp_model: TPPlan
    # The same for one block, names relative to the block.
    tp_block: TPPlan
    # The same for a block with an MoE feed-forward (where `args.is_moe_layer`); None: the family has none.
    tp_moe_block: TPPlan | None = None
    # The submodule of an MoE block holding its stacked experts (what expert parallel splits); None: no MoE.
    experts: str | None = None
    # The submodule of a block that selective recompute wraps (the largest activation: the scores).
    recompute_unit: str = "attn.core"
    # The container of the blocks. Each block gets the block plan, is a unit of full recompute and
    # one FSDP unit.
    blocks: str = "layers"
    # The embedding, and the final norm with the head: FSDP units of their own, unless the head is tied
    # to the embedding (then both stay in the root unit, with whatever else the model holds).
    embedding: str = "embed"
    head: tuple[str, ...] = ("norm", "lm_head")

    def blocks_of(self, model: nn.Module) -> list[nn.Module]:
        return list(getattr(model, self.blocks).values())

    def experts_of(self, model: nn.Module) -> list[nn.Module]:
        """The experts modules of the MoE blocks the model holds."""
        if self.experts is None:
            return []
        return [block.get_submodule(self.experts) for layer_id, block in getattr(model, self.blocks).items()
                if model.args.is_moe_layer(int(layer_id))]

    def block_plans(self, model: nn.Module, sequence_parallel: bool):
        """(block, its tensor-parallel plan) for every block the model holds."""
        dense = self.tp_block(model.args, sequence_parallel)
        moe = self.tp_moe_block(model.args, sequence_parallel) if self.tp_moe_block else None
        for layer_id, block in getattr(model, self.blocks).items():
            yield block, moe if moe is not None and model.args.is_moe_layer(int(layer_id)) else dense
