"""Multi-head latent attention: the cache holds the latent, cached decoding equals a full forward, and the
cache sizes docs/models.md reports."""

from pathlib import Path

import torch

from meshtron.models.common.mla import expanded_cache_numbers, latent_cache_numbers
from meshtron.models.registry import build_model, get_flavor


def _model():
    model = build_model(get_flavor("deepseek_v3:debug"), device="cpu")
    model.init_weights(seed=0)
    return model.eval()


def test_the_cache_holds_the_latent_and_decoding_from_it_equals_a_full_forward():
    model = _model()
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 9)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 9)]
    for layer in range(args.num_layers):  # one "head": the latent in k's place, the shared rotary key in v's
        assert cache.k[layer].shape == (2, 1, 9, args.kv_lora_rank)
        assert cache.v[layer].shape == (2, 1, 9, args.qk_rope_head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_docs_report_the_671b_cache_sizes():
    args = get_flavor("deepseek_v3:671b")
    bf16 = 2
    latent = latent_cache_numbers(args) * args.num_layers * bf16
    expanded = expanded_cache_numbers(args) * args.num_layers * bf16
    docs = (Path(__file__).parents[3] / "docs" / "models.md").read_text()
    assert f"| latent (meshtron) | 512 + 64 = {latent_cache_numbers(args)} | {latent:,} |" in docs
    assert f"= {expanded_cache_numbers(args):,} | {expanded:,} |" in docs
    assert f"{round(expanded / latent)}x smaller" in docs


def test_a_bfloat16_cast_keeps_the_routing_bias_in_float32():
    model = _model()
    bias = model.layers["1"].mlp.router.expert_bias
    with torch.no_grad():
        bias.copy_(1.0 + 1e-3 * torch.arange(bias.numel()))  # steps bfloat16 cannot hold near 1
    expected = bias.clone()
    model.to(torch.bfloat16)
    kept = model.layers["1"].mlp.router.expert_bias
    assert kept.dtype == torch.float32 and torch.equal(kept, expected)
    assert model.layers["1"].mlp.router.weight.dtype == torch.bfloat16
    assert "layers.1.mlp.router.expert_bias" in model.state_dict()
