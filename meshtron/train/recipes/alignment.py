"""Alignment recipes on the one Trainer: dpo, simpo (pairwise data) and prm (step-labelled data).

Chosen and rejected responses go through the model in one concatenated forward. Losses are
summed per pair (per labelled step for prm) and the Trainer divides by the global count, so
gradient accumulation and data parallel match one big batch. Per-step metrics (rewards of
chosen and rejected, accuracy, margin, log-probs) are summed here and averaged by the Trainer.

The DPO reference is a frozen copy of the starting model ("copy"), or, for a LoRA run, the same
model with its adapters switched off ("lora", no extra memory), or its log-probs computed in one
no-grad pass over the data before training ("precomputed": no reference model while training).
`align.reference = "auto"` picks "lora" for LoRA runs and "copy" otherwise.
"""

import contextlib
import dataclasses
import functools
import logging
import time

import numpy as np
import torch
from torch import nn

from meshtron.align.losses import bradley_terry_loss, dpo_loss, preference_metrics, prm_loss, simpo_loss
from meshtron.errors import UserError
from meshtron.train.losses import head_logits_at, head_token_nll
from meshtron.train.recipes.base import Recipe

log = logging.getLogger(__name__)

IGNORE = -100
REFERENCE_KEYS = ("chosen_ref_logps", "rejected_ref_logps")


def token_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens per row of a prepared batch, and their count; the head
    and the loss run together, chunked over tokens (meshtron.train.losses)."""
    labels = batch["labels"]
    nll = model(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"],
                head=functools.partial(head_token_nll, labels_BS=labels))
    return -nll.sum(-1), (labels != IGNORE).sum(-1)


class PairwiseRecipe(Recipe):
    """Under context parallel each rank holds part of every chosen and rejected sequence (both cut
    alike): the per-sequence sums (log-probs, lengths, the score at the last token) are summed over the
    cp ranks before the preference loss, which every cp rank then computes alike and counts once."""

    data_kind = "pairwise"
    default_handler = "pairwise"

    def __init__(self, config):
        super().__init__(config)
        self.metric_sums: dict[str, torch.Tensor] = {}

    def whole_sequences(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums of this rank's part summed over the cp ranks (t itself without cp)."""
        return t if self.context_parallel is None else self.context_parallel.sum_sequences(t)

    def counted_once(self, t: torch.Tensor) -> torch.Tensor:
        """A loss or metric that every cp rank computes alike, kept on cp rank 0 only: the Trainer sums
        losses and metrics over data-parallel x cp ranks. (The other ranks' zero loss still backpropagates:
        the sum over cp ranks in `whole_sequences` hands each rank's part rank 0's gradient.)"""
        if self.context_parallel is None or self.context_parallel.cp.rank == 0:
            return t
        return t * 0

    def pair_forward(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, ...]:
        """(chosen logps, rejected logps, chosen lengths, rejected lengths) from one forward of both."""
        logps, lengths = token_logps(model, batch)
        logps, lengths = self.whole_sequences(logps), self.whole_sequences(lengths)
        n = batch["chosen_input_ids"].shape[0]
        return logps[:n], logps[n:], lengths[:n], lengths[n:]

    def num_loss_units(self, batch) -> torch.Tensor:
        return ((batch["chosen_labels"] != IGNORE).any(-1)).sum()

    def prepare_batch(self, batch) -> dict:
        """Chosen and rejected rows stacked into one model input (chosen first), prepared as one batch:
        the model runs both in one forward."""
        pair = {key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
                for key in ("input_ids", "labels", "document_ids", "position_ids")}
        # Found before a context-parallel cut, which then leaves it on the rank that holds it.
        last = last_token_index(pair["document_ids"])
        pair["last_token"] = torch.arange(pair["input_ids"].shape[1], device=last.device) == last[:, None]
        return {**batch, **super().prepare_batch(pair)}

    def _record(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = self.counted_once(value.detach().float())
            self.metric_sums[key] = self.metric_sums.get(key, torch.zeros_like(value)) + value

    def take_metrics(self) -> dict[str, torch.Tensor]:
        sums, self.metric_sums = self.metric_sums, {}
        return sums

    def _finish(self, losses, chosen, rejected, len_c, r_chosen, r_rejected) -> torch.Tensor:
        """Add the optional SFT term on chosen, record the preference metrics, sum over pairs."""
        if self.config.align.sft_weight:
            losses = losses + self.config.align.sft_weight * (-chosen / len_c.clamp(min=1))
        self._record({**preference_metrics(r_chosen, r_rejected), "logps/chosen": chosen.sum(),
                      "logps/rejected": rejected.sum()})
        return self.counted_once(losses.sum())


class WithReferenceLogps:
    """A pairwise dataset whose samples also carry their precomputed reference log-probs
    (`chosen_ref_logps`, `rejected_ref_logps`), so that every batch brings its own, whatever the
    data order, data-parallel rank or resume position."""

    def __init__(self, dataset, logps: np.ndarray) -> None:
        assert logps.shape == (len(dataset), 2)
        self.dataset, self.logps = dataset, logps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], REFERENCE_KEYS[0]: self.logps[i, 0], REFERENCE_KEYS[1]: self.logps[i, 1]}


