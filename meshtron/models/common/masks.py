"""Attention masks described, not materialized, and the backends that turn a description into a
kernel call.

`AttentionMask` says what a batch may attend to: always causal, plus packed documents
(`document_ids`, kept only when some row really has a boundary), padded keys (`key_valid`, left
padding of batched prompts) and the slot of the first query (`offset`, with a KV cache). The
per-layer parts (a sliding window) come from the layer. Backends (`ATTENTION_BACKENDS`):

- `sdpa`: causal rows take SDPA's `is_causal` fast path (Flash on GPU); anything else a dense mask;
- `flex`: FlexAttention block masks (`torch.nn.attention.flex_attention`), whose cost grows with
  the unmasked blocks, i.e. with the documents' lengths, not S^2; compiled on GPU. torch has no
  FlexAttention backward on CPU, so on CPU it serves forward-only passes;
- `varlen`: the variable-length path. On CUDA in float16/bfloat16 the row's documents go to torch's
  Flash variable-length kernel (`torch.nn.attention.varlen.varlen_attn`) in one call, packed with
  their cumulative lengths; elsewhere one causal SDPA call per document. Cost and memory grow with
  the documents' lengths (the sum of their squares on the fallback);
- `dense`: the (B, 1, S, K) boolean mask, always (the fallback, and the reference in tests);
- `auto`: causal fast path without boundaries; packed documents through `flex` on CUDA and
  `varlen` elsewhere; a dense mask for what those cannot express (a cache, padding).

A description is built where a batch is prepared (the recipe's `prepare_batch` in training and
evaluation, each cached step of generation) and handed to the model (`model(tokens, mask=...)`).
What it derives (dense masks, block masks, document spans) is built on first use and then shared
by every layer, and by every copy of the description: FSDP copies dataclass inputs for each module
it wraps. Under pipeline parallel the schedule splits a step's description into its micro-batches'
(the description is a pytree whose leaves are its tensors). Under context parallel a rank's
description carries its place in the whole sequence (`context`), and attention goes through it
(meshtron.parallel.cp).
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

ATTENTION_BACKENDS = ("auto", "sdpa", "flex", "varlen", "dense")


class DerivedMasks:
    """What one description derives, by key ("dense" / "block" / "spans", window). Not a container
    that FSDP's input casting rebuilds, so every copy of the description shares it."""

    def __init__(self):
        self.built: dict[tuple, object] = {}

    def get(self, key: tuple, build):
        if key not in self.built:
            self.built[key] = build()
        return self.built[key]


@dataclass
class AttentionMask:
    q_len: int
    kv_len: int
    offset: int = 0
    document_ids: torch.Tensor | None = None  # (B, S), only with a boundary in some row
    key_valid: torch.Tensor | None = None  # (B, >=K)
    backend: str = "auto"  # one of ATTENTION_BACKENDS: the run's `model.attention` setting
    # Under context parallel (meshtron.parallel.cp): this rank's place in the whole sequence, which
    # attention then spans; q_len and kv_len are this rank's share.
    context: object = None
    derived: DerivedMasks = field(default_factory=DerivedMasks, repr=False, compare=False)

    @classmethod
    def for_batch(cls, q_len: int, document_ids: torch.Tensor | None = None, offset: int = 0,
                  key_valid: torch.Tensor | None = None, backend: str = "auto") -> "AttentionMask":
        """The description of one batch. Rows that are one document each need no document mask."""
        if document_ids is not None and not bool((document_ids[:, 1:] != document_ids[:, :-1]).any()):
            document_ids = None
        return cls(q_len, offset + q_len, offset, document_ids, key_valid, backend)

    @property
    def is_causal(self) -> bool:
        """Plain causal over the whole row: what SDPA's fast path computes."""
        return (self.document_ids is None and self.key_valid is None and self.offset == 0
                and self.q_len == self.kv_len and self.context is None)

    def dense(self, window: int | None, device) -> torch.Tensor:
        return self.derived.get(("dense", window), lambda: build_attention_mask(
            self.q_len, self.kv_len, self.offset, self.document_ids, self.key_valid, window, device))

    def block_mask(self, window: int | None, batch_size: int, device):
        return self.derived.get(("block", window), lambda: _block_mask(self, window, batch_size, device))

    def document_spans(self) -> list[list[tuple[int, int]]] | None:
        """(start, end) of each document of each row; None without `document_ids` (a row is one document)."""
        return self.derived.get(("spans", None), lambda: _document_spans(self.document_ids, self.q_len))


