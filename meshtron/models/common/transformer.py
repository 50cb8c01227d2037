"""The dense decoder-only transformer behind the llama, mistral, qwen2 and qwen3 families.

Architecture: token embedding -> N x [RMSNorm -> GQA attention (RoPE, optional q/k/v bias,
optional per-head q/k RMSNorm, optional sliding window) -> residual -> RMSNorm -> gated (SwiGLU) MLP
-> residual] -> RMSNorm -> output head (optionally tied to the embedding).

Single-device code: parallelism is applied from outside by `meshtron.parallel`. The model is
meant to be built on the meta device, then materialized (`to_empty`) and either initialized
with `init_weights()` or loaded. Layers live in a ModuleDict keyed by their index so that
names stay stable when a pipeline stage keeps only some of them; a stage without the
embedding takes hidden states as input, one without the head returns hidden states.
"""

import torch
from torch import nn

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.attention import Attention, KVCache, residual_std
from meshtron.models.common.init import ParamInit, init_model
from meshtron.models.common.layers import GatedMLP, RMSNorm
from meshtron.models.common.masks import ATTENTION_BACKENDS, AttentionMask
from meshtron.models.common.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    """Pre-norm block. `mlp`: the feed-forward module (default: the gated MLP; an MoE layer in the MoE
    families). `attn`: the attention module (default: `Attention` with `attn_options`, a family's scale,
    soft-cap, rotary layout; DeepSeek's latent attention)."""

    def __init__(self, args: ModelArgs, layer_id: int, mlp: nn.Module | None = None, attn: nn.Module | None = None,
                 **attn_options):
        super().__init__()
        self.attn_norm = RMSNorm(args.dim, args.norm_eps)
        self.attn = attn or Attention(args, layer_id, **attn_options)
        self.mlp_norm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = mlp or GatedMLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std,
                                   out_std=residual_std(args))

    def forward(self, x_BSE, cos, sin, mask: AttentionMask, cache=None):
        h = x_BSE + self.attn(self.attn_norm(x_BSE), cos, sin, mask, cache)
        return h + self.mlp(self.mlp_norm(h))


class SandwichBlock(nn.Module):
    """A norm before and after both attention and the MLP (Gemma 2 and 3, GLM-4): each sublayer's output
    is normalized before it joins the residual stream. `norm` is the norm class, `activation` the gated
    MLP's; `attn_options` go to `Attention`."""

    def __init__(self, args: ModelArgs, layer_id: int, norm: type[RMSNorm] = RMSNorm, activation: str = "silu",
                 **attn_options):
        super().__init__()
        self.attn_norm = norm(args.dim, args.norm_eps)
        self.attn = Attention(args, layer_id, **attn_options)
        self.post_attn_norm = norm(args.dim, args.norm_eps)
        self.mlp_norm = norm(args.dim, args.norm_eps)
        self.mlp = GatedMLP(args.dim, args.ffn_dim, bias=args.mlp_bias, std=args.init_std, out_std=residual_std(args),
                            activation=activation)
        self.post_mlp_norm = norm(args.dim, args.norm_eps)

    def forward(self, x_BSE, cos, sin, mask: AttentionMask, cache=None):
        h = x_BSE + self.post_attn_norm(self.attn(self.attn_norm(x_BSE), cos, sin, mask, cache))
        return h + self.post_mlp_norm(self.mlp(self.mlp_norm(h)))


