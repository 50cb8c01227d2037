"""The DeepSeek decoder: pre-norm blocks of multi-head latent attention, the first layers with a dense
MLP and the others with an MoE layer (routed experts plus an ungated shared expert)."""

from torch import nn

from meshtron.models.common.attention import residual_std
from meshtron.models.common.mla import LatentAttention
from meshtron.models.common.moe import MoE, MoETransformer
from meshtron.models.common.transformer import TransformerBlock
from meshtron.models.deepseek_v3.args import DeepSeekArgs


class DeepSeekTransformer(MoETransformer):
    def make_block(self, args: DeepSeekArgs, layer_id: int) -> nn.Module:
        mlp = MoE(args, out_std=residual_std(args)) if args.is_moe_layer(layer_id) else None
        return TransformerBlock(args, layer_id, mlp=mlp, attn=LatentAttention(args, layer_id))
