"""KV-cache generation: prefill the prompts once, then decode one token per step.

Prompts of different lengths are left-padded into one batch; the cache's `key_valid` hides the
padding and each row's position ids count only its real tokens, so a batched prompt gives the
same tokens as the prompt alone. Sampling follows transformers' order of logits processors:
repetition penalty, temperature, top-k, top-p. Beam search follows transformers' default
(length penalty on the generated length, its early-stop heuristic) so that both pick the same beam.

Three levels: `generate` (token ids in, token ids out, a per-step hook), `beam_search` (one
prompt) and `generate_text` (adds detokenization, stop strings, per-row token limits and
streaming of text; what the CLI and the server call).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from meshtron.infer.static import check_decode_mode, prepare_buffers, round_up_columns, step_function
from meshtron.infer.streaming import IncrementalDecoder
from meshtron.models.common.masks import AttentionMask


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    stop_strings: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    # None: none. k >= 0: each generated token's log-probability under the model (log-softmax of its
    # raw logits, before penalty, temperature, top-k and top-p) and the k most likely tokens'.
    logprobs: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search is deterministic: use temperature 0 with num_beams > 1")
        if self.logprobs is not None and (self.logprobs < 0 or self.num_beams > 1):
            raise ValueError("logprobs must be >= 0, and beam search does not report them")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")


def process_logits(
    logits_BV: torch.Tensor, params: SamplingParams, seen_BV: torch.Tensor | None = None
) -> torch.Tensor:
    """Apply repetition penalty (to tokens marked in the bool mask `seen_BV`), temperature, top-k
    and top-p; returns float32 scores."""
    scores = logits_BV.float()
    if params.repetition_penalty != 1.0 and seen_BV is not None:
        penalized = torch.where(scores < 0, scores * params.repetition_penalty, scores / params.repetition_penalty)
        scores = torch.where(seen_BV, penalized, scores)
    if params.temperature > 0:
        scores = scores / params.temperature
    if params.top_k > 0:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the best token always stays.
        drop_sorted = (cumulative - sorted_scores.softmax(-1)) >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def next_tokens(scores_BV: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    if params.temperature == 0:
        return scores_BV.argmax(-1)
    probs = scores_BV.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters())
    # A tensor-parallel parameter is a DTensor; its local shard tells where this rank computes.
    return param.to_local().device if hasattr(param, "to_local") else param.device


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    valid = torch.zeros((B, L), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        valid[i, L - len(p) :] = True
    return tokens.to(device), valid.to(device)


def cached_inputs(model: nn.Module, cache, num_tokens: int, position_ids: torch.Tensor | None = None) -> dict:
    """The keyword inputs of one cached forward of `num_tokens` per row: the cache, the step's mask
    description (the cache's offset and padded slots, the model's attention setting) and the
    position ids (continuing the cache's offset unless given)."""
    mask = AttentionMask.for_batch(num_tokens, offset=cache.offset, key_valid=cache.key_valid,
                                   backend=model.attention)
    if position_ids is None:
        B = cache.key_valid.shape[0]
        position_ids = torch.arange(cache.offset, cache.offset + num_tokens, device=cache.key_valid.device)
        position_ids = position_ids.expand(B, num_tokens)
    return {"cache": cache, "mask": mask, "position_ids": position_ids}


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    pad_id: int = 0,
    on_tokens: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], Sequence[bool] | None] | None = None,
    decode: str = "dynamic",
) -> list[list[int]]:
    """Generate for a batch of token-id prompts; returns the new tokens per prompt (stop token excluded).

    `on_tokens(step_tokens_B, active_B, logprobs_BV)` is called after each decode step (for
    streaming; `logprobs_BV` is the log-softmax of the step's logits when `params.logprobs` is set,
    else None); it may return a per-row sequence of bools, True for rows to finish now (a stop
    string, a row's own token limit). Beam search (`params.num_beams > 1`) runs prompt by prompt
    and calls no hook.

    `decode`: "dynamic" (the cached forward, its shapes growing by one key per step), "static" or
    "compiled" (a step of fixed shapes over a preallocated cache, compiled once with "compiled";
    see meshtron/infer/static.py). All three give the same greedy tokens.
    """
    check_decode_mode(decode)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if params.num_beams > 1:
        return [beam_search(model, p, params) for p in prompts]
    device = _device(model)
    tokens, valid = _left_pad(prompts, pad_id, device)
    B, L = tokens.shape
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    columns = L + params.max_new_tokens if decode == "dynamic" else round_up_columns(L + params.max_new_tokens)
    cache = model.new_cache(B, columns, device=device)
    cache.key_valid[:, :L] = valid

    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros((B, model.args.vocab_size), dtype=torch.bool, device=device)
        seen[torch.arange(B, device=device)[:, None].expand(B, L)[valid], tokens[valid]] = True
    steps: list[torch.Tensor] = []
    active = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1

    logits = model(tokens, **cached_inputs(model, cache, L, positions), num_last=1)[:, -1]
    step_fn = _decoder(model, cache, decode, device)
    for i in range(params.max_new_tokens):
        step = next_tokens(process_logits(logits, params, seen), params, generator)
        step = torch.where(active, step, torch.full_like(step, pad_id))
        steps.append(step)
        if seen is not None:
            seen[torch.arange(B, device=device), step] = True
        if on_tokens is not None:
            logprobs = logits.float().log_softmax(-1) if params.logprobs is not None else None
            finished = on_tokens(step, active.clone(), logprobs)
            if finished is not None:
                active = active & ~torch.as_tensor(list(finished), dtype=torch.bool, device=device)
        active = active & ~torch.isin(step, stop_ids)
        # One host sync per step: the loop must know whether any row still runs.
        if i + 1 == params.max_new_tokens or not active.any():
            break
        logits = step_fn(step[:, None], next_pos)
        next_pos = next_pos + 1

    out = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(B)]
    return [_cut_at_stop(row, params.stop_token_ids) for row in out]


