"""The dense decoder-only transformer behind the llama, mistral, qwen2 and qwen3 families.

Architecture: token embedding -> N x [RMSNorm -> GQA attention (RoPE, optional q/k/v bias,
optional per-head q/k RMSNorm, optional sliding window) -> residual -> RMSNorm -> SwiGLU MLP
-> residual] -> RMSNorm -> output head (optionally tied to the embedding).

Single-device code: parallelism is applied from outside by `meshtron.parallel`. The model is
meant to be built on the meta device, then materialized (`to_empty`) and either initialized
with `init_weights()` or loaded. Layers live in a ModuleDict keyed by their index so that
names stay stable when a pipeline stage keeps only some of them; a stage without the
embedding takes hidden states as input, one without the head returns hidden states.
"""

import math
import zlib

import torch
from torch import nn

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.attention import Attention, KVCache, build_attention_mask
from meshtron.models.common.layers import RMSNorm, SwiGLU
from meshtron.models.common.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = SwiGLU(args.dim, args.ffn_dim, bias=args.mlp_bias)

    def forward(self, x_BSE, cos, sin, masks, cache=None):
        h = x_BSE + self.attn(self.attn_norm(x_BSE), cos, sin, masks, cache)
        return h + self.mlp(self.mlp_norm(h))


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start. document_ids: (B, S)."""
    B, S = document_ids.shape
    idx = torch.arange(S, device=document_ids.device).expand(B, S)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, i) for i in range(args.num_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.num_labels or args.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.args.tie_embeddings and not self.args.num_labels and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Initialize every parameter and buffer in place (after `to_empty`).

        Normal(0, init_std) for projections and embeddings; the projections that write into the
        residual stream (o_proj, down_proj) are scaled by 1/sqrt(2 * num_layers) as in Megatron-LM.
        With a seed, every module's values depend only on the seed and the module's name.
        """
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.num_layers)
        for name, module in self.named_modules():
            # One generator per module, seeded by its name: a pipeline stage holding some of the
            # layers draws for them exactly what the whole model draws.
            # A tied head (its own parameter on a pipeline stage without the embedding) draws the embedding's values.
            tied_head = name == "lm_head" and self.args.tie_embeddings and not self.args.num_labels
            gen = module_generator(seed, "embed" if tied_head else name)
            if isinstance(module, nn.Linear):
                s = out_std if name.endswith(("o_proj", "down_proj")) else std
                _normal_(module.weight, s, gen)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                _normal_(module.weight, std, gen)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.init_buffers()

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE frequencies) after `to_empty` and re-tie weights."""
        self.rope.reset_parameters()
        self.tie_weights()

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        num_last: int | None = None,
        head=None,
    ) -> torch.Tensor:
        """tokens: (B, S) ids (or (B, S, E) hidden states on a stage without the embedding).

        position_ids: (B, S); defaults to positions restarting at each document (packed input)
        or continuing the cache. document_ids: (B, S) ints; attention never crosses a change of
        id. Returns logits (B, S, V), or hidden states on a stage without the head. With
        `num_last`, only the last `num_last` positions go through the final norm and head:
        generation needs one position's logits, and the head is the largest matmul of a prefill.
        With `head`, returns `head(final hidden states, lm_head)` instead of the logits: a loss
        runs the head itself, chunk by chunk (meshtron.train.losses), inside this forward so
        that FSDP still gathers and reduces the head's weight.
        """
        h = self.embed(tokens) if self.embed is not None else tokens
        B, S = h.shape[:2]
        offset = cache.offset if cache is not None else 0
        if position_ids is None:
            if document_ids is not None:
                position_ids = positions_from_documents(document_ids)
            else:
                position_ids = torch.arange(offset, offset + S, device=h.device).expand(B, S)
        cos, sin = self.rope(position_ids, h.dtype)
        masks = self._masks(S, offset, document_ids, cache, h.device)
        for layer in self.layers.values():
            h = layer(h, cos, sin, masks, cache)
        if cache is not None:
            cache.advance(S)
        if num_last is not None:
            h = h[:, -num_last:]
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is None:
            return h
        return head(h, self.lm_head) if head is not None else self.lm_head(h)

    def _masks(self, S, offset, document_ids, cache, device) -> dict:
        key_valid = cache.key_valid if cache is not None else None
        common = dict(
            q_len=S, kv_len=offset + S, offset=offset, document_ids=document_ids, key_valid=key_valid, device=device
        )
        masks = {"full": build_attention_mask(**common)}
        if self.args.sliding_window is not None:
            masks["window"] = build_attention_mask(**common, window=self.args.sliding_window)
        return masks

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        return KVCache(self.args.num_layers, batch_size, max_len, device=device)


def module_generator(seed: int | None, name: str) -> torch.Generator | None:
    """A CPU generator seeded by `seed` and a module name (None without a seed)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator | None) -> None:
    if gen is None:
        nn.init.normal_(t, 0.0, std)
    else:
        # Draw on CPU so that a seed gives the same weights on any device.
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))
