"""What the registry knows about a model family."""

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from meshtron.models.common import hf_dense
from meshtron.models.common.args import ModelArgs
from meshtron.models.common.transformer import Transformer


@dataclass(frozen=True)
class FamilySpec:
    name: str
    hf_model_types: tuple[str, ...]
    flavors: dict[str, ModelArgs]
    args_from_hf: Callable[..., ModelArgs]  # transformers config -> ModelArgs
    hf_config_from_args: Callable[[ModelArgs], object]  # ModelArgs -> transformers config
    build: Callable[[ModelArgs], nn.Module] = Transformer
    to_hf_key: Callable[[str], str] = field(default=hf_dense.to_hf_key)
    from_hf_key: Callable[[str], str] = field(default=hf_dense.from_hf_key)