def _decoder(model: nn.Module, cache, decode: str, device: torch.device):
    """`step(tokens_B1, positions_B1) -> logits_BV`: one decode step after the prefill into `cache`."""
    if decode == "dynamic":
        return lambda tokens, positions: model(tokens, **cached_inputs(model, cache, 1, positions))[:, -1]
    slot = torch.tensor(cache.offset, device=device)
    prepare_buffers(cache, slot)
    fn = step_function(decode, device)

    def step(tokens, positions):
        if decode == "compiled" and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        # A copy: a CUDA graph's replay overwrites its output in place.
        logits = fn(model, tokens, positions, slot, cache.key_valid, cache.k, cache.v).clone()
        slot.add_(1)
        return logits

    return step


def _cut_at_stop(row: list[int], stop_token_ids: Sequence[int]) -> list[int]:
    stop_set = set(stop_token_ids)
    return row[: next((i for i, t in enumerate(row) if t in stop_set), len(row))]


@torch.no_grad()
def beam_search(model: nn.Module, prompt: Sequence[int], params: SamplingParams) -> list[int]:
    """The best of `params.num_beams` beams for one prompt (stop token excluded).

    At each step the 2 x num_beams best continuations (more with several stop ids) are ranked by
    summed log-probability; those ending in a stop token, or at the length limit, become finished
    hypotheses (score / generated_length ** length_penalty) when among the top num_beams, and the
    best num_beams others continue. The search ends when no running beam can beat the worst kept
    hypothesis (judged at the current length), or at max_new_tokens.
    """
    num_beams, max_new = params.num_beams, params.max_new_tokens
    if max_new == 0:
        return []
    device = _device(model)
    cache = model.new_cache(1, len(prompt) + max_new, device=device)
    logits = model(torch.tensor([list(prompt)], device=device), **cached_inputs(model, cache, len(prompt)),
                   num_last=1)[:, -1]
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=device))
    logits = logits.expand(num_beams, -1)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)
    num_candidates = max(2, 1 + len(set(params.stop_token_ids))) * num_beams

    running = torch.empty((num_beams, 0), dtype=torch.long, device=device)
    # Every beam starts as the same prompt: only the first may propose continuations at step 1.
    running_scores = torch.full((num_beams,), -1e9, device=device)
    running_scores[0] = 0.0
    finished: list[tuple[float, list[int]]] = []
    for step in range(1, max_new + 1):
        log_probs = torch.log_softmax(logits.float(), dim=-1) + running_scores[:, None]  # (N, V)
        vocab_size = log_probs.shape[-1]
        top_scores, top_idx = torch.topk(log_probs.view(-1), num_candidates)
        beam, token = top_idx // vocab_size, top_idx % vocab_size
        hits = torch.isin(token, stop_ids) if step < max_new else torch.ones_like(token, dtype=torch.bool)
        sequences = torch.cat([running[beam], token[:, None]], dim=1)
        for j in torch.nonzero(hits[:num_beams]).flatten().tolist():
            finished.append((top_scores[j].item() / step**params.length_penalty, sequences[j].tolist()))
        # A stable sort keeps earlier hypotheses first on ties, as transformers' merge does.
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        keep = torch.topk(top_scores - hits.float() * 1e9, num_beams).indices
        running, running_scores = sequences[keep], (top_scores - hits.float() * 1e9)[keep]
        if bool(hits.all()):
            break
        best_possible = running_scores[0].item() / step**params.length_penalty
        worst_kept = finished[-1][0] if len(finished) == num_beams else -1e9
        if best_possible <= worst_kept:
            break
        cache.reorder(beam[keep])
        logits = model(running[:, -1:], **cached_inputs(model, cache, 1))[:, -1]
    return _cut_at_stop(finished[0][1], params.stop_token_ids)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, most likely first


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, up to (not including) a stop token
    text: str  # the decoded text, cut before a stop string
    finish_reason: str  # "stop" (stop token or string) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per token_ids entry, when params.logprobs is set


