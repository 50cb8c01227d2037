"""OLMo 2, composed from the common parts.

Differences from the dense decoder: post-norm blocks (no norm before attention or the MLP; a norm
on each one's output before it joins the residual stream), and RMSNorm on q and k over the whole
projection (all heads together, before the split into heads), not per head. Its RMSNorms apply
the weight in float32 before the cast back.
"""

import torch
from torch import nn

from meshtron.models.common.attention import Attention, residual_std
from meshtron.models.common.layers import GatedMLP, RMSNorm
from meshtron.models.common.transformer import Transformer
from meshtron.models.olmo2.args import Olmo2Args


class Olmo2RMSNorm(RMSNorm):
    """RMSNorm with the weight applied in float32, then cast back (transformers' Olmo2RMSNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * normed).to(x.dtype)


class Olmo2Attention(Attention):
    def __init__(self, args: Olmo2Args, layer_id: int):
        super().__init__(args, layer_id)
        self.q_norm = Olmo2RMSNorm(args.num_heads * args.head_dim, args.norm_eps)
        self.k_norm = Olmo2RMSNorm(args.num_kv_heads * args.head_dim, args.norm_eps)

    def project(self, x_BSE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x_BSE.shape
        q = self.q_norm(self.q_proj(x_BSE)).view(B, S, -1, self.head_dim)
        k = self.k_norm(self.k_proj(x_BSE)).view(B, S, -1, self.head_dim)
        return q, k, self.v_proj(x_BSE).view(B, S, -1, self.head_dim)


class Olmo2Block(nn.Module):
    def __init__(self, args: Olmo2Args, layer_id: int):
        super().__init__()
        self.attn = Olmo2Attention(args, layer_id)
        self.post_attn_norm = Olmo2RMSNorm(args.dim, args.norm_eps)
        self.mlp = GatedMLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std, out_std=residual_std(args))
        self.post_mlp_norm = Olmo2RMSNorm(args.dim, args.norm_eps)

    def forward(self, x_BSE, cos, sin, mask, cache=None):
        h = x_BSE + self.post_attn_norm(self.attn(x_BSE, cos, sin, mask, cache))
        return h + self.post_mlp_norm(self.mlp(h))


class Olmo2(Transformer):
    def make_block(self, args: Olmo2Args, layer_id: int) -> nn.Module:
        return Olmo2Block(args, layer_id)

    def make_norm(self, args: Olmo2Args) -> nn.Module:
        return Olmo2RMSNorm(args.dim, args.norm_eps)
