"""Each module initializes its own parameters: every tensor written, finite, seeded by name, equal
at every pipeline cut, and never over a tensor that was loaded."""

import itertools

import pytest
import torch
from torch import nn

from meshtron.config.job import LoRAConfig
from meshtron.lora.layers import apply_lora
from meshtron.models.registry import FAMILIES, build_model, get_flavor
from meshtron.parallel.pipeline import prune_to_stage


def _materialized(args, stage=None):
    """Built on meta (one pipeline stage, with `stage` = (layers, first, last)), with LoRA adapters,
    materialized over memory that holds NaN."""
    model = build_model(args, device="meta")
    if stage is not None:
        layers, first, last = stage
        prune_to_stage(model, layers, first=first, last=last)
    apply_lora(model, LoRAConfig(rank=4, targets=["all-linear"]))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # what to_empty may leave
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_every_tensor_is_written_with_the_seeded_values_at_every_pipeline_cut(family, tied):
    args = get_flavor(f"{family}:debug")
    args.tie_embeddings = tied
    whole = _materialized(args)
    whole.init_weights(seed=11)
    reference = dict(whole.named_parameters(remove_duplicate=False))
    for name, p in reference.items():
        assert torch.isfinite(p).all(), name
    assert not torch.equal(reference["layers.0.attn.o_proj.weight"], reference["layers.1.attn.o_proj.weight"])
    for cut in [((0,), True, False), ((1,), False, True)]:
        stage = _materialized(args, stage=cut)
        stage.init_weights(seed=11)
        for name, p in stage.named_parameters(remove_duplicate=False):
            # A tied head held by the last stage alone equals the first stage's embedding.
            expected = reference["embed.weight" if name == "lm_head.weight" and tied else name]
            assert torch.equal(p, expected), name


def test_a_parameter_without_an_initializer_is_refused():
    args = get_flavor("llama:debug")
    model = build_model(args, device="meta")
    model.layers["0"].extra = nn.Parameter(torch.empty(3, device="meta"))  # a new kind, owned by no init_weights
    model.to_empty(device="cpu")
    with pytest.raises(AssertionError, match="layers.0.extra"):
        model.init_weights(seed=0)


def test_skipped_tensors_keep_their_loaded_values():
    args = get_flavor("qwen3:debug")
    model = build_model(args, device="meta")
    model.to_empty(device="cpu")
    loaded = torch.full_like(model.layers["1"].mlp.up_proj.weight, 0.5)
    with torch.no_grad():
        model.layers["1"].mlp.up_proj.weight.copy_(loaded)
    model.init_weights(seed=3, skip=frozenset({"layers.1.mlp.up_proj.weight"}))
    assert torch.equal(model.layers["1"].mlp.up_proj.weight, loaded)
    fresh = build_model(args, device="meta")
    fresh.to_empty(device="cpu")
    fresh.init_weights(seed=3)
    assert torch.equal(model.layers["1"].mlp.gate_proj.weight, fresh.layers["1"].mlp.gate_proj.weight)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_no_two_random_tensors_get_the_same_values(family):
    """Seeded by the tensor's name, not its module's: a module's same-shaped tensors (stacked experts'
    gate and up projections) differ."""
    model = _materialized(get_flavor(f"{family}:debug"))
    model.init_weights(seed=0)
    drawn = [(n, p) for n, p in model.named_parameters() if p.std() > 0]  # not a constant (norms, zero B)
    for (a, p), (b, q) in itertools.combinations(drawn, 2):
        assert p.shape != q.shape or not torch.equal(p, q), (a, b)
