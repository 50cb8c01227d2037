"""Grouped-query attention (its kernel chosen per batch by models/common/masks.py) and the KV
cache used for generation.

Shapes: B batch, S query length, K key length, H query heads, G key/value heads, D head_dim.
Head counts are read from the projected tensors, not from the args, so that a
tensor-parallel plan that shards the projections by heads needs no change here.
"""

import math

import torch
from torch import nn

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.init import ParamInit
from meshtron.models.common.layers import RMSNorm
from meshtron.models.common.masks import AttentionMask, attend
from meshtron.models.common.rope import ROTARY_LAYOUTS, apply_rotary


class KVCache:
    """Static per-layer key/value buffers of shape (B, G, max_len, D), filled left to right.

    `offset` is the first free slot; `key_valid` (B, max_len) marks slots holding real tokens
    (False for left padding of batched prompts). Buffers are allocated on first write so that
    they take the dtype, device and (tensor-parallel) local head count of the keys.
    """

    def __init__(self, num_layers: int, batch_size: int, max_len: int, device=None):
        self.max_len = max_len
        self.offset = 0
        self.key_valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer_id: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor):
        B, G, S, D = k_BGSD.shape
        end = self.offset + S
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        if self.k[layer_id] is None:
            # v's width may differ from k's (latent attention caches its latent as k, its rotary key as v).
            self.k[layer_id] = torch.zeros((B, G, self.max_len, D), dtype=k_BGSD.dtype, device=k_BGSD.device)
            self.v[layer_id] = torch.zeros((B, G, self.max_len, v_BGSD.shape[-1]), dtype=v_BGSD.dtype,
                                           device=v_BGSD.device)
        self.k[layer_id][:, :, self.offset : end] = k_BGSD
        self.v[layer_id][:, :, self.offset : end] = v_BGSD
        return self.k[layer_id][:, :, :end], self.v[layer_id][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.offset += num_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search)."""
        self.key_valid = self.key_valid[index]
        self.k = [None if t is None else t[index] for t in self.k]
        self.v = [None if t is None else t[index] for t in self.v]


def residual_std(args: ModelArgs) -> float:
    """The init std of projections that write into the residual stream (attention out, MLP down): scaled
    by 1/sqrt(2 * num_layers) as in Megatron-LM, so the stream's variance does not grow with depth."""
    return args.init_std / math.sqrt(2 * args.num_layers)


class AttentionCore(nn.Module):
    """The attention core, a module of its own so that selective recompute can wrap it. The kernel is
    chosen per batch from the mask description (see models/common/masks.py)."""

    def __init__(self, window: int | None, scale: float | None = None, softcap: float | None = None):
        super().__init__()
        self.window, self.scale, self.softcap = window, scale, softcap

    def forward(self, q_BHSD, k_BGKD, v_BGKD, mask: AttentionMask) -> torch.Tensor:
        return attend(q_BHSD, k_BGKD, v_BGKD, mask, self.window, mask.backend, self.scale, self.softcap)


class Attention(nn.Module):
    """GQA with RoPE; `scale` (default 1/sqrt(head_dim)) and `softcap` of the scores for families that set them.

    `rotary`: which dims RoPE pairs ("half" or "interleaved", see models/common/rope.py), or None for
    a layer without positions (SmolLM3's NoPE layers). `qk_norm`: the class of the per-head q/k norms
    when `args.qk_norm` is set (Gemma 3 scales them by (1 + w))."""

    def __init__(self, args: ModelArgs, layer_id: int, scale: float | None = None, softcap: float | None = None,
                 rotary: str | None = "half", qk_norm: type[RMSNorm] = RMSNorm):
        super().__init__()
        assert rotary is None or rotary in ROTARY_LAYOUTS, rotary
        self.layer_id = layer_id
        self.rotary = rotary
        self.head_dim = args.head_dim
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.dim, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, args.dim, bias=args.out_bias)
        if args.qk_norm:
            self.q_norm = qk_norm(args.head_dim, args.norm_eps)
            self.k_norm = qk_norm(args.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.core = AttentionCore(args.sliding_window if args.layer_uses_window(layer_id) else None, scale, softcap)
        self.std, self.out_std = args.init_std, residual_std(args)

    def init_weights(self, init: ParamInit) -> None:
        for name in ("q_proj", "k_proj", "v_proj"):
            init.linear(getattr(self, name), name, self.std)
        init.linear(self.o_proj, "o_proj", self.out_std)

    def project(self, x_BSE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, S, H, D), k and v (B, S, G, D), q and k normed per head where the family does (a family
        whose q/k norms span other dims overrides this)."""
        B, S, _ = x_BSE.shape
        q = self.q_proj(x_BSE).view(B, S, -1, self.head_dim)
        k = self.k_proj(x_BSE).view(B, S, -1, self.head_dim)
        v = self.v_proj(x_BSE).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x_BSE, cos, sin, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSE.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x_BSE))
        if self.rotary is not None:
            q, k = apply_rotary(q, k, cos, sin, self.rotary)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = self.core(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
