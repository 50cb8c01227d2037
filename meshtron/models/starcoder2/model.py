"""StarCoder2, composed from the common parts.

Differences from the dense decoder: LayerNorm with bias in place of RMSNorm (before attention,
before the MLP and at the end); a plain two-layer GELU (tanh) MLP (c_fc / c_proj in its checkpoints,
`up_proj` / `down_proj` here) instead of SwiGLU; biases on q/k/v/o and the MLP; a sliding window on
every layer.
"""

from torch import nn

from meshtron.models.common.attention import Attention, residual_std
from meshtron.models.common.layers import MLP, LayerNorm
from meshtron.models.common.transformer import Transformer
from meshtron.models.starcoder2.args import Starcoder2Args


class Starcoder2Block(nn.Module):
    def __init__(self, args: Starcoder2Args, layer_id: int):
        super().__init__()
        self.attn_norm = LayerNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id)
        self.mlp_norm = LayerNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std, out_std=residual_std(args))

    def forward(self, x_BSE, cos, sin, mask, cache=None):
        h = x_BSE + self.attn(self.attn_norm(x_BSE), cos, sin, mask, cache)
        return h + self.mlp(self.mlp_norm(h))


class Starcoder2(Transformer):
    def make_block(self, args: Starcoder2Args, layer_id: int) -> nn.Module:
        return Starcoder2Block(args, layer_id)

    def make_norm(self, args: Starcoder2Args) -> nn.Module:
        return LayerNorm(args.dim, args.norm_eps)
