"""What the registry knows about a model family (torchtitan's TrainSpec is the model studied).

A family is a folder: its flavors (args.py) and its entry here, which names the model builder
(composed from `models/common/` parts), the translation of a transformers config, the
state-dict adapter and the parallelize plan. Adding a family touches its folder and one line of
the registry.
"""

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from meshtron.models.common.adapter import StateDictAdapter
from meshtron.models.common.args import ModelArgs
from meshtron.models.common.hf_dense import dense_adapter
from meshtron.models.common.parallelize import DENSE_PLAN
from meshtron.models.common.transformer import Transformer
from meshtron.parallel.plan import ParallelPlan


@dataclass(frozen=True)
class FamilySpec:
    name: str
    hf_model_types: tuple[str, ...]
    flavors: dict[str, ModelArgs]
    args_from_hf: Callable[..., ModelArgs]  # transformers config -> ModelArgs
    hf_config_from_args: Callable[[ModelArgs], object]  # ModelArgs -> transformers config
    build: Callable[[ModelArgs], nn.Module] = Transformer
    adapter: Callable[[ModelArgs], StateDictAdapter] = dense_adapter  # HF tensors <-> ours, by groups
    plan: ParallelPlan = DENSE_PLAN
    args_cls: type[ModelArgs] = ModelArgs
