"""Activation recompute: selective (the plan's `recompute_unit` of each block, by default the
attention core, whose score matrix is the largest activation) or full (whole blocks), on the
first `num_layers` blocks.

Uses the composable `checkpoint`, which keeps parameter names unchanged (no wrapper module), so
state dicts and Hugging Face key maps are the same with and without recompute.
"""

from torch import nn
from torch.distributed._composable import checkpoint

from meshtron.parallel.plan import ParallelPlan


def apply_recompute(model: nn.Module, plan: ParallelPlan, mode: str, num_layers: int = 0) -> None:
    """mode: none | selective | full; num_layers: how many blocks from the first (0: all)."""
    if mode == "none":
        return
    blocks = plan.blocks_of(model)
    for block in blocks[: num_layers or len(blocks)]:
        checkpoint(block.get_submodule(plan.recompute_unit) if mode == "selective" else block)
