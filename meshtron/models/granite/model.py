"""Granite, composed from the common parts: the dense decoder with four scalar multipliers
(muP-style): the embedding output times `embedding_multiplier`, each attention and MLP output
times `residual_multiplier` before it joins the residual stream, attention scores scaled by
`attention_multiplier` instead of 1/sqrt(head_dim), and the logits divided by `logits_scaling`.
"""

import torch
from torch import nn

from meshtron.models.common.attention import Attention, residual_std
from meshtron.models.common.layers import GatedMLP, RMSNorm
from meshtron.models.common.transformer import Transformer
from meshtron.models.granite.args import GraniteArgs


class MultipliedEmbedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, multiplier: float):
        super().__init__(num_embeddings, embedding_dim)
        self.multiplier = multiplier

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens) * self.multiplier


class ScaledLogitsHead(nn.Linear):
    """The output head with its logits divided by `logits_scaling`. Not a plain nn.Linear, so the chunked
    loss (meshtron.train.losses) runs this forward instead of reading the weight."""

    def __init__(self, in_features: int, out_features: int, logits_scaling: float):
        super().__init__(in_features, out_features, bias=False)
        self.logits_scaling = logits_scaling

    def forward(self, h_BSE: torch.Tensor) -> torch.Tensor:
        return super().forward(h_BSE) / self.logits_scaling


class GraniteBlock(nn.Module):
    def __init__(self, args: GraniteArgs, layer_id: int):
        super().__init__()
        self.residual_multiplier = args.residual_multiplier
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id, scale=args.attention_multiplier)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = GatedMLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std, out_std=residual_std(args))

    def forward(self, x_BSE, cos, sin, mask, cache=None):
        h = x_BSE + self.attn(self.attn_norm(x_BSE), cos, sin, mask, cache) * self.residual_multiplier
        return h + self.mlp(self.mlp_norm(h)) * self.residual_multiplier


class Granite(Transformer):
    def make_embedding(self, args: GraniteArgs) -> nn.Module:
        return MultipliedEmbedding(args.vocab_size, args.dim, args.embedding_multiplier)

    def make_block(self, args: GraniteArgs, layer_id: int) -> nn.Module:
        return GraniteBlock(args, layer_id)

    def make_head(self, args: GraniteArgs) -> nn.Module:
        if args.num_labels:  # a score head reads the hidden states as they are (transformers' score layer)
            return super().make_head(args)
        return ScaledLogitsHead(args.dim, args.vocab_size, args.logits_scaling)
