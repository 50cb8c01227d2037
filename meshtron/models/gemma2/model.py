"""Gemma 2, composed from the common parts.

Differences from the dense decoder: embeddings scaled by sqrt(dim); RMSNorm with (1 + w);
"sandwich" norms (a norm before and after both attention and the MLP); GeGLU MLP; attention
scores scaled by query_pre_attn_scalar^-1/2 and soft-capped with tanh; a sliding window on
every other layer; final logits soft-capped.
"""

import torch
from torch import nn

from meshtron.models.common.attention import Attention, residual_std
from meshtron.models.common.layers import GatedMLP, OffsetRMSNorm
from meshtron.models.common.transformer import Transformer
from meshtron.models.gemma2.args import Gemma2Args


class ScaledEmbedding(nn.Embedding):
    """An embedding whose output is multiplied by sqrt(dim), rounded to the weight's dtype as Gemma does."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A Python number (not a tensor) so that it also scales a tensor-parallel (DTensor) output.
        return super().forward(tokens) * torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype).item()


class SoftcappedHead(nn.Linear):
    """The output head with its logits capped at +-softcap by tanh. Not a plain nn.Linear, so the
    chunked loss (meshtron.train.losses) runs this forward instead of reading the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, softcap: float):
        super().__init__(in_features, out_features, bias=bias)
        self.softcap = softcap

    def forward(self, h_BSE: torch.Tensor) -> torch.Tensor:
        return self.softcap * torch.tanh(super().forward(h_BSE) / self.softcap)


class Gemma2Block(nn.Module):
    def __init__(self, args: Gemma2Args, layer_id: int):
        super().__init__()
        self.attn_norm = OffsetRMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id, scale=args.query_pre_attn_scalar**-0.5, softcap=args.attn_softcap)
        self.post_attn_norm = OffsetRMSNorm(args.dim, args.norm_eps)
        self.mlp_norm = OffsetRMSNorm(args.dim, args.norm_eps)
        self.mlp = GatedMLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std, out_std=residual_std(args),
                            activation=args.activation)
        self.post_mlp_norm = OffsetRMSNorm(args.dim, args.norm_eps)

    def forward(self, x_BSE, cos, sin, mask, cache=None):
        h = x_BSE + self.post_attn_norm(self.attn(self.attn_norm(x_BSE), cos, sin, mask, cache))
        return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))


class Gemma2(Transformer):
    def make_embedding(self, args: Gemma2Args) -> nn.Module:
        return ScaledEmbedding(args.vocab_size, args.dim)

    def make_block(self, args: Gemma2Args, layer_id: int) -> nn.Module:
        return Gemma2Block(args, layer_id)

    def make_norm(self, args: Gemma2Args) -> nn.Module:
        return OffsetRMSNorm(args.dim, args.norm_eps)

    def make_head(self, args: Gemma2Args) -> nn.Module:
        if args.final_softcap is None or args.num_labels:
            return super().make_head(args)
        return SoftcappedHead(args.dim, args.vocab_size, bias=False, softcap=args.final_softcap)
