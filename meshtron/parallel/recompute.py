"""Activation recompute: selective (the attention core, whose score matrix is the largest
activation) or full (whole blocks), on the first `num_layers` blocks.

Uses the composable `checkpoint`, which keeps parameter names unchanged (no wrapper module), so
state dicts and Hugging Face key maps are the same with and without recompute.
"""

from torch import nn
from torch.distributed._composable import checkpoint


def apply_recompute(model: nn.Module, mode: str, num_layers: int = 0) -> None:
    """mode: none | selective | full; num_layers: how many blocks from the first (0: all)."""
    if mode == "none":
        return
    blocks = list(model.layers.values())
    for block in blocks[: num_layers or len(blocks)]:
        checkpoint(block.attn.core if mode == "selective" else block)
