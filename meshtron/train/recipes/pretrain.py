"""Pretraining: next-token loss over packed documents.

Attention never crosses a document boundary (the batch's document_ids, described in its mask
when the batch is prepared); positions restart at each document unless data.reset_position_ids
is false.
"""

import torch
from torch import nn

import functools

from meshtron.train.losses import head_cross_entropy_sum, num_loss_tokens, token_cross_entropy_sum
from meshtron.train.recipes.base import Recipe


class PretrainRecipe(Recipe):
    name = "pretrain"
    data_kind = "pretrain"
    default_handler = "pretrain"

    def num_loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return num_loss_tokens(batch["labels"])

    trains_mtp = True  # runs a model's multi-token prediction modules (model.mtp_loss_weight)

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        args, kwargs, target = self.pipeline_inputs(batch)
        if self.config.model.mtp_loss_weight and torch.is_grad_enabled():  # training, not evaluation
            kwargs["mtp_labels"] = target  # the Trainer takes the MTP losses (take_mtp_loss_sums)
        # The head and the loss run together, chunked over tokens (meshtron.train.losses).
        return model(*args, **kwargs, head=functools.partial(head_cross_entropy_sum, labels_BS=target))

    supports_pipeline = True

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict, torch.Tensor]:
        return (batch["input_ids"],), {"position_ids": batch["position_ids"], "mask": batch["mask"]}, batch["labels"]

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_cross_entropy_sum(output, target)