def positions_from_documents(document_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document start. document_ids: (B, S)."""
    B, S = document_ids.shape
    idx = torch.arange(S, device=document_ids.device).expand(B, S)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx))
    return idx - torch.cummax(start_idx, dim=1).values


class Transformer(nn.Module):
    """The decoder. A family with other parts overrides the `make_*` builders (see gemma2)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = self.make_embedding(args)
        self.rope = self.make_rope(args)
        self.layers = nn.ModuleDict({str(i): self.make_block(args, i) for i in range(args.num_layers)})
        self.norm = self.make_norm(args)
        self.lm_head = self.make_head(args)
        self.attention = "auto"  # the attention backend (models/common/masks.py), a run setting, not an arg
        self.tie_weights()

    def make_embedding(self, args: ModelArgs) -> nn.Module:
        return nn.Embedding(args.vocab_size, args.dim)

    def make_rope(self, args: ModelArgs) -> nn.Module:
        """The module that turns position ids into the (cos, sin) every block receives."""
        return RotaryEmbedding(args)

    def make_block(self, args: ModelArgs, layer_id: int) -> nn.Module:
        return TransformerBlock(args, layer_id)

    def make_norm(self, args: ModelArgs) -> nn.Module:
        return RMSNorm(args.dim, args.norm_eps)

    def make_head(self, args: ModelArgs) -> nn.Module:
        return nn.Linear(args.dim, args.num_labels or args.vocab_size, bias=False)

    def set_attention(self, backend: str) -> None:
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose from {', '.join(ATTENTION_BACKENDS)}")
        self.attention = backend

    def tie_weights(self) -> None:
        if self.args.head_is_tied and self.embed is not None and self.lm_head is not None:
            self.lm_head.weight = self.embed.weight

    def init_weights(self, seed: int | None = None, skip: frozenset[str] = frozenset()) -> int:
        """Initialize every parameter (each module its own, see `models.common.init`) and the buffers,
        in place, after `to_empty`. `skip`: names already loaded, left as they are.

        Normal(0, init_std) for projections and embeddings, the residual-stream writers scaled down,
        norms at one. With a seed, every value depends only on the seed, its tensor's name and its
        position (at every layout). Returns the number of random values this rank drew.
        """
        drawn = init_model(self, seed, frozenset(skip))
        self.init_buffers()
        return drawn

    def init_own_weights(self, init: ParamInit) -> None:
        """The embedding and the head (the blocks' modules initialize themselves)."""
        if self.embed is not None:
            init.normal_(self.embed.weight, "embed.weight", self.args.init_std)
        if self.lm_head is not None and self.lm_head.weight is not getattr(self.embed, "weight", None):
            # A tied head held apart from the embedding (a pipeline stage without it) draws the embedding's values.
            same_as = "embed.weight" if self.args.head_is_tied else None
            init.normal_(self.lm_head.weight, "lm_head.weight", self.args.init_std, same_as)
        elif self.lm_head is not None:
            init.claimed.add("lm_head.weight")

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
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """tokens: (B, S) ids (or (B, S, E) hidden states on a stage without the embedding).

        mask: the batch's `AttentionMask`, built where the batch was prepared (a recipe's
        `prepare_batch`, a generation step); every layer uses it and what it derives. Without one,
        the model describes the batch itself from `document_ids` ((B, S) ints; attention never
        crosses a change of id) and the cache, with its `attention` setting. position_ids: (B, S);
        defaults to positions restarting at each document (packed input) or continuing the cache.
        Returns logits (B, S, V), or hidden states on a stage without the head. With
        `num_last`, only the last `num_last` positions go through the final norm and head:
        generation needs one position's logits, and the head is the largest matmul of a prefill.
        With `head`, returns `head(final hidden states, lm_head)` instead of the logits: a loss
        runs the head itself, chunk by chunk (meshtron.train.losses), inside this forward so
        that FSDP still gathers and reduces the head's weight.
        """
        h = self.embed(tokens) if self.embed is not None else tokens
        B, S = h.shape[:2]
        offset = cache.offset if cache is not None else 0
        if mask is None:
            key_valid = cache.key_valid if cache is not None else None
            mask = AttentionMask.for_batch(S, document_ids, offset, key_valid, self.attention)
        elif document_ids is not None:
            raise ValueError("give the batch's document_ids through its mask (AttentionMask.for_batch), not both")
        elif (mask.q_len, mask.offset) != (S, offset):
            raise ValueError(f"the mask describes {mask.q_len} queries from slot {mask.offset}, the forward has {S} "
                             f"from slot {offset}; build it for this batch and cache")
        if position_ids is None:
            if mask.document_ids is not None:
                position_ids = positions_from_documents(mask.document_ids)
            else:
                position_ids = torch.arange(offset, offset + S, device=h.device).expand(B, S)
        cos, sin = self.rope(position_ids, h.dtype)
        for layer in self.layers.values():
            h = layer(h, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(S)
        if num_last is not None:
            h = h[:, -num_last:]
        if self.norm is not None:
            h = self.norm(h)
        if self.lm_head is None:
            return h
        return head(h, self.lm_head) if head is not None else self.lm_head(h)

    def new_cache(self, batch_size: int, max_len: int, device=None) -> KVCache:
        return KVCache(self.args.num_layers, batch_size, max_len, device=device)
