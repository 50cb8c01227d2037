"""SmolLM3: the dense decoder, with some layers (`no_rope_layers`, every fourth in the published
models) attending without rotary positions."""

from torch import nn

from meshtron.models.common.transformer import Transformer, TransformerBlock
from meshtron.models.smollm3.args import SmolLM3Args


class SmolLM3(Transformer):
    def make_block(self, args: SmolLM3Args, layer_id: int) -> nn.Module:
        return TransformerBlock(args, layer_id, rotary=None if layer_id in args.no_rope_layers else "half")