def generate_text(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    pad_id: int = 0,
    max_new_tokens: Sequence[int] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
    on_logprob: Callable[[int, TokenLogprob], None] | None = None,
    decode: str = "dynamic",
) -> list[Completion]:
    """Generate and detokenize, honouring stop strings; `on_text(row, chunk)` streams text, and
    `on_logprob(row, entry)` each token's log-probabilities (when `params.logprobs` is set) before
    the text it completes.

    `max_new_tokens` gives each row its own limit (at most `params.max_new_tokens`), so that
    requests with different limits can share a batch. Streamed chunks never split a character
    and hold back text that may be the start of a stop string. A row for which `cancelled(row)`
    turns True (its client went away) stops at the next step. `decode` is `generate`'s.
    """
    limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
    assert len(limits) == len(prompts) and max(limits, default=0) <= params.max_new_tokens
    decoders = [IncrementalDecoder(tokenizer, params.stop_token_ids, params.stop_strings) for _ in prompts]
    counts = [0] * len(prompts)
    entries: list[list[TokenLogprob]] = [[] for _ in prompts]
    stop_ids = set(params.stop_token_ids)

    def push(row: int, token: int, entry: TokenLogprob | None = None) -> bool:
        """Feed one token to a row's decoder; True when that row is finished."""
        counts[row] += 1
        if entry is not None and token not in stop_ids:
            entries[row].append(entry)
            if on_logprob is not None:
                on_logprob(row, entry)
        chunk = decoders[row].push(token)
        if chunk and on_text is not None:
            on_text(row, chunk)
        return decoders[row].stopped or counts[row] >= limits[row] or (cancelled is not None and cancelled(row))

    def on_tokens(step_B, active_B, logprobs_BV):
        rows = [None] * len(prompts) if logprobs_BV is None else _logprob_entries(step_B, logprobs_BV, params.logprobs)
        return [is_active and push(row, token, entry) for row, (token, is_active, entry) in
                enumerate(zip(step_B.tolist(), active_B.tolist(), rows))]

    if params.num_beams > 1:
        generated = generate(model, prompts, params, pad_id=pad_id)
        for row, row_ids in enumerate(generated):
            for token in row_ids:
                if push(row, token):
                    break
    else:
        generated = generate(model, prompts, params, pad_id=pad_id, on_tokens=on_tokens, decode=decode)
    # Rows finished by a stop string or their own limit were padded after they stopped.
    ids = [row_ids[:count] for row_ids, count in zip(generated, counts)]
    completions = []
    for row, decoder in enumerate(decoders):
        chunk = decoder.finish()
        if chunk and on_text is not None:
            on_text(row, chunk)
        stopped = decoder.stopped or len(ids[row]) < limits[row]
        logprobs = entries[row][: len(ids[row])] if params.logprobs is not None else None
        completions.append(Completion(ids[row], decoder.text, "stop" if stopped else "length", logprobs))
    return completions


def _logprob_entries(step_B: torch.Tensor, logprobs_BV: torch.Tensor, k: int) -> list[TokenLogprob]:
    chosen = logprobs_BV.gather(1, step_B[:, None]).squeeze(1).tolist()
    top_values, top_ids = logprobs_BV.topk(k, dim=-1)
    return [TokenLogprob(token, lp, list(zip(ids, values)))
            for token, lp, ids, values in zip(step_B.tolist(), chosen, top_ids.tolist(), top_values.tolist())]
