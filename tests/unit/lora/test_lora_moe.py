"""LoRA on an MoE model: attention, shared experts and dense MLPs get adapters; the routed experts'
stacked weights do not, and the run says so instead of leaving it to be discovered."""

import logging

from meshtron.config.job import LoRAConfig
from meshtron.lora.layers import LoRALinear
from meshtron.models.registry import build_model, get_flavor
from meshtron.train.converters import LoRAConverter


def test_routed_experts_are_named_as_not_adapted(caplog):
    model = build_model(get_flavor("qwen2_moe:debug"), device="meta")  # routed experts and a shared expert
    with caplog.at_level(logging.WARNING, logger="meshtron.train.converters"):
        LoRAConverter(LoRAConfig(rank=4, targets=["all-linear"])).convert(model)
    adapted = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert any(".shared_expert." in name for name in adapted) and any(".q_proj" in name for name in adapted)
    assert not any(".experts." in name for name in adapted)
    moe_layers = sum(hasattr(layer.mlp, "experts") for layer in model.layers.values())  # the debug flavor mixes in a dense one
    assert moe_layers == 1 and "stacked expert weights of 1 MoE layers stay frozen" in caplog.text


def test_a_dense_model_gets_no_such_warning(caplog):
    model = build_model(get_flavor("llama:debug"), device="meta")
    with caplog.at_level(logging.WARNING, logger="meshtron.train.converters"):
        LoRAConverter(LoRAConfig(rank=4, targets=["all-linear"])).convert(model)
    assert "routed experts" not in caplog.text
