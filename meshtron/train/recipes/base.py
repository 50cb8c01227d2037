"""The hooks a recipe gives the Trainer.

A recipe returns an *unnormalized* loss sum and the number of units it sums over (tokens for
language-model losses, samples for pairwise ones). The Trainer adds the units over all
micro-batches and data-parallel ranks of a step and divides by that global count, so that
gradient accumulation and data parallel give the gradients of one big batch (principle 5).
"""

import torch
from torch import nn

from meshtron.config import JobConfig
from meshtron.models.common.masks import AttentionMask


class Recipe:
    name: str
    data_kind: str  # what meshtron.data.loader.build_dataset reads: pretrain | sft | pairwise
    default_handler: str  # meshtron preprocess handler for raw files

    # Set by the Trainer under context parallel (meshtron.parallel.cp): prepare_batch then cuts each
    # batch to this rank's part of the sequences.
    context_parallel = None
    trains_mtp = False  # whether loss_sum runs multi-token prediction (model.mtp_loss_weight)

    def __init__(self, config: JobConfig):
        self.config = config

    def num_loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """How many units this micro-batch's loss sums over."""
        raise NotImplementedError

    def prepare_batch(self, batch: dict[str, torch.Tensor]) -> dict:
        """The batch as the model takes it: its position ids (restarting at each document unless
        data.reset_position_ids is false) and the description of its attention mask (`mask`, with
        the run's model.attention kernel), beside its tensors. Called once per batch by whatever
        forms the model's batch (the micro-batch loop, the pipeline runner for a step's micro-batches
        together, evaluation); `loss_sum` and `pipeline_inputs` take prepared batches. Under context
        parallel, the prepared batch is this rank's part of the sequences, its mask a description of
        where they sit in the whole (positions and masks come from the whole sequences first)."""
        input_ids, document_ids = batch["input_ids"], batch["document_ids"]
        B, S = input_ids.shape
        position_ids = batch["position_ids"]
        if not self.config.data.reset_position_ids:
            position_ids = torch.arange(S, device=input_ids.device).expand(B, S)
        mask = AttentionMask.for_batch(S, document_ids, backend=self.config.model.attention)
        prepared = {**batch, "position_ids": position_ids, "mask": mask}
        if self.context_parallel is not None:
            return self.context_parallel.shard_batch(prepared)
        return prepared

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward `batch` and return the summed loss (a scalar)."""
        raise NotImplementedError

    supports_pipeline = False
    plots: tuple[tuple[str, str], ...] = ()  # (metric, held-out metric) drawn to OUTPUT_DIR/<metric>.png beside the loss

    def pipeline_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[tuple, dict, torch.Tensor]:
        """Under pipeline parallel: (positional inputs of the first stage, keyword inputs of every
        stage, the target the last stage's loss function gets)."""
        raise NotImplementedError

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Under pipeline parallel: the summed loss of one micro-batch from the last stage's output."""
        raise NotImplementedError

    def model_args(self, args):
        """The model this recipe trains, given the source's args (e.g. a score head for rm)."""
        return args

    def checkpoint_states(self) -> dict:
        """Stateful parts of the recipe's own to checkpoint with the run (ppo: its critic and optimizer)."""
        return {}

    def setup(self, trainer) -> None:
        """Build what the recipe needs beside the model (a reference model, label token ids)."""

    def next_batches(self, trainer) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of the next optimizer step, on the device: the next grad_accum_steps of
        the data loader (an online recipe makes its own, e.g. by generating)."""
        return [{k: v.to(trainer.device) for k, v in next(trainer.data_iter).items()}
                for _ in range(trainer.grad_accum_steps)]

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the step just taken that the recipe reduced over all ranks itself (an online
        recipe's rollout statistics), then reset."""
        return {}

    def evaluate(self, trainer) -> dict[str, float] | None:
        """The held-out metrics when the recipe measures them its own way; None: the Trainer's loss."""
        return None

    def take_metrics(self) -> dict[str, torch.Tensor]:
        """Recipe metrics summed over the micro-batches since the last call (the Trainer divides
        them by the global number of loss units), then reset."""
        return {}
