"""A generation scheduler for concurrent requests: one worker thread owns the model.

Requests wait in a queue. Each round the worker takes the oldest waiting request and, with
it, up to `max_batch_size - 1` other waiting requests that sample the same way (same
temperature, top-k, top-p, penalty, stop strings, number of logprobs), and generates them as one left-padded
batch; each row keeps its own token limit. A request with a seed runs alone, because its
tokens must not depend on what else shares the batch. Greedy rows give the same tokens
batched as alone. A cancelled request (its client went away) is dropped while it waits and
stops at the next step once running.
"""

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from meshtron.infer.generation import Completion, SamplingParams, TokenLogprob, generate_text

log = logging.getLogger(__name__)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called on the worker thread
    on_logprob: Callable[[TokenLogprob], None] | None = None  # likewise, before the text a token completes
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client is gone

    def batch_key(self) -> tuple:
        p = self.params
        alone = id(self) if p.seed is not None or p.num_beams > 1 else None
        return (p.temperature, p.top_k, p.top_p, p.repetition_penalty, tuple(p.stop_strings), p.logprobs, alone)


class Scheduler:
    def __init__(self, model, tokenizer, pad_id: int, max_batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.max_batch_size = max_batch_size
        self._queue: queue.Queue[Request] = queue.Queue()
        self._waiting: list[Request] = []
        self._thread = threading.Thread(target=self._loop, name="meshtron-generate", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Future:
        self._queue.put(request)
        return request.result

    def _loop(self) -> None:
        while True:
            if not self._waiting:
                self._waiting.append(self._queue.get())
            while True:
                try:
                    self._waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            key = self._waiting[0].batch_key()
            batch = [r for r in self._waiting if r.batch_key() == key][: self.max_batch_size]
            self._waiting = [r for r in self._waiting if all(r is not b for b in batch)]
            batch = [r for r in batch if self._start(r)]
            if batch:
                self._run(batch)

    @staticmethod
    def _start(request: Request) -> bool:
        """Mark a request running (its future can no longer be cancelled); False for one whose
        client went away while it waited."""
        if request.cancelled.is_set():
            request.result.cancel()
        return request.result.set_running_or_notify_cancel()

    def _run(self, batch: list[Request]) -> None:
        limits = [r.params.max_new_tokens for r in batch]
        params = replace(batch[0].params, max_new_tokens=max(limits))

        def on_text(row: int, chunk: str) -> None:
            if batch[row].on_text is not None:
                batch[row].on_text(chunk)

        def on_logprob(row: int, entry: TokenLogprob) -> None:
            if batch[row].on_logprob is not None:
                batch[row].on_logprob(entry)

        try:
            completions: list[Completion] = generate_text(
                self.model, self.tokenizer, [r.prompt_ids for r in batch], params,
                pad_id=self.pad_id, max_new_tokens=limits, on_text=on_text,
                cancelled=lambda row: batch[row].cancelled.is_set(), on_logprob=on_logprob,
            )
        except Exception as e:  # the server must keep serving; the requests get the error
            log.exception("generation failed for a batch of %d", len(batch))
            for r in batch:
                r.result.set_exception(e)
            return
        for r, c in zip(batch, completions):
            r.result.set_result(c)
