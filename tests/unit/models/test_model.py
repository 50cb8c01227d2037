"""Model construction, flavors, initialization, masks and positions."""

import pytest
import torch

from meshtron.errors import UserError
from meshtron.models.common.masks import build_attention_mask
from meshtron.models.common.transformer import positions_from_documents
from meshtron.models.registry import FAMILIES, build_model, family_for_model_type, flavor_names, get_flavor


def test_every_flavor_builds_on_meta_with_the_predicted_parameter_count():
    for name in flavor_names():
        args = get_flavor(name)
        model = build_model(args, device="meta")
        assert all(p.is_meta for p in model.parameters())
        counted = sum(p.numel() for p in model.parameters())  # tied weights are counted once
        assert counted == args.num_params(), name


def test_published_sizes_are_registered():
    names = set(flavor_names())
    for expected in ["llama:llama2-7b", "llama:llama3-70b", "llama:llama3.2-1b", "llama:llama3.2-3b",
                     "qwen2:qwen2.5-0.5b", "qwen2:qwen2.5-72b", "qwen3:qwen3-0.6b", "qwen3:qwen3-32b",
                     "mistral:mistral-7b-v0.1"]:
        assert expected in names
    # Known totals (billions): Llama-3-8B 8.03, Qwen2.5-7B 7.62, Qwen3-8B 8.19, Llama-3.2-1B 1.24.
    assert round(get_flavor("llama:llama3-8b").num_params() / 1e9, 2) == 8.03
    assert round(get_flavor("qwen2:qwen2.5-7b").num_params() / 1e9, 2) == 7.62
    assert round(get_flavor("qwen3:qwen3-8b").num_params() / 1e9, 2) == 8.19
    assert round(get_flavor("llama:llama3.2-1b").num_params() / 1e9, 2) == 1.24
    # Gemma-2 2B / 9B / 27B 2.61 / 9.24 / 27.23; Phi-3-mini 3.82, Phi-4-mini 3.84.
    assert round(get_flavor("gemma2:gemma2-2b").num_params() / 1e9, 2) == 2.61
    assert round(get_flavor("gemma2:gemma2-9b").num_params() / 1e9, 2) == 9.24
    assert round(get_flavor("gemma2:gemma2-27b").num_params() / 1e9, 2) == 27.23
    assert round(get_flavor("phi3:phi3-mini-4k").num_params() / 1e9, 2) == 3.82
    assert round(get_flavor("phi3:phi4-mini").num_params() / 1e9, 2) == 3.84
    # Gemma-3-1B 999,885,952 parameters; the text stack of Gemma-3-4B 3.88B (4.30B less its 0.42B vision
    # tower); SmolLM3-3B 3.08B; GLM-4-9B-0414 9.40B.
    assert get_flavor("gemma3:gemma3-1b").num_params() == 999_885_952
    assert round(get_flavor("gemma3:gemma3-4b").num_params() / 1e9, 2) == 3.88
    assert round(get_flavor("smollm3:smollm3-3b").num_params() / 1e9, 2) == 3.08
    assert round(get_flavor("glm4:glm4-9b").num_params() / 1e9, 2) == 9.40  # GLM-4-9B-0414
    # OLMo-2 1B / 7B / 13B 1.48 / 7.30 / 13.72; Granite-3.3 2B / 8B 2.53 / 8.17; StarCoder2 3B / 7B / 15B
    # 3.03 / 7.17 / 15.96; InternLM3-8B 8.80.
    assert round(get_flavor("olmo2:olmo2-1b").num_params() / 1e9, 2) == 1.48
    assert round(get_flavor("olmo2:olmo2-7b").num_params() / 1e9, 2) == 7.30
    assert round(get_flavor("olmo2:olmo2-13b").num_params() / 1e9, 2) == 13.72
    assert round(get_flavor("granite:granite3.3-2b").num_params() / 1e9, 2) == 2.53
    assert round(get_flavor("granite:granite3.3-8b").num_params() / 1e9, 2) == 8.17
    assert round(get_flavor("starcoder2:starcoder2-3b").num_params() / 1e9, 2) == 3.03
    assert round(get_flavor("starcoder2:starcoder2-7b").num_params() / 1e9, 2) == 7.17
    assert round(get_flavor("starcoder2:starcoder2-15b").num_params() / 1e9, 2) == 15.96
    assert round(get_flavor("internlm3:internlm3-8b").num_params() / 1e9, 2) == 8.80