@torch.no_grad()
def reference_logps(trainer, model: nn.Module, dataset) -> np.ndarray:
    """(len(dataset), 2) summed log-probs of every pair's chosen and rejected response under `model`.

    The data-parallel ranks split the pairs (rank r takes r, r + dp, ... of each round, the last
    round wrapping around so that every rank runs the same forwards) and sum their parts."""
    from meshtron.data.loader import collate

    n, mbs, dp_size = len(dataset), trainer.config.train.micro_batch_size, trainer.dims.dp_size
    dp_rank = trainer.meshes.dp.get_local_rank()
    logps = torch.zeros(n, 2, device=trainer.device)
    for start in range(0, n, mbs * dp_size):
        positions = start + dp_rank + dp_size * np.arange(mbs)
        batch = collate([dataset[int(p) % n] for p in positions])
        batch = trainer.recipe.prepare_batch({k: v.to(trainer.device) for k, v in batch.items()})
        with trainer.train_context():
            chosen, rejected, _, _ = trainer.recipe.pair_forward(model, batch)
        mine = positions < n  # the last round's wrapped-around rows are computed, not kept
        values = torch.stack([chosen, rejected], dim=-1).float()
        logps[torch.from_numpy(positions[mine]).to(trainer.device)] = values[torch.from_numpy(mine).to(trainer.device)]
    return trainer._dp_sum(logps).cpu().numpy()


def reshard(model: nn.Module) -> None:
    """Shard FSDP2 parameters again after forwards without a backward: the root module keeps its
    parameters unsharded after a forward (its backward would reshard them), and an optimizer built
    then would hold the unsharded copies."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class DPORecipe(PairwiseRecipe):
    name = "dpo"

    def setup(self, trainer) -> None:
        cfg = self.config.align
        mode = cfg.reference
        if mode == "auto":
            mode = "lora" if self.config.lora.rank else "copy"
        if mode == "lora" and not self.config.lora.rank:
            raise UserError("align.reference = 'lora' needs a LoRA run (lora.rank > 0); use 'copy'")
        self.reference_mode = mode
        self.reference = None
        if mode == "copy":
            self.reference = trainer.build_frozen_copy()
        elif mode == "precomputed":
            self._precompute_reference(trainer)

    def _precompute_reference(self, trainer) -> None:
        """Attach the reference log-probs to every training (and held-out) pair before the first step."""
        loader = getattr(trainer.data_loader, "loader", trainer.data_loader)  # under a PrefetchLoader
        if not hasattr(loader, "dataset"):
            raise UserError("align.reference = 'precomputed' needs pairwise data files (data.paths), not "
                            "data.mock; use 'copy'")
        start = time.perf_counter()
        if trainer.resume_from is None:
            # The policy has its starting weights now (with LoRA: the base once adapters are off).
            reference = trainer.model
        else:
            # Resuming: the policy has moved, so the starting model is rebuilt for this pass only.
            reference = trainer.build_frozen_copy()
        with self._reference_model(reference) as reference:
            loader.dataset = WithReferenceLogps(loader.dataset, reference_logps(trainer, reference, loader.dataset))
            num_pairs = len(loader.dataset)
            if trainer.eval_dataset is not None:
                trainer.eval_dataset = WithReferenceLogps(
                    trainer.eval_dataset, reference_logps(trainer, reference, trainer.eval_dataset))
                num_pairs += len(trainer.eval_dataset)
        reshard(trainer.model)
        log.info("reference log-probs of %d pairs precomputed in %.1fs", num_pairs, time.perf_counter() - start)

    @contextlib.contextmanager
    def _reference_model(self, model):
        """`model` with its LoRA adapters off (nothing to switch on a frozen copy or a full run)."""
        if not self.config.lora.rank:
            yield model
            return
        from meshtron.lora import set_lora_enabled

        set_lora_enabled(model, False)
        try:
            yield model
        finally:
            set_lora_enabled(model, True)

    def loss_sum(self, model, batch) -> torch.Tensor:
        cfg = self.config.align
        chosen, rejected, len_c, len_r = self.pair_forward(model, batch)
        if self.reference_mode == "precomputed":
            ref_chosen, ref_rejected = (batch[key].float() for key in REFERENCE_KEYS)
        else:
            with torch.no_grad(), self._reference_model(self.reference if self.reference is not None else model) as reference:
                ref_chosen, ref_rejected, _, _ = self.pair_forward(reference, batch)
        if cfg.loss_type == "ipo":  # IPO is defined on length-averaged log-probs
            args = (chosen / len_c, rejected / len_r, ref_chosen / len_c, ref_rejected / len_r)
        else:
            args = (chosen, rejected, ref_chosen, ref_rejected)
        losses, r_chosen, r_rejected = dpo_loss(*args, beta=cfg.beta, loss_type=cfg.loss_type,
                                                label_smoothing=cfg.label_smoothing)
        return self._finish(losses, chosen, rejected, len_c, r_chosen, r_rejected)


class SimPORecipe(PairwiseRecipe):
    name = "simpo"

    def loss_sum(self, model, batch) -> torch.Tensor:
        cfg = self.config.align
        chosen, rejected, len_c, len_r = self.pair_forward(model, batch)
        losses, r_chosen, r_rejected = simpo_loss(chosen, rejected, len_c.clamp(min=1), len_r.clamp(min=1),
                                                  beta=cfg.beta, gamma=cfg.simpo_gamma,
                                                  label_smoothing=cfg.label_smoothing)
        return self._finish(losses, chosen, rejected, len_c, r_chosen, r_rejected)


def last_token_index(document_ids: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: a pairwise row holds one sample, padding has its own id."""
    return (document_ids == document_ids[:, :1]).sum(-1) - 1


