"""Continuous batching for concurrent requests: one worker thread owns the model.

Requests join the running batch at the next decode step and leave it as soon as they are done;
each keeps its own sampling parameters, seed, stop rules, token limit and stream. A joining
request is prefilled alone (exactly its solo prefill), and its keys and values are copied into a
free row ("slot") of one shared KV cache; every decode step then runs all running rows at once.

The shared cache is written column by column (all rows at the same column, `KVCache.offset`). A
row's tokens end at that column and start wherever its prompt was placed; `key_valid` hides the
columns before its start and those of free rows. When the columns run out, every row is shifted
left by the columns that no running row uses (also once those are half the columns written, as
attention reads them all); a prompt longer than the columns written so far
shifts every row right to make room. The cache's rows (slots) are bounded by `max_batch_size` and
by a memory budget for the cache; a request that finds no free slot waits. Greedy requests give
the same tokens as alone. Beam search runs alone between decode steps. A cancelled request (its
client went away) is dropped while it waits and leaves at the next step once running.

Every decision that depends on timing (which requests start, which clients went away) is taken
once per iteration, as a `_Step`, before any model work. Under tensor parallel (`collective`) rank 0
takes it and broadcasts it, and every rank then runs the same step: the same prefills and decode
steps, collectively, sampling the same tokens from the same gathered logits (a sampling request
without a seed gets one drawn on rank 0). The other ranks run `follow()` until rank 0's `close()`.
"""

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from meshtron.infer.generation import (
    Completion,
    SamplingParams,
    TokenLogprob,
    _device,
    _logprob_entries,
    cached_inputs,
    generate_text,
    next_tokens,
    process_logits,
)
from meshtron.infer.static import check_decode_mode, prepare_buffers, step_function
from meshtron.infer.streaming import IncrementalDecoder

log = logging.getLogger(__name__)
# Under tensor parallel an idle rank 0 still broadcasts an empty step this often, so that the other
# ranks' waiting broadcast never reaches the process group's timeout.
IDLE_STEP_S = 60.0


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None  # called on the worker thread
    on_logprob: Callable[[TokenLogprob], None] | None = None  # likewise, before the text a token completes
    result: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # set when the client is gone


@dataclass
class _Running:
    """A request in a slot: its sampling state and what it has produced."""

    request: Request
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    seen: torch.Tensor | None  # (1, V) tokens seen, for the repetition penalty
    position: int  # the position id of the next token fed to the model
    next_token: int = -1  # sampled, not yet fed to the model
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class _Step:
    """One iteration of the worker: the slots whose client went away (freed first), then the requests
    that start, with their arrival times."""

    dropped: list[int]
    started: list[tuple[float, Request]]

    def to_wire(self) -> tuple:
        return self.dropped, [(r.prompt_ids, r.params) for _, r in self.started]

    @classmethod
    def from_wire(cls, wire: tuple) -> "_Step":
        dropped, started = wire
        requests = [Request(prompt_ids, params) for prompt_ids, params in started]
        for request in requests:
            request.result.set_running_or_notify_cancel()
        now = time.perf_counter()
        return cls(dropped, [(now, request) for request in requests])


