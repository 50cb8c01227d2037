"""Multi-head latent attention: the cache holds the latent, cached decoding equals a full forward, and the
cache sizes docs/models.md reports."""

from pathlib import Path

import pytest
import torch

from meshtron.models.common.mla import expanded_cache_numbers, latent_cache_numbers
from meshtron.models.registry import build_model, get_flavor


def _model():
    model = build_model(get_flavor("deepseek_v3:debug"), device="cpu")
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("absorbed", [False, True])
def test_the_cache_holds_the_latent_and_decoding_from_it_equals_a_full_forward(absorbed):
    """Also with the up-projections absorbed into the decode step's query and output (set_absorbed_decode),
    and greedy generation from the same prompt then gives the same tokens."""
    from meshtron.infer.generation import SamplingParams, generate
    from meshtron.models.common.mla import set_absorbed_decode

    model = _model()
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(2, 9)
    with torch.no_grad():
        full = model(tokens)
        greedy = generate(model, [tokens[0, :5].tolist(), tokens[1, :3].tolist()], SamplingParams(max_new_tokens=6))
        set_absorbed_decode(model, absorbed)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 9)]
    for layer in range(args.num_layers):  # one "head": the latent in k's place, the shared rotary key in v's
        assert cache.k[layer].shape == (2, 1, 9, args.kv_lora_rank)
        assert cache.v[layer].shape == (2, 1, 9, args.qk_rope_head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert generate(model, [tokens[0, :5].tolist(), tokens[1, :3].tolist()], SamplingParams(max_new_tokens=6)) == greedy


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


def test_multi_token_prediction_targets_and_training():
    """Depth k's target at position t is the main label at t + k, ignored past the end and across a document
    boundary; a few optimizer steps on one batch lower the MTP loss, and generation never runs the module."""
    import dataclasses

    from meshtron.models.common.masks import AttentionMask
    from meshtron.models.deepseek_v3.model import labels_ahead, take_mtp_loss_sums
    from meshtron.train.losses import head_cross_entropy_sum

    labels = torch.tensor([[10, 11, 12, 13, 14, 15]])
    documents = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert labels_ahead(labels, 1, None).tolist() == [[11, 12, 13, 14, 15, -100]]
    assert labels_ahead(labels, 2, documents).tolist() == [[12, -100, -100, 15, -100, -100]]

    args = dataclasses.replace(get_flavor("deepseek_v3:debug"), num_mtp_layers=2, num_layers=1, vocab_size=64)
    torch.manual_seed(0)
    model = build_model(args, device="cpu")
    model.init_weights(seed=0)
    assert list(model.mtp) == ["1", "2"]
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    target = labels_ahead(tokens, 1, None)
    positions = torch.arange(16).expand(2, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        model(tokens, positions, mask=AttentionMask.for_batch(16), mtp_labels=target,
              head=lambda h, lm_head: head_cross_entropy_sum(h, lm_head, target))
        mtp = torch.stack(take_mtp_loss_sums(model)).mean()
        mtp.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(mtp.item())
    assert losses[-1] < 0.8 * losses[0]
    with torch.no_grad():
        model(tokens)
    assert take_mtp_loss_sums(model) is None