def sequence_rewards(recipe: PairwiseRecipe, model: nn.Module, batch: dict) -> torch.Tensor:
    """The score head's value at each row's last real token (the reward model's output)."""
    values = model(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"])
    values = values.full_tensor() if hasattr(values, "full_tensor") else values
    return recipe.whole_sequences(torch.where(batch["last_token"], values[..., 0].float(), 0.0).sum(-1))


class RewardModelRecipe(PairwiseRecipe):
    """Outcome reward model: a scalar `score` head read at the last token, Bradley-Terry loss on
    chosen vs rejected (with an optional margin). Exports as *ForSequenceClassification."""

    name = "rm"

    def model_args(self, args):
        return dataclasses.replace(args, num_labels=1)

    def loss_sum(self, model, batch) -> torch.Tensor:
        rewards = sequence_rewards(self, model, batch)
        n = batch["chosen_input_ids"].shape[0]
        chosen, rejected = rewards[:n], rewards[n:]
        losses = bradley_terry_loss(chosen, rejected, self.config.align.rm_margin)
        self._record(preference_metrics(chosen.detach(), rejected.detach()))
        return self.counted_once(losses.sum())


class PRMRecipe(Recipe):
    """Process reward model: at each labelled step position, a two-way classification between the
    tokens `align.prm_good_token` and `align.prm_bad_token` of the language-model head (as
    MindSpeed-LLM's PRM), so the model keeps the causal-LM layout and exports as one."""

    name = "prm"
    data_kind = "sft"
    default_handler = "prm"

    def __init__(self, config):
        super().__init__(config)
        self.metric_sums: dict[str, torch.Tensor] = {}
        self.token_ids: tuple[int, int] | None = None

    def setup(self, trainer) -> None:
        from transformers import AutoTokenizer

        if trainer.source.tokenizer_dir is None:
            raise UserError("the prm recipe needs a tokenizer to find its label tokens; set model.tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(trainer.source.tokenizer_dir))
        ids = []
        for text in (self.config.align.prm_good_token, self.config.align.prm_bad_token):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) != 1:
                raise UserError(f"align PRM label token {text!r} must be one token of the tokenizer; it is {encoded}")
            ids.append(encoded[0])
        self.token_ids = (ids[0], ids[1])

    def num_loss_units(self, batch) -> torch.Tensor:
        return (batch["labels"] >= 0).sum()

    def step_logits(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(good-minus-bad logit, label) at every labelled step position."""
        where = batch["labels"] >= 0
        pair = model(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"],
                     head=functools.partial(head_logits_at, where_BS=where, vocab_ids=list(self.token_ids)))
        return pair[:, 0] - pair[:, 1], batch["labels"][where]

    def loss_sum(self, model, batch) -> torch.Tensor:
        score, labels = self.step_logits(model, batch)
        losses = prm_loss(score, labels)
        correct = ((score > 0).long() == labels).float().sum()
        self.metric_sums["accuracy"] = self.metric_sums.get("accuracy", torch.zeros_like(correct)) + correct
        return losses.sum()

    def take_metrics(self) -> dict[str, torch.Tensor]:
        sums, self.metric_sums = self.metric_sums, {}
        return sums
