"""Gemma 2, composed from the common parts.

Differences from the dense decoder: embeddings scaled by sqrt(dim); RMSNorm with (1 + w);
"sandwich" norms (a norm before and after both attention and the MLP); GeGLU MLP; attention
scores scaled by query_pre_attn_scalar^-1/2 and soft-capped with tanh; a sliding window on
every other layer; final logits soft-capped.
"""

from torch import nn

from meshtron.models.common.layers import OffsetRMSNorm, ScaledEmbedding, SoftcappedHead
from meshtron.models.common.transformer import SandwichBlock, Transformer
from meshtron.models.gemma2.args import Gemma2Args


class Gemma2(Transformer):
    def make_embedding(self, args: Gemma2Args) -> nn.Module:
        return ScaledEmbedding(args.vocab_size, args.dim)

    def make_block(self, args: Gemma2Args, layer_id: int) -> nn.Module:
        return SandwichBlock(args, layer_id, norm=OffsetRMSNorm, activation=args.activation,
                             scale=args.query_pre_attn_scalar**-0.5, softcap=args.attn_softcap)

    def make_norm(self, args: Gemma2Args) -> nn.Module:
        return OffsetRMSNorm(args.dim, args.norm_eps)

    def make_head(self, args: Gemma2Args) -> nn.Module:
        if args.final_softcap is None or args.num_labels:
            return super().make_head(args)
        return SoftcappedHead(args.dim, args.vocab_size, bias=False, softcap=args.final_softcap)
