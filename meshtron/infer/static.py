"""Static-shape decode: one decode step whose every input has the same shape at every step, so
that it compiles once and replays (`torch.compile`; CUDA graphs on GPU with mode="reduce-overhead").

The cached decode of meshtron/infer/generation.py reads the keys up to the cache's offset, a Python
int: the shapes grow by one column per step and a compiled step would recompile at each. Here the
step takes the whole preallocated buffers (B, G, columns, D), the column to write (`slot`, a 0-dim
tensor) and the per-row positions; the new keys are written at `slot` in place and attention reads
all columns under a mask of fixed shape that hides those after `slot` (and the invalid ones, as
`key_valid` does for the cached decode). The prefill stays the cached forward (it runs once).

`DECODE_MODES`: "dynamic" (the cached decode), "static" (this step, eager: the reference for the
compiled one in tests) and "compiled".
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn

from meshtron.models.common.masks import AttentionMask

DECODE_MODES = ("dynamic", "static", "compiled")


def check_decode_mode(decode: str) -> None:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")


class StaticKVCache:
    """A view of preallocated buffers that the model's attention layers write at `slot`.

    The model sees offset 0 (its mask is `StepMask`, which knows the real column) and `advance`
    does nothing: the caller moves `slot` between steps, outside the compiled step.
    """

    offset = 0

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], slot: torch.Tensor):
        self.k, self.v, self.slot = k, v, slot

    def update(self, layer_id: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
        index = self.slot.view(1)
        self.k[layer_id].index_copy_(2, index, k_BGSD)
        self.v[layer_id].index_copy_(2, index, v_BGSD)
        return self.k[layer_id], self.v[layer_id]

    def advance(self, num_tokens: int) -> None:
        pass


@dataclass
class StepMask(AttentionMask):
    """One query per row at column `slot` over all columns: the cached decode's dense mask (causal,
    `key_valid`, the layer's window, a query always seeing itself) with the columns after `slot`
    hidden instead of cut off."""

    slot: torch.Tensor | None = None

    def dense(self, window: int | None, device) -> torch.Tensor:
        k_idx = torch.arange(self.kv_len, device=device)[None, :]
        visible = self.key_valid & (k_idx <= self.slot)
        if window is not None:
            visible = visible & (k_idx > self.slot - window)
        visible = visible | (k_idx == self.slot)
        return visible[:, None, None, :]  # (B, 1, 1, K)


def decode_step(model: nn.Module, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, slot: torch.Tensor,
                key_valid_BK: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor]) -> torch.Tensor:
    """The last logits (B, V) of feeding `tokens_B1` at column `slot` of the buffers `k`, `v`."""
    mask = StepMask(1, key_valid_BK.shape[1], key_valid=key_valid_BK, backend="dense", slot=slot)
    cache = StaticKVCache(k, v, slot)
    return model(tokens_B1, position_ids=positions_B1, cache=cache, mask=mask)[:, -1]


@functools.cache
def _compiled_step(mode: str | None):
    # dynamic=False: one graph per batch size and column count, each replayed as is.
    return torch.compile(decode_step, mode=mode, dynamic=False)


def step_function(decode: str, device: torch.device):
    """The decode step for `decode` ("static" or "compiled")."""
    if decode == "static":
        return decode_step
    return _compiled_step("reduce-overhead" if device.type == "cuda" else None)


def prepare_buffers(cache, slot: torch.Tensor) -> None:
    """Mark what the step mutates or reads in place as static inputs, so that CUDA graphs use these
    tensors where they are instead of copying them in at each replay."""
    if slot.device.type != "cuda":
        return
    for t in [*cache.k, *cache.v, cache.key_valid, slot]:
        torch._dynamo.mark_static_address(t)


def round_up_columns(num_tokens: int, multiple: int = 64) -> int:
    """Cache columns for `num_tokens`, rounded up so that calls of nearby lengths share one compiled step."""
    return -(-num_tokens // multiple) * multiple
