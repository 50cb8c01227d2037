"""Sampling: seeds, top-k 1 = greedy, and empirical frequencies match the softmax."""

import torch

from meshtron.infer.generation import SamplingParams, generate, next_tokens, process_logits
from meshtron.models.registry import build_model, get_flavor


def _model():
    args = get_flavor("llama:debug")
    m = build_model(args)
    m.to_empty(device="cpu")
    m.init_weights(seed=5)
    return m.eval()


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    m = _model()
    prompts = [[5, 6, 7], [9, 10]]
    sample = SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)
    assert generate(m, prompts, sample) == generate(m, prompts, sample)
    greedy = generate(m, prompts, SamplingParams(max_new_tokens=12))
    assert generate(m, prompts, SamplingParams(max_new_tokens=12, temperature=0.8, top_k=1, seed=1)) == greedy


def test_stop_token_ends_a_row():
    m = _model()
    (out,) = generate(m, [[5, 6, 7]], SamplingParams(max_new_tokens=8))
    stop = out[2]
    (cut,) = generate(m, [[5, 6, 7]], SamplingParams(max_new_tokens=8, stop_token_ids=[stop]))
    assert cut == out[: out.index(stop)]


def test_empirical_frequencies_match_softmax_at_temperature():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    params = SamplingParams(temperature=0.7)
    n = 40000
    gen = torch.Generator().manual_seed(0)
    scores = process_logits(logits.expand(n, 6), params)
    draws = next_tokens(scores, params, gen)
    freq = torch.bincount(draws, minlength=6).float() / n
    expected = (logits[0] / 0.7).softmax(-1)
    # 4 standard errors of a binomial proportion at n = 40000 is at most 0.01.
    assert (freq - expected).abs().max().item() < 0.01


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    scores = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(scores).tolist() == [[True, True, False, False]]


def test_repetition_penalty_lowers_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    scores = process_logits(logits, SamplingParams(repetition_penalty=2.0), seen)
    assert scores.tolist() == [[1.0, -2.0, 1.0]]
