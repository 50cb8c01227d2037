"""Generation: seeded sampling, top-k 1 = greedy, frequencies match the softmax, stop tokens and
strings, per-row limits, and beam search equal to transformers'."""

import torch

from meshtron.infer.generation import SamplingParams, generate, generate_text, next_tokens, process_logits
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


class LetterTokenizer:
    """Every token decodes to one letter, so stop strings map to token positions."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_generate_text_cuts_at_a_stop_string_and_stops_that_row():
    m = _model()
    prompts = [[5, 6, 7], [9, 10]]
    full = generate(m, prompts, SamplingParams(max_new_tokens=12))
    text = LetterTokenizer().decode(full[0])
    stop = text[4:6]
    cut = text.find(stop)
    params = SamplingParams(max_new_tokens=12, stop_strings=(stop,))
    first, second = generate_text(m, LetterTokenizer(), prompts, params)
    assert first.text == text[:cut] and first.finish_reason == "stop"
    assert first.token_ids == full[0][: cut + len(stop)]  # up to the token that completed the stop string
    # The other row of the batch is unaffected.
    assert second.token_ids == full[1] and second.finish_reason == "length"


def test_generate_text_per_row_limits_and_streamed_text():
    m = _model()
    prompts = [[5, 6, 7], [9, 10], [3]]
    full = generate(m, prompts, SamplingParams(max_new_tokens=9))
    streamed = ["", "", ""]

    def on_text(row, chunk):
        streamed[row] += chunk

    out = generate_text(m, LetterTokenizer(), prompts, SamplingParams(max_new_tokens=9), max_new_tokens=[2, 9, 5],
                        on_text=on_text)
    assert [c.token_ids for c in out] == [full[0][:2], full[1], full[2][:5]]
    assert [c.finish_reason for c in out] == ["length"] * 3
    assert streamed == [c.text for c in out]


def test_beam_search_matches_transformers_on_a_tiny_random_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from meshtron.checkpoint.hf import load_hf_model

    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         initializer_range=0.3)
    torch.manual_seed(1)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(str(tmp_path))
    ours, _ = load_hf_model(tmp_path)
    stops = [3, 17]
    for prompt, num_beams, length_penalty in (([5, 6, 7, 8], 3, 1.0), ([11, 2], 4, 0.5), ([40], 2, 1.0)):
        expected = hf.generate(torch.tensor([prompt]), num_beams=num_beams, do_sample=False, max_new_tokens=10,
                               eos_token_id=stops, pad_token_id=0, length_penalty=length_penalty)[0, len(prompt):]
        expected = expected.tolist()
        expected = expected[: next((i for i, t in enumerate(expected) if t in stops), len(expected))]
        params = SamplingParams(max_new_tokens=10, num_beams=num_beams, stop_token_ids=stops,
                                length_penalty=length_penalty)
        assert generate(ours, [prompt], params)[0] == expected


def test_beam_search_output_is_cut_at_a_stop_string():
    m = _model()
    beams = SamplingParams(max_new_tokens=10, num_beams=3)
    (full,) = generate(m, [[5, 6, 7]], beams)
    text = LetterTokenizer().decode(full)
    stop = text[3:5]
    cut = text.find(stop)
    (out,) = generate_text(m, LetterTokenizer(), [[5, 6, 7]], SamplingParams(max_new_tokens=10, num_beams=3,
                                                                             stop_strings=(stop,)))
    assert out.text == text[:cut] and out.token_ids == full[: cut + len(stop)] and out.finish_reason == "stop"


def test_each_cached_step_is_described_once_for_every_layer():
    m = _model()
    m.set_attention("dense")
    steps = []  # (layer core, mask) per call, in order
    for name, module in m.named_modules():
        if name.endswith("attn.core"):
            module.register_forward_hook(lambda module, args, output: steps.append(args[3]))
    prompts = [[5, 6, 7], [9, 10]]  # the second row is left-padded by one slot
    generate(m, prompts, SamplingParams(max_new_tokens=4))
    per_step = [steps[i:i + 2] for i in range(0, len(steps), 2)]  # llama:debug has 2 layers
    assert [(s[0].offset, s[0].q_len) for s in per_step] == [(0, 3), (3, 1), (4, 1), (5, 1)]
    for first, second in per_step:
        assert second is first and first.backend == "dense"
        assert torch.equal(first.key_valid[:, :3], torch.tensor([[True] * 3, [False, True, True]]))
