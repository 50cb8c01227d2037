"""Gemma 3 (text), composed from the common parts: Gemma 2 (scaled embedding, (1 + w) sandwich norms,
GeGLU, scores scaled by query_pre_attn_scalar^-1/2) with per-head (1 + w) q/k norms, soft-caps off by
default, five sliding-window layers to one full in the published models, and per-layer-type RoPE:
the sliding ("local") layers rotate with `rope_local_theta` and no scaling, the full ("global")
layers with `rope_theta` and `rope_scaling`.
"""

from dataclasses import replace

import torch
from torch import nn

from meshtron.models.common.layers import OffsetRMSNorm
from meshtron.models.common.rope import RotaryPerLayerType
from meshtron.models.common.transformer import SandwichBlock
from meshtron.models.gemma2.model import Gemma2
from meshtron.models.gemma3.args import Gemma3Args


class Gemma3Block(SandwichBlock):
    """A Gemma sandwich block that picks its kind's RoPE table ("sliding" or "full")."""

    def __init__(self, args: Gemma3Args, layer_id: int):
        super().__init__(args, layer_id, norm=OffsetRMSNorm, activation=args.activation,
                         scale=args.query_pre_attn_scalar**-0.5, softcap=args.attn_softcap, qk_norm=OffsetRMSNorm)
        self.rope_kind = "sliding" if args.layer_uses_window(layer_id) else "full"

    def forward(self, x_BSE: torch.Tensor, cos: dict, sin: dict, mask, cache=None) -> torch.Tensor:
        return super().forward(x_BSE, cos[self.rope_kind], sin[self.rope_kind], mask, cache)


class Gemma3(Gemma2):
    def make_rope(self, args: Gemma3Args) -> nn.Module:
        local = replace(args, rope_theta=args.rope_local_theta, rope_scaling=None)
        return RotaryPerLayerType({"full": args, "sliding": local})

    def make_block(self, args: Gemma3Args, layer_id: int) -> nn.Module:
        return Gemma3Block(args, layer_id)
