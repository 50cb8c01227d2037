"""Model families by name and by Hugging Face `model_type`, named flavors, and model construction."""

import torch
from torch import nn

from meshtron.errors import UserError
from meshtron.models import (deepseek_v2, deepseek_v3, gemma2, gemma3, glm4, granite, internlm3, llama, mistral,
                             mixtral, olmo2, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, smollm3, starcoder2)
from meshtron.models.common.args import ModelArgs
from meshtron.models.spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec for spec in (llama.SPEC, mistral.SPEC, qwen2.SPEC, qwen3.SPEC, gemma2.SPEC, phi3.SPEC,
                                 gemma3.SPEC, glm4.SPEC, smollm3.SPEC, olmo2.SPEC, granite.SPEC, starcoder2.SPEC,
                                 internlm3.SPEC, mixtral.SPEC, qwen2_moe.SPEC, qwen3_moe.SPEC,
                                 deepseek_v2.SPEC, deepseek_v3.SPEC)
}
_BY_MODEL_TYPE = {t: spec for spec in FAMILIES.values() for t in spec.hf_model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for_model_type(model_type: str | None) -> FamilySpec:
    if model_type not in _BY_MODEL_TYPE:
        raise UserError(
            f"unsupported model_type {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[model_type]


def get_family(name: str) -> FamilySpec:
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def flavor_names() -> list[str]:
    return [f"{family}:{flavor}" for family, spec in FAMILIES.items() for flavor in spec.flavors]


def get_flavor(name: str) -> ModelArgs:
    """'llama:debug' -> ModelArgs (a fresh copy)."""
    family, _, flavor = name.partition(":")
    spec = get_family(family)
    if flavor not in spec.flavors:
        raise UserError(f"unknown flavor {name!r}; {family} flavors: {', '.join(spec.flavors)}")
    return spec.args_cls.from_dict(spec.flavors[flavor].to_dict())


def model_args_from_dict(d: dict, where: str) -> ModelArgs:
    """The args a manifest (or any `to_dict` output) describes, in its family's args class; strict:
    a field the family does not know is a user error naming it and `where` it came from."""
    spec = get_family(d.get("family", ModelArgs.family))
    try:
        return spec.args_cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from None


def build_model(args: ModelArgs, device: str | torch.device = "meta") -> nn.Module:
    """Construct a model for `args` on `device` (meta by default: no memory is allocated)."""
    with torch.device(device):
        return get_family(args.family).build(args)