def test_moe_flavors_have_the_published_total_and_active_sizes():
    # (total, active) billions as published: Mixtral-8x7B 46.7 / 12.9, Mixtral-8x22B 141 / 39,
    # Qwen1.5-MoE-A2.7B 14.3 / 2.7, Qwen2-57B-A14B 57.4 / 14, Qwen3-30B-A3B 30.5 / 3.3, Qwen3-235B-A22B 235 / 22,
    # DeepSeek-V3 671 / 37 (the main model; its multi-token prediction module adds 14B), DeepSeek-V2-Lite 15.7 / 2.4
    # (active without the embedding: 2.45 here), Moonlight-16B-A3B 16 / 3 (15.29 / 2.24 without embedding and head).
    published = {"mixtral:8x7b": (46.7, 12.9), "mixtral:8x22b": (140.6, 39.2),
                 "qwen2_moe:qwen1.5-moe-a2.7b": (14.3, 2.7), "qwen2_moe:qwen2-57b-a14b": (57.4, 14.2),
                 "qwen3_moe:30b-a3b": (30.5, 3.4), "qwen3_moe:235b-a22b": (235.1, 22.2),
                 "deepseek_v3:671b": (671.0, 37.6), "deepseek_v2:lite": (15.7, 2.7),
                 "deepseek_v3:moonlight-16b-a3b": (16.0, 2.9)}
    for name, (total, active) in published.items():
        args = get_flavor(name)
        assert (round(args.num_params() / 1e9, 1), round(args.num_active_params() / 1e9, 1)) == (total, active), name
    moonlight = get_flavor("deepseek_v3:moonlight-16b-a3b")
    embedding_and_head = 2 * moonlight.vocab_size * moonlight.dim
    assert round((moonlight.num_params() - embedding_and_head) / 1e9, 2) == 15.29
    assert round((moonlight.num_active_params() - embedding_and_head) / 1e9, 2) == 2.24


def test_unknown_model_type_lists_supported():
    with pytest.raises(UserError, match="deepseek_v2, deepseek_v3, gemma2, gemma3_text, glm4, granite, internlm3, llama, "
                                        "mistral, mixtral, olmo2, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, smollm3, "
                                        "starcoder2"):
        family_for_model_type("gpt2")
    with pytest.raises(UserError, match="debug"):
        get_flavor("llama:nope")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_init_weights_is_seeded_and_tied(family):
    args = get_flavor(f"{family}:debug")
    models = []
    for _ in range(2):
        m = build_model(args, device="meta")
        m.to_empty(device="cpu")
        m.init_weights(seed=7)
        models.append(m)
    for (n, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), n
    logits = models[0](torch.randint(0, args.vocab_size, (2, 10)))
    assert logits.shape == (2, 10, args.vocab_size) and torch.isfinite(logits).all()


def test_tied_embeddings_share_storage_after_materialize():
    args = get_flavor("llama:debug")
    args.tie_embeddings = True
    m = build_model(args)
    m.to_empty(device="cpu")
    m.init_weights(seed=0)
    assert m.lm_head.weight is m.embed.weight


def test_positions_restart_at_each_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    assert positions_from_documents(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]


def test_mask_combines_causal_documents_and_window():
    doc = torch.tensor([[0, 0, 0, 0, 1, 1]])
    mask = build_attention_mask(6, 6, document_ids=doc, window=2)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert build_attention_mask(6, 6) is None  # plain causal takes SDPA's fast path


def test_bfloat16_cast_keeps_rope_frequencies_float32():
    args = get_flavor("llama:debug")
    m = build_model(args)
    m.to_empty(device="cpu")
    m.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (1, 8))
    m.to(torch.bfloat16)
    cos, _ = m.rope(torch.arange(8)[None], torch.float32)
    ref = build_model(args, device="cpu").rope(torch.arange(8)[None], torch.float32)[0]
    assert torch.equal(cos, ref)
    assert m(tokens).dtype == torch.bfloat16
