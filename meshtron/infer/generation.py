"""KV-cache generation: prefill the prompts once, then decode one token per step.

Prompts of different lengths are left-padded into one batch; the cache's `key_valid` hides the
padding and each row's position ids count only its real tokens, so a batched prompt gives the
same tokens as the prompt alone. Sampling follows transformers' order of logits processors:
repetition penalty, temperature, top-k, top-p.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    seed: int | None = None

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


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    pad_id: int = 0,
    on_tokens: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts; returns the new tokens per prompt (stop token excluded).

    `on_tokens(step_tokens_B, active_B)` is called after each decode step (for streaming).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, L), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
        valid[i, L - len(p) :] = True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(B, L + params.max_new_tokens, device=device)
    cache.key_valid[:, :L] = valid

    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop_ids = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=device)
    seen = torch.zeros((B, model.args.vocab_size), dtype=torch.bool, device=device)
    seen[torch.arange(B, device=device)[:, None].expand(B, L)[valid], tokens[valid]] = True
    out = torch.empty((B, 0), dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1] + 1

    logits = model(tokens, position_ids=positions, cache=cache)[:, -1]
    for _ in range(params.max_new_tokens):
        step = next_tokens(process_logits(logits, params, seen), params, generator)
        step = torch.where(active, step, torch.full_like(step, pad_id))
        out = torch.cat([out, step[:, None]], dim=1)
        seen[torch.arange(B, device=device), step] = True
        if on_tokens is not None:
            on_tokens(step, active.clone())
        active = active & ~torch.isin(step, stop_ids)
        if not active.any() or out.shape[1] == params.max_new_tokens:
            break
        logits = model(step[:, None], position_ids=next_pos[:, None], cache=cache)[:, -1]
        next_pos = next_pos + 1

    results = []
    stop_set = set(params.stop_token_ids)
    for row in out.tolist():
        kept = []
        for t in row:
            if t in stop_set:
                break
            kept.append(t)
        results.append(kept)
    return results
