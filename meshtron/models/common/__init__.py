"""Building blocks shared by the model families."""

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.transformer import Transformer

__all__ = ["ModelArgs", "Transformer"]
