"""Token-level cross entropy, summed (the caller divides by the global token count).

Logits sharded over the vocabulary by tensor parallel (a DTensor with Shard(-1)) are reduced
under `loss_parallel`, which computes the softmax statistics with all-reduces over the tp
axis instead of gathering (B, S, V) logits.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.distributed.tensor.parallel import loss_parallel

IGNORE_INDEX = -100


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
