"""The serving scheduler: continuously batched requests with their own limits equal generation alone, and a
cancelled request stops (running) or never starts (waiting)."""

import threading
from concurrent.futures import CancelledError

import pytest

from meshtron.infer.generation import SamplingParams, generate_text
from meshtron.infer.scheduler import Request, Scheduler
from meshtron.models.registry import build_model, get_flavor


class LetterTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def _model(flavor: str = "llama:debug"):
    m = build_model(get_flavor(flavor))
    m.to_empty(device="cpu")
    m.init_weights(seed=5)
    return m.eval()


# deepseek_v3: latent attention, whose cache holds the latent as k and the rotary key (narrower) as v.
@pytest.mark.parametrize("flavor", ["llama:debug", "deepseek_v3:debug"])
def test_requests_with_their_own_limits_match_generation_alone(flavor):
    m = _model(flavor)
    scheduler = Scheduler(m, LetterTokenizer(), pad_id=0, max_batch_size=4)
    prompts, limits = [[5, 6, 7], [9, 10], [3], [11, 12, 13, 14], [8]], [3, 9, 5, 1, 7]
    futures = [scheduler.submit(Request(p, SamplingParams(max_new_tokens=n))) for p, n in zip(prompts, limits)]
    got = [f.result(timeout=60) for f in futures]
    alone = [generate_text(m, LetterTokenizer(), [p], SamplingParams(max_new_tokens=n))[0]
             for p, n in zip(prompts, limits)]
    assert got == alone


def test_a_cancelled_request_stops_and_a_waiting_one_never_starts():
    m = _model()
    scheduler = Scheduler(m, LetterTokenizer(), pad_id=0)
    first_chunk = threading.Event()
    running = Request([5, 6, 7], SamplingParams(max_new_tokens=500))

    def on_text(chunk):
        running.cancelled.set()  # the client goes away after the first text
        first_chunk.set()

    running.on_text = on_text
    seeded = Request([5, 6], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1))  # dropped before it joins
    seeded.cancelled.set()
    done = scheduler.submit(running)
    waiting = scheduler.submit(seeded)
    completion = done.result(timeout=60)
    # Seen at the next step: the decode step of the iteration it joined in still ran.
    assert first_chunk.is_set() and len(completion.token_ids) == 2
    with pytest.raises(CancelledError):
        waiting.result(timeout=60)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_requests_joining_and_leaving_the_running_batch_match_generation_alone(decode):
    """Requests arrive while others run (each joins at the next decode step), leave at their own
    limits, and sample their own way; a small cache forces the rows to be shifted both ways. With the
    static step every slot runs over every column, the free ones and those not yet written masked."""
    m = _model()
    scheduler = Scheduler(m, LetterTokenizer(), pad_id=0, max_batch_size=3, max_len=24, decode=decode)
    specs = [([5, 6, 7], SamplingParams(max_new_tokens=12)),
             ([9, 10], SamplingParams(max_new_tokens=3)),
             ([3] * 11, SamplingParams(max_new_tokens=9)),  # longer than the columns written so far
             ([11, 12, 13, 14], SamplingParams(max_new_tokens=7, temperature=0.8, top_k=20, seed=3)),
             ([8], SamplingParams(max_new_tokens=5, repetition_penalty=1.3)),
             ([4, 4], SamplingParams(max_new_tokens=6, logprobs=2))]
    streamed = {i: [] for i in range(len(specs))}
    first_text = threading.Event()
    futures = []
    for i, (prompt, params) in enumerate(specs):
        def on_text(chunk, i=i):
            streamed[i].append(chunk)
            first_text.set()
        futures.append(scheduler.submit(Request(prompt, params, on_text=on_text)))
        if i == 0:
            first_text.wait(timeout=60)  # the others join a batch that is already decoding
    got = [f.result(timeout=120) for f in futures]
    alone = [generate_text(m, LetterTokenizer(), [p], params)[0] for p, params in specs]
    assert [(c.token_ids, c.text, c.finish_reason) for c in got] == \
        [(c.token_ids, c.text, c.finish_reason) for c in alone]
    # Log-probabilities of a batched decode step differ from the solo step's in float32 rounding only.
    assert [e.logprob for e in got[5].logprobs] == pytest.approx([e.logprob for e in alone[5].logprobs], abs=1e-5)
    assert all("".join(streamed[i]) == c.text for i, c in enumerate(got))
    stats = scheduler.stats.snapshot()
    assert stats["requests_finished_total"] == len(specs) and stats["requests_running"] == 0
    assert stats["generated_tokens_total"] >= sum(len(c.token_ids) for c in got)


def test_a_memory_budget_bounds_the_batch():
    m = _model()
    one_row = Scheduler(m, LetterTokenizer(), pad_id=0, max_batch_size=8, max_len=32)._row_bytes()
    assert Scheduler(m, LetterTokenizer(), pad_id=0, max_batch_size=8, max_len=32, kv_cache_bytes=3 * one_row).slots == 3