def _flatten(mask: AttentionMask):
    # The context parallel description is a child: the whole sequences' document ids split by rows too.
    return [mask.document_ids, mask.key_valid, mask.context], (mask.q_len, mask.kv_len, mask.offset, mask.backend)


def _unflatten(children, aux) -> AttentionMask:
    q_len, kv_len, offset, backend = aux
    return AttentionMask(q_len, kv_len, offset, children[0], children[1], backend, children[2])


# A pytree, so that the pipeline schedule splits a step's description by rows like the step's tensors.
pytree.register_pytree_node(AttentionMask, _flatten, _unflatten,
                            serialized_type_name="meshtron.models.common.masks.AttentionMask")


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


def _block_mask(mask: AttentionMask, window: int | None, batch_size: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    assert mask.key_valid is None and mask.offset == 0, "block masks describe uncached, unpadded forwards"
    docs = mask.document_ids

    def mask_mod(b, h, q_idx, kv_idx):
        visible = kv_idx <= q_idx
        if window is not None:
            visible = visible & (kv_idx > q_idx - window)
        if docs is not None:
            visible = visible & (docs[b, q_idx] == docs[b, kv_idx])
        return visible

    rows = batch_size if docs is not None else None
    return create_block_mask(mask_mod, rows, None, mask.q_len, mask.kv_len, device=device)


def attend(q_BHSD: torch.Tensor, k_BGKD: torch.Tensor, v_BGKD: torch.Tensor, mask: AttentionMask,
           window: int | None, backend: str, scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention of q over k/v under `mask` (+ this layer's `window`), through `backend`.

    `scale` replaces 1/sqrt(head_dim); `softcap` caps the scores at +-softcap with tanh (Gemma 2),
    which SDPA cannot: then flex applies it as a score modification, and the other backends compute
    the scores in eager math under the dense mask.
    """
    if mask.context is not None:
        return mask.context.attend(q_BHSD, k_BGKD, v_BGKD, window, scale, softcap)
    gqa = q_BHSD.shape[1] != k_BGKD.shape[1]
    if softcap is not None and backend != "flex":
        return _softcapped(q_BHSD, k_BGKD, v_BGKD, mask.dense(window, q_BHSD.device), scale, softcap)
    if window is None and mask.is_causal and backend != "dense":
        return F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, is_causal=True, scale=scale, enable_gqa=gqa)
    if backend == "auto":
        uncached = mask.key_valid is None and mask.offset == 0
        backend = ("flex" if q_BHSD.is_cuda else "varlen") if uncached else "dense"
    if backend == "flex":
        block = mask.block_mask(window, q_BHSD.shape[0], q_BHSD.device)
        score_mod = None
        if softcap is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                return softcap * torch.tanh(score / softcap)
        return _flex_attention(q_BHSD.is_cuda)(q_BHSD, k_BGKD, v_BGKD, score_mod=score_mod, block_mask=block,
                                               scale=scale, enable_gqa=gqa)
    if backend == "varlen" and mask.key_valid is None and mask.offset == 0:
        kernel = _cuda_varlen_kernel() if q_BHSD.is_cuda and q_BHSD.dtype in (torch.float16, torch.bfloat16) else None
        if kernel is not None and (window is None or "window_size" in kernel.params):
            return packed_varlen(q_BHSD, k_BGKD, v_BGKD, mask, window, scale, kernel)
        return _per_document(q_BHSD, k_BGKD, v_BGKD, mask.document_spans(), window, gqa, scale)
    return F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, attn_mask=mask.dense(window, q_BHSD.device),
                                          scale=scale, enable_gqa=gqa)


def _softcapped(q_BHSD, k_BGKD, v_BGKD, mask, scale, softcap) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap) under `mask`) v, the softmax in float32."""
    groups = q_BHSD.shape[1] // k_BGKD.shape[1]
    k, v = k_BGKD.repeat_interleave(groups, dim=1), v_BGKD.repeat_interleave(groups, dim=1)
    scores = q_BHSD @ k.transpose(-1, -2) * (scale if scale is not None else q_BHSD.shape[-1] ** -0.5)
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        S, K = scores.shape[-2:]
        mask = torch.ones(S, K, dtype=torch.bool, device=scores.device).tril(K - S)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_BHSD.dtype) @ v


@functools.cache
def _flex_attention(compiled: bool):
    """FlexAttention, compiled into one fused kernel on GPU (eager it materializes the scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention) if compiled else flex_attention


@dataclass(frozen=True)
class VarlenKernel:
    """torch's variable-length attention, called the way this torch release takes it: its arguments
    changed between releases (2.9: `is_causal`; 2.10: `scale` and `window_size`; 2.12: `enable_gqa`)."""

    fn: object
    params: frozenset

    def __call__(self, q_TGD, k_TGD, v_TGD, cu_seq, max_len: int, window: int | None, scale: float | None):
        kwargs = {}
        if scale is not None and "scale" not in self.params:
            q_TGD = q_TGD * (scale * q_TGD.shape[-1] ** 0.5)  # the kernel's own scale is 1/sqrt(D)
        elif scale is not None:
            kwargs["scale"] = scale
        if "window_size" in self.params:
            # (left, right) keys around each query: (-1, 0) is causal; our window counts the query itself.
            kwargs["window_size"] = (window - 1 if window is not None else -1, 0)
        else:
            kwargs["is_causal"] = True
        if q_TGD.shape[1] != k_TGD.shape[1]:
            if "enable_gqa" in self.params:
                kwargs["enable_gqa"] = True
            else:
                groups = q_TGD.shape[1] // k_TGD.shape[1]
                k_TGD, v_TGD = k_TGD.repeat_interleave(groups, dim=1), v_TGD.repeat_interleave(groups, dim=1)
        return self.fn(q_TGD, k_TGD, v_TGD, cu_seq, cu_seq, max_len, max_len, **kwargs)


@functools.cache
def _cuda_varlen_kernel() -> VarlenKernel | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # a torch release without it
        return None
    import inspect

    return VarlenKernel(varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))


def packed_varlen(q_BHSD, k_BGKD, v_BGKD, mask: AttentionMask, window, scale, kernel) -> torch.Tensor:
    """Every document of every row in one variable-length kernel call: the rows laid end to end as
    (B * S, heads, D) and each document's start in `cu_seq` (int32, as the kernel takes it; built
    once per batch and shared by the layers)."""
    B, H, S, D = q_BHSD.shape
    cu_seq, max_len = mask.derived.get(("cu_seq", B), lambda: _cumulative_starts(mask.document_spans(), B, S,
                                                                                 q_BHSD.device))
    q, k, v = (t.transpose(1, 2).reshape(B * S, t.shape[1], D) for t in (q_BHSD, k_BGKD, v_BGKD))
    out = kernel(q, k, v, cu_seq, max_len, window, scale)
    return out.reshape(B, S, H, D).transpose(1, 2)


def _cumulative_starts(spans, B: int, S: int, device) -> tuple[torch.Tensor, int]:
    spans = spans if spans is not None else [[(0, S)]] * B
    bounds = [b * S + start for b, row in enumerate(spans) for start, _ in row] + [B * S]
    return (torch.tensor(bounds, dtype=torch.int32, device=device),
            max(end - start for row in spans for start, end in row))


def _per_document(q_BHSD, k_BGKD, v_BGKD, spans, window, gqa, scale) -> torch.Tensor:
    """One causal SDPA call per document span of each row (`spans` None: a row is one document)."""
    B, _, S, _ = q_BHSD.shape
    out = torch.empty_like(q_BHSD)
    for b in range(B):
        for start, end in spans[b] if spans is not None else [(0, S)]:
            q, k, v = (t[b:b + 1, :, start:end] for t in (q_BHSD, k_BGKD, v_BGKD))
            local = build_attention_mask(end - start, end - start, window=window, device=q.device)
            out[b:b + 1, :, start:end] = F.scaled_dot_product_attention(
                q, k, v, attn_mask=local, is_causal=local is None, scale=scale, enable_gqa=gqa)
    return out


def _document_spans(document_ids: torch.Tensor | None, length: int) -> list[list[tuple[int, int]]] | None:
    if document_ids is None:
        return None
    starts = [[0] for _ in range(document_ids.shape[0])]
    # One host sync for the whole batch: the (row, column) of every change of id.
    for row, col in torch.nonzero(document_ids[:, 1:] != document_ids[:, :-1]).tolist():
        starts[row].append(col + 1)
    return [list(zip(row, row[1:] + [length])) for row in starts]
