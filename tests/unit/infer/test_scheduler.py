"""The serving scheduler: batched requests with their own limits equal generation alone, and a
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


def _model():
    m = build_model(get_flavor("llama:debug"))
    m.to_empty(device="cpu")
    m.init_weights(seed=5)
    return m.eval()


def test_requests_with_their_own_limits_match_generation_alone():
    m = _model()
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
    seeded = Request([5, 6], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1))  # runs alone, after
    seeded.cancelled.set()
    done = scheduler.submit(running)
    waiting = scheduler.submit(seeded)
    completion = done.result(timeout=60)
    assert first_chunk.is_set() and len(completion.token_ids) == 1  # stopped at the step that was cancelled
    with pytest.raises(CancelledError):
        waiting.result(timeout=60)