class Stats:
    """What /metrics reports: running and waiting requests, generated tokens and their rate, and
    the time from a request's arrival to its first token."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = self.waiting = 0
        self.requests_done = self.tokens = 0
        self.busy_s = 0.0  # time the worker spent generating
        self.ttft_sum_s = 0.0
        self.ttft_count = 0
        self.last_ttft_s = 0.0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "requests_running": self.running, "requests_waiting": self.waiting,
                "requests_finished_total": self.requests_done, "generated_tokens_total": self.tokens,
                "generation_tokens_per_second": self.tokens / self.busy_s if self.busy_s else 0.0,
                "time_to_first_token_seconds_mean": self.ttft_sum_s / self.ttft_count if self.ttft_count else 0.0,
                "time_to_first_token_seconds_last": self.last_ttft_s,
            }


class Scheduler:
    def __init__(self, model, tokenizer, pad_id: int, max_batch_size: int = 8, max_len: int | None = None,
                 kv_cache_bytes: int | None = None, decode: str = "dynamic", collective: bool = False):
        """`max_len`: the most tokens (prompt + generated) of one request, the cache's columns
        (default: the model's max_seq_len). `kv_cache_bytes`: a memory budget for the shared
        cache (per rank); it bounds the slots below `max_batch_size` when smaller. `decode` as in
        `generate`: "static" and "compiled" run every slot over every column at each step (fixed
        shapes). `collective`: the model is tensor-parallel over the default process group; rank 0
        serves (its worker starts here), the others call `follow()`."""
        check_decode_mode(decode)
        self.collective = collective
        self.model = model
        self.decode = decode
        self.tokenizer = tokenizer
        self.pad_id = pad_id
        self.columns = max_len or model.args.max_seq_len
        self.slots = max(1, min(max_batch_size, kv_cache_bytes // self._row_bytes()) if kv_cache_bytes
                         else max_batch_size)
        self.stats = Stats()
        self.device = _device(model)
        self._queue: queue.Queue[tuple[float, Request]] = queue.Queue()
        self._waiting: list[tuple[float, Request]] = []
        self._rows: list[_Running | None] = [None] * self.slots
        self._cache = None
        self._slot = None  # the static step's write column, a tensor (static and compiled decode)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="meshtron-generate", daemon=True)
        if not collective or dist.get_rank() == 0:
            self._thread.start()

    def _row_bytes(self) -> int:
        """Bytes of one slot of the cache on this rank: keys and values of every layer over all columns
        (under tensor parallel, of this rank's key/value heads)."""
        a = self.model.args
        dtype = next(self.model.parameters()).dtype
        heads = a.num_kv_heads // (dist.get_world_size() if self.collective else 1)
        return 2 * a.num_layers * heads * a.head_dim * self.columns * dtype.itemsize

    def submit(self, request: Request) -> Future:
        self._queue.put((time.perf_counter(), request))
        return request.result

    def close(self) -> None:
        """Stop the worker after its current step, failing the requests it still holds; under tensor
        parallel the other ranks' `follow()` returns too."""
        self._closed.set()
        self._queue.put((0.0, None))  # wakes a worker waiting for arrivals
        self._thread.join()

    def follow(self) -> None:
        """Tensor parallel, ranks other than 0: run the steps rank 0 broadcasts, until it closes."""
        self._loop()

    # The worker ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while (step := self._next_step()) is not None:
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    self._run(step)
            except Exception as e:  # the server must keep serving; the requests involved get the error
                log.exception("generation failed")
                self._fail_all(e)
            with self.stats.lock:
                self.stats.busy_s += time.perf_counter() - start
                self.stats.running = sum(r is not None for r in self._rows)
                self.stats.waiting = len(self._waiting)
        self._fail_all(RuntimeError("the server is shutting down"))
        for _, request in self._waiting:
            request.result.cancel()

    def _next_step(self) -> _Step | None:
        """This iteration's step, None once closed: decided here, or received from rank 0."""
        if self.collective and dist.get_rank() != 0:
            wire = [None]
            dist.broadcast_object_list(wire, src=0, device=self.device)
            return None if wire[0] is None else _Step.from_wire(wire[0])
        step = self._decide()
        if self.collective:
            dist.broadcast_object_list([None if step is None else step.to_wire()], src=0, device=self.device)
        return step

    def _decide(self) -> _Step | None:
        """Drop the running requests whose client went away, and start waiting ones in arrival order
        while slots are free (beam search takes none: it runs alone)."""
        self._take_arrivals(block=not any(self._rows))
        if self._closed.is_set():
            return None
        dropped = [i for i, r in enumerate(self._rows) if r is not None and r.request.cancelled.is_set()]
        free = self._rows.count(None) + len(dropped)
        started = []
        while self._waiting and free:
            arrived, request = self._waiting.pop(0)
            if request.cancelled.is_set():
                request.result.cancel()
            if not request.result.set_running_or_notify_cancel():
                continue  # its client went away while it waited
            if self.collective and request.params.seed is None:
                request.params = replace(request.params, seed=random.getrandbits(62))
            started.append((arrived, request))
            free -= request.params.num_beams == 1
        return _Step(dropped, started)

    def _take_arrivals(self, block: bool) -> None:
        if block and not self._waiting:
            try:
                # Idle under tensor parallel: wake up to broadcast an empty step now and then.
                self._waiting.append(self._queue.get(timeout=IDLE_STEP_S if self.collective else None))
            except queue.Empty:
                pass
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        self._waiting = [(arrived, r) for arrived, r in self._waiting if r is not None]  # close()'s wake-up

    def _run(self, step: _Step) -> None:
        for row in step.dropped:
            self._finish(row)
        for arrived, request in step.started:
            if request.params.num_beams > 1:
                self._run_alone(request)
            else:
                self._join(request, arrived)
        if any(self._rows):
            self._decode_step()

    def _run_alone(self, request: Request) -> None:
        try:
            completion = generate_text(self.model, self.tokenizer, [request.prompt_ids], request.params,
                                       pad_id=self.pad_id)[0]
        except Exception as e:
            request.result.set_exception(e)
            return
        request.result.set_result(completion)

    def _join(self, request: Request, arrived: float) -> None:
        """Prefill the request alone, copy its keys and values into a free slot, sample its first token."""
        p = request.params
        prompt = torch.tensor([request.prompt_ids], device=self.device)
        L = prompt.shape[1]
        if L + p.max_new_tokens > self.columns:
            request.result.set_exception(ValueError(
                f"prompt ({L} tokens) plus max_new_tokens ({p.max_new_tokens}) exceeds the {self.columns} tokens "
                "a request may hold"))
            return
        solo = self.model.new_cache(1, L, device=self.device)
        logits = self.model(prompt, **cached_inputs(self.model, solo, L), num_last=1)[:, -1]
        if self._cache is None:
            self._cache = self._new_cache(solo)
        cache = self._cache
        if cache.offset < L:
            self._shift(L - cache.offset)
        row = self._rows.index(None)
        cache.key_valid[row] = False
        cache.key_valid[row, cache.offset - L : cache.offset] = True
        for layer in range(len(cache.k)):
            cache.k[layer][row, :, cache.offset - L : cache.offset] = solo.k[layer][0]
            cache.v[layer][row, :, cache.offset - L : cache.offset] = solo.v[layer][0]
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros((1, self.model.args.vocab_size), dtype=torch.bool, device=self.device)
            seen[0, prompt[0]] = True
        generator = torch.Generator(device=self.device).manual_seed(p.seed) if p.seed is not None else None
        running = _Running(request, IncrementalDecoder(self.tokenizer, p.stop_token_ids, p.stop_strings),
                           generator, seen, position=L)
        self._rows[row] = running
        with self.stats.lock:
            elapsed = time.perf_counter() - arrived
            self.stats.ttft_sum_s += elapsed
            self.stats.ttft_count += 1
            self.stats.last_ttft_s = elapsed
        if p.max_new_tokens == 0:
            self._finish(row)
            return
        self._sample(row, logits)

    def _new_cache(self, solo):
        """The shared cache, its buffers shaped like a solo prefill's (dtype, device, local heads)."""
        cache = self.model.new_cache(self.slots, self.columns, device=self.device)
        cache.key_valid[:] = False
        for layer, (k, v) in enumerate(zip(solo.k, solo.v)):
            G = k.shape[1]
            cache.k[layer] = torch.zeros((self.slots, G, self.columns, k.shape[-1]), dtype=k.dtype, device=k.device)
            cache.v[layer] = torch.zeros((self.slots, G, self.columns, v.shape[-1]), dtype=v.dtype, device=v.device)
        if self.decode != "dynamic":
            self._slot = torch.tensor(0, device=self.device)
            prepare_buffers(cache, self._slot)
        return cache

    def _shift(self, by: int) -> None:
        """Move every row's columns right (by > 0) or left (by < 0); the columns moved in are unused.
        In place: a static step's buffers keep their addresses."""
        cache = self._cache
        for t in [*cache.k, *cache.v]:
            t.copy_(torch.roll(t, by, dims=2))
        cache.key_valid.copy_(torch.roll(cache.key_valid, by, dims=1))
        if by > 0:
            cache.key_valid[:, :by] = False
        else:
            cache.key_valid[:, by:] = False
        cache.offset += by

    def _decode_step(self) -> None:
        """Feed every running row its sampled token, one column for all, and sample the next ones."""
        cache = self._cache
        # Attention reads every column up to the offset: drop the unused leading ones once they are
        # half of them (or when the columns run out; a request never spans all, so some are unused).
        unused = int(cache.key_valid.any(0).nonzero()[0])
        if unused and (cache.offset == self.columns or unused * 2 >= cache.offset):
            self._shift(-unused)
        rows = [i for i, r in enumerate(self._rows) if r is not None]
        # Slots are taken lowest first: the step runs the rows up to the last one in use, not all slots
        # (all of them with a static step, whose shapes must not change).
        n = rows[-1] + 1 if self.decode == "dynamic" else self.slots
        tokens = torch.full((n, 1), self.pad_id, dtype=torch.long)
        positions = torch.zeros((n, 1), dtype=torch.long)
        for i in rows:
            tokens[i, 0], positions[i, 0] = self._rows[i].next_token, self._rows[i].position
            self._rows[i].position += 1
        active = torch.zeros(self.slots, dtype=torch.bool)
        active[rows] = True
        cache.key_valid[:, cache.offset] = active.to(self.device)
        if self.decode == "dynamic":
            logits = self._cached_step(n, tokens.to(self.device), positions.to(self.device))
        else:
            self._slot.fill_(cache.offset)
            if self.decode == "compiled" and self.device.type == "cuda":
                torch.compiler.cudagraph_mark_step_begin()
            step = step_function(self.decode, self.device)
            # A copy: a CUDA graph's replay overwrites its output in place.
            logits = step(self.model, tokens.to(self.device), positions.to(self.device), self._slot,
                          cache.key_valid, cache.k, cache.v).clone()
            cache.offset += 1
        for i in rows:
            self._sample(i, logits[i : i + 1])

    def _cached_step(self, n: int, tokens_n1: torch.Tensor, positions_n1: torch.Tensor) -> torch.Tensor:
        """The cached forward of the first `n` rows over the columns written so far."""
        cache = self._cache
        view = self.model.new_cache(n, self.columns, device=self.device)
        view.k, view.v = [t[:n] for t in cache.k], [t[:n] for t in cache.v]  # views: writes land in the cache
        view.key_valid, view.offset = cache.key_valid[:n], cache.offset
        logits = self.model(tokens_n1, **cached_inputs(self.model, view, 1, positions_n1))[:, -1]
        cache.offset = view.offset
        return logits

    def _sample(self, row: int, logits_1V: torch.Tensor) -> None:
        """Choose the row's next token with its own parameters and stream it; finish the row when done."""
        r = self._rows[row]
        p = r.request.params
        token = int(next_tokens(process_logits(logits_1V, p, r.seen), p, r.generator)[0])
        if r.seen is not None:
            r.seen[0, token] = True
        stop = token in p.stop_token_ids
        if not stop:
            r.token_ids.append(token)
            if p.logprobs is not None:
                entry = _logprob_entries(torch.tensor([token], device=logits_1V.device),
                                         logits_1V.float().log_softmax(-1), p.logprobs)[0]
                r.logprobs.append(entry)
                if r.request.on_logprob is not None:
                    r.request.on_logprob(entry)
        chunk = r.decoder.push(token)
        if chunk and r.request.on_text is not None:
            r.request.on_text(chunk)
        with self.stats.lock:
            self.stats.tokens += 1
        r.next_token = token
        if stop or r.decoder.stopped or len(r.token_ids) >= p.max_new_tokens:
            self._finish(row)

    def _finish(self, row: int) -> None:
        """Complete the row's request and free its slot."""
        r = self._rows[row]
        self._rows[row] = None
        self._cache.key_valid[row] = False
        chunk = r.decoder.finish()
        if chunk and r.request.on_text is not None:
            r.request.on_text(chunk)
        p = r.request.params
        stopped = r.decoder.stopped or len(r.token_ids) < p.max_new_tokens
        # Tokens after a stop string belong to no text; the completion keeps those the text came from,
        # as generate_text does.
        r.request.result.set_result(Completion(r.token_ids, r.decoder.text, "stop" if stopped else "length",
                                               r.logprobs if p.logprobs is not None else None))
        with self.stats.lock:
            self.stats.requests_done += 1

    def _fail_all(self, error: Exception) -> None:
        for i, r in enumerate(self._rows):
            if r is not None:
                self._rows[i] = None
                if not r.request.result.done():
                    r.request.result.set_exception(error)
        self._cache = None  # rebuilt by the next request
