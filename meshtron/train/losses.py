"""Token-level cross entropy, summed (the caller divides by the global token count).

Logits sharded over the vocabulary by tensor parallel (a DTensor with Shard(-1)) are reduced
under `loss_parallel`, which computes the softmax statistics with all-reduces over the tp
axis instead of gathering (B, S, V) logits.

Where the output head is local (no tensor parallel), the head and the cross entropy run
together chunk by chunk over tokens (`chunked_head_nll`): the float32 logits of a whole
micro-batch (Llama-3's 128k vocabulary x 16k tokens is 8.4 GB, twice with their gradient) are
never held, only one chunk's; the backward recomputes each chunk's logits from the hidden
states.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Logit elements per chunk (tokens x vocabulary): 2**25 float32 values are 128 MiB, small
# next to the step's activations yet large enough that each chunk's matmul stays efficient.
CHUNK_ELEMENTS = 2**25


def loss_context(vocab_sharded: bool):
    """The context in which forward, loss and backward run: loss_parallel when the logits are
    vocabulary-sharded DTensors (tensor parallel), nothing otherwise."""
    return loss_parallel() if vocab_sharded else contextlib.nullcontext()


def token_cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum over tokens with label != -100 of -log p(label), computed in float32."""
    return F.cross_entropy(
        logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def num_loss_tokens(labels_BS: torch.Tensor) -> torch.Tensor:
    return (labels_BS != IGNORE_INDEX).sum()


def head_is_local(lm_head: nn.Module) -> bool:
    """Whether the chunked loss can read the head's weight directly: a plain bias-free Linear
    whose weight is not sharded by tensor parallel (a LoRA-wrapped or TP head runs its forward)."""
    return type(lm_head) is nn.Linear and lm_head.bias is None and not isinstance(lm_head.weight, DTensor)


def head_cross_entropy_sum(hidden_BSE: torch.Tensor, lm_head: nn.Module, labels_BS: torch.Tensor) -> torch.Tensor:
    """`token_cross_entropy_sum` of the head's logits, chunked where the head is local."""
    if head_is_local(lm_head):
        return chunked_head_nll(hidden_BSE, lm_head.weight, labels_BS).sum()
    return token_cross_entropy_sum(lm_head(hidden_BSE), labels_BS)


def head_token_nll(hidden_BSE: torch.Tensor, lm_head: nn.Module, labels_BS: torch.Tensor) -> torch.Tensor:
    """(B, S) float32 -log p(label) per token (0 where the label is -100), chunked where the head is
    local. cross_entropy(reduction="none") also runs on vocabulary-sharded logits under loss_parallel."""
    if head_is_local(lm_head):
        return chunked_head_nll(hidden_BSE, lm_head.weight, labels_BS)
    B, S = labels_BS.shape
    logits = lm_head(hidden_BSE)
    nll = F.cross_entropy(logits.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.full_tensor() if isinstance(nll, DTensor) else nll
    return nll.view(B, S)


def head_logits_at(hidden_BSE: torch.Tensor, lm_head: nn.Module, where_BS: torch.Tensor,
                   vocab_ids: list[int]) -> torch.Tensor:
    """(N, len(vocab_ids)) float32 logits of the tokens `vocab_ids` at the N positions where `where_BS`
    is true (a process reward model reads two tokens at each step's end). Where the head is local
    only those rows of its weight meet only those hidden states: a tenth of a percent of the full
    head's matmul on SmolLM2, and no (B, S, V) logits; otherwise the head's own forward, then the pick."""
    if head_is_local(lm_head):
        return F.linear(hidden_BSE[where_BS], lm_head.weight[vocab_ids]).float()
    logits = lm_head(hidden_BSE)
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    return logits[where_BS][:, vocab_ids].float()


def chunked_head_nll(hidden_BSE: torch.Tensor, weight_VE: torch.Tensor, labels_BS: torch.Tensor,
                     chunk_tokens: int | None = None) -> torch.Tensor:
    """(B, S) float32 -log softmax(hidden @ weight.T)[label] per token, 0 where the label is -100.

    Each chunk of tokens runs the unchunked ops (F.linear, then F.cross_entropy in float32) under
    activation checkpointing: the forward keeps only the chunk's inputs, and the backward
    recomputes one chunk's logits at a time. With one chunk and every token labelled, the bits equal the
    unchunked ones."""
    B, S, E = hidden_BSE.shape
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight_VE.shape[0])
    hidden_NE, labels_N = hidden_BSE.reshape(B * S, E), labels_BS.reshape(B * S)
    kept = None
    if hidden_NE.device.type == "cpu":
        # Only the labelled tokens meet the head: an SFT or DPO row is mostly prompt and padding (on the shipped
        # preference data about one token in eight is labelled). Counting them reads a value on the host, which
        # on a GPU would stall the queue of launched kernels every micro-batch, so there every token goes through.
        kept = (labels_N != IGNORE_INDEX).nonzero().squeeze(1)
        if len(kept) == len(labels_N):
            kept = None
        else:
            hidden_NE, labels_N = hidden_NE.index_select(0, kept), labels_N.index_select(0, kept)
    nll = [checkpoint(_head_nll, hidden_NE[s:s + chunk], weight_VE, labels_N[s:s + chunk], use_reentrant=False)
           for s in range(0, max(1, len(labels_N)), chunk)]  # no labelled token: one empty chunk keeps the graph
    nll_N = torch.cat(nll)
    if kept is not None:
        nll_N = nll_N.new_zeros(B * S).index_copy(0, kept, nll_N)
    return nll_N.view(B, S)


def _head_nll(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden_NE, weight_VE).float()
    return F.cross_entropy(logits, labels_N, ignore_index=IGNORE_INDEX, reduction="none")
