"""Grouped-query attention through torch SDPA, attention masks for packed documents and sliding
windows, and the KV cache used for generation.

Shapes: B batch, S query length, K key length, H query heads, G key/value heads, D head_dim.
Head counts are read from the projected tensors, not from the args, so that a
tensor-parallel plan that shards the projections by heads needs no change here.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.init import ParamInit
from meshtron.models.common.layers import RMSNorm
from meshtron.models.common.rope import apply_rotary


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
            shape = (B, G, self.max_len, D)
            self.k[layer_id] = torch.zeros(shape, dtype=k_BGSD.dtype, device=k_BGSD.device)
            self.v[layer_id] = torch.zeros(shape, dtype=v_BGSD.dtype, device=v_BGSD.device)
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


def build_attention_mask(
    q_len: int,
    kv_len: int,
    offset: int = 0,
    document_ids: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    window: int | None = None,
    device=None,
) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, S, K), True where a query may attend; None means plain causal.

    Query i sits in slot offset + i. A key is visible when it is not in the future, lies in the
    same document (`document_ids`, (B, S), packed training without a cache), is a real token
    (`key_valid`, (B, >=K)) and, with a window, fewer than `window` slots back.
    """
    if document_ids is None and key_valid is None and window is None and offset == 0 and q_len == kv_len:
        return None
    q_idx = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_idx = torch.arange(kv_len, device=device)[None, :]
    mask = (k_idx <= q_idx)[None]  # (1, S, K)
    if window is not None:
        mask = mask & (k_idx > q_idx - window)[None]
    if document_ids is not None:
        assert offset == 0 and q_len == kv_len, "document masks apply to uncached forwards"
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, :kv_len]
        # A left-padding query would otherwise see no key at all and turn the softmax into NaN.
        mask = mask | (k_idx == q_idx)[None]
    return mask[:, None]


def residual_std(args: ModelArgs) -> float:
    """The init std of projections that write into the residual stream (attention out, MLP down): scaled
    by 1/sqrt(2 * num_layers) as in Megatron-LM, so the stream's variance does not grow with depth."""
    return args.init_std / math.sqrt(2 * args.num_layers)


class SDPA(nn.Module):
    """The attention core, a module of its own so that selective recompute can wrap it."""

    def forward(self, q_BHSD, k_BGKD, v_BGKD, mask) -> torch.Tensor:
        enable_gqa = q_BHSD.shape[1] != k_BGKD.shape[1]
        return F.scaled_dot_product_attention(
            q_BHSD, k_BGKD, v_BGKD, attn_mask=mask, is_causal=mask is None, enable_gqa=enable_gqa
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = args.head_dim
        self.use_window = args.layer_uses_window(layer_id)
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.dim, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, args.dim, bias=args.out_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.core = SDPA()
        self.std, self.out_std = args.init_std, residual_std(args)

    def init_weights(self, init: ParamInit) -> None:
        for name in ("q_proj", "k_proj", "v_proj"):
            init.linear(getattr(self, name), name, self.std)
        init.linear(self.o_proj, "o_proj", self.out_std)

    def forward(self, x_BSE, cos, sin, masks: dict, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSE.shape
        q = self.q_proj(x_BSE).view(B, S, -1, self.head_dim)
        k = self.k_proj(x_BSE).view(B, S, -1, self.head_dim)
        v = self.v_proj(x_BSE).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = self.core(q, k, v, masks["window" if self.use_window else "full"])
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
