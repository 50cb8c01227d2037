"""GLM-4 (0414), composed from the common parts: the dense decoder with sandwich norms (plain RMSNorm
before and after both attention and the MLP), bias on q/k/v, and RoPE on the first half of each head
with adjacent dims paired ("interleaved", as GLM's checkpoints expect, so q/k weights and PEFT
adapters need no permutation)."""

from torch import nn

from meshtron.models.common.transformer import SandwichBlock, Transformer
from meshtron.models.glm4.args import Glm4Args


class Glm4(Transformer):
    def make_block(self, args: Glm4Args, layer_id: int) -> nn.Module:
        return SandwichBlock(args, layer_id, rotary="interleaved")
