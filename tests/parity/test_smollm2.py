"""The real example model (SmolLM2-135M-Instruct) against transformers: logits and greedy decoding."""

import subprocess
import sys

import pytest
import torch

from meshtron.checkpoint.hf import load_hf_model
from meshtron.infer.generation import SamplingParams, generate
from meshtron.infer.loading import stop_token_ids

pytestmark = pytest.mark.smollm2

# float32 must agree to rounding; bfloat16 runs the same ops in the same order as transformers,
# but kernels may differ across torch builds, so it gets a loose bound plus identical argmax.
FLOAT32_TOL = 1e-4
BFLOAT16_TOL = 0.25

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the moon.",
    "What is 2 + 3?",
    "Give me a synonym for happy.",
]


@pytest.fixture(scope="module")
def hf_models(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return {
        dtype: AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=dtype).eval()
        for dtype in (torch.float32, torch.bfloat16)
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_transformers(smollm2_dir, smollm2_tokenizer, hf_models, dtype):
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, and Berlin"]
    ids = smollm2_tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]
    ours, _ = load_hf_model(smollm2_dir, dtype=dtype)
    with torch.no_grad():
        expected = hf_models[dtype](ids).logits.float()
        got = ours(ids).float()
    tol = FLOAT32_TOL if dtype == torch.float32 else BFLOAT16_TOL
    assert (got - expected).abs().max().item() <= tol
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _chat_ids(tokenizer, prompt):
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _hf_greedy(hf_model, tokenizer, prompt_ids, max_new_tokens, stop_ids):
    out = hf_model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
    )[0, len(prompt_ids) :].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stop_ids), len(out))]


def test_greedy_generation_matches_transformers_batched_and_single(smollm2_dir, smollm2_tokenizer, hf_models):
    ours, _ = load_hf_model(smollm2_dir)
    stops = stop_token_ids(smollm2_tokenizer, smollm2_dir)
    params = SamplingParams(max_new_tokens=24, temperature=0.0, stop_token_ids=stops)
    prompts = [_chat_ids(smollm2_tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 1  # different lengths exercise left padding
    expected = [_hf_greedy(hf_models[torch.float32], smollm2_tokenizer, p, 24, stops) for p in prompts]
    batched = generate(ours, prompts, params, pad_id=smollm2_tokenizer.pad_token_id)
    single = [generate(ours, [p], params)[0] for p in prompts]
    assert batched == expected
    assert single == expected


def test_generate_cli_matches_transformers(smollm2_dir, smollm2_tokenizer, hf_models):
    prompt = "What is the capital of France?"
    stops = stop_token_ids(smollm2_tokenizer, smollm2_dir)
    expected_ids = _hf_greedy(hf_models[torch.float32], smollm2_tokenizer, _chat_ids(smollm2_tokenizer, prompt), 64, stops)
    expected = smollm2_tokenizer.decode(expected_ids, skip_special_tokens=True)
    result = subprocess.run(
        [sys.executable, "-m", "meshtron", "generate", "--model", str(smollm2_dir), "--chat", "--prompt", prompt,
         "--temperature", "0", "--dtype", "float32", "--max-new-tokens", "64"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout == expected + "\n"
    assert "Paris" in result.stdout


@pytest.mark.slow  # transformers' beam search on the real model takes about a minute on 2 cores
def test_beam_search_matches_transformers(smollm2_dir, smollm2_tokenizer, hf_models):
    ours, _ = load_hf_model(smollm2_dir)
    stops = stop_token_ids(smollm2_tokenizer, smollm2_dir)
    for prompt in PROMPTS[:2]:
        ids = _chat_ids(smollm2_tokenizer, prompt)
        expected = hf_models[torch.float32].generate(
            torch.tensor([ids]), num_beams=3, do_sample=False, max_new_tokens=12, eos_token_id=stops,
            pad_token_id=smollm2_tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
        expected = expected[: next((i for i, t in enumerate(expected) if t in stops), len(expected))]
        params = SamplingParams(max_new_tokens=12, num_beams=3, stop_token_ids=stops)
        assert generate(ours, [ids], params)[0] == expected


def test_generate_cli_streams_and_stops_at_a_stop_string(smollm2_dir):
    # Unstopped, the reply is "The capital of France is Paris." (test_generate_cli_matches_transformers).
    cmd = [sys.executable, "-m", "meshtron", "generate", "--model", str(smollm2_dir), "--chat", "--prompt",
           "What is the capital of France?", "--max-new-tokens", "24", "--dtype", "float32", "--stream",
           "--stop", " Paris"]
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout == "The capital of France is\n"
