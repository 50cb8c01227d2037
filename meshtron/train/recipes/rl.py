"""Online reinforcement learning on the one Trainer: grpo (with the dapo, dr_grpo and bnpo losses).

Every `rl.updates_per_rollout` steps the policy itself (the training model, same ranks, same
weights) generates `rl.group_size` completions for each of this rank's prompts with meshtron's
KV-cache generation; the reward functions score them, and each completion's advantage is its
reward against its group's (a group stays on one rank, so no exchange is needed). The step then
trains on those completions as micro-batches of `train.micro_batch_size` rows, through the
Trainer's normal loop (gradient accumulation, data parallel, clipping, checkpoints).

Under FSDP every forward gathers the parameters with a collective, and ranks whose rollouts stop
after different numbers of decode steps would wait on each other forever; the rollout therefore
gathers the parameters once and keeps them (`gathered`), and reshards them before training.

Under tensor parallel the rollout generates tensor-parallel on the training model itself: each rank
computes its heads and MLP columns, the vocabulary-sharded logits are gathered whole for sampling
(`logits_gathered`, as `meshtron generate` under torchrun does), and with sequence parallel a decode
step's one token sits on one rank (DTensor shards the sequence unevenly). A tp group's ranks hold the
same prompts and seeds and sample from the same gathered logits, so they draw the same tokens. The
training forwards keep the logits sharded: the log-probs run under loss_parallel.

Each group's sampling seed derives from train.seed and the prompt's position in the run, so a
resumed run, or one on another number of ranks, draws the same completions.
"""

import contextlib
import functools
import logging
import time

import torch
import torch.distributed as dist
from torch import nn

from meshtron.align.rewards import Rewards
from meshtron.align.rl import aggregate, group_advantages, loss_units, token_losses
from meshtron.train.losses import IGNORE_INDEX, head_token_nll
from meshtron.train.recipes.alignment import reshard
from meshtron.train.recipes.base import Recipe

log = logging.getLogger(__name__)

# Held-out prompts generated together. A decode step on CPU costs about the reading of the weights
# whatever the batch: the 60 questions of configs/smollm2/grpo.toml in one batch took 62 s of CPU
# against 117 s in four, with the same accuracy.
EVAL_BATCH = 64


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Under FSDP2: the parameters gathered once for a whole rollout (no collective in any forward),
    sharded again on exit, with the reshard-after-forward settings of meshtron.parallel.fsdp back
    (every block but the last reshards, the root keeps its parameters)."""
    from torch.distributed.fsdp import FSDPModule

    fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp_modules:
        yield
        return
    for module in fsdp_modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        blocks = [m for m in fsdp_modules if m is not model]
        for i, block in enumerate(blocks):
            block.set_reshard_after_forward(i < len(blocks) - 1, recurse=False)
        reshard(model)


def per_token_logps(model: nn.Module, batch: dict) -> torch.Tensor:
    """(B, S) log-prob of each labelled token of a prepared batch (0 elsewhere)."""
    nll = model(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"],
                head=functools.partial(head_token_nll, labels_BS=batch["labels"]))
    return -nll


class GRPORecipe(Recipe):
    name = "grpo"
    data_kind = "prompts"
    default_handler = ""
    plots = (("reward", "eval_reward"),)
    needs_old_logps = False  # besides for several updates per rollout

    def __init__(self, config):
        super().__init__(config)
        self.batches: list[dict] = []  # the current rollout's micro-batches
        self.train_sums: dict[str, torch.Tensor] = {}  # summed token metrics of the training forwards
        self.rollout_metrics: dict[str, float] = {}
        self.training_since = 0.0  # when the current step's training began (train_tokens_per_s)

    # ---- set-up ---------------------------------------------------------------------------

    def setup(self, trainer) -> None:
        from transformers import AutoTokenizer

        from meshtron.infer.loading import pad_token_id, stop_token_ids

        self.trainer = trainer
        self.tokenizer = AutoTokenizer.from_pretrained(str(trainer.source.tokenizer_dir))
        self.stop_ids = stop_token_ids(self.tokenizer, trainer.source.tokenizer_dir)
        self.pad_id = pad_token_id(self.tokenizer)
        self.rewards = Rewards(self.config.rl, trainer.device)
        self.reference = trainer.build_frozen_copy() if self.config.rl.kl_coef else None

    # ---- rollout --------------------------------------------------------------------------

    def next_batches(self, trainer) -> list[dict]:
        if trainer.state.step % self.config.rl.updates_per_rollout == 0 or not self.batches:
            self.batches = self._rollout(trainer)
        else:
            self.rollout_metrics = {}
        self.training_since = time.perf_counter()  # the step's forwards, backwards and update follow
        return self.batches

    def _generate(self, model: nn.Module, token_ids: list[list[int]], temperature: float, seed: int | None):
        """(completion token ids with their stop token when one ended them, entropy sum, entropy count);
        the caller holds the parameters `gathered`."""
        from meshtron.infer.generation import SamplingParams, generate
        from meshtron.infer.tp import logits_gathered

        rl = self.config.rl
        params = SamplingParams(max_new_tokens=rl.max_new_tokens, temperature=temperature,
                                top_p=rl.top_p if temperature else 1.0, stop_token_ids=self.stop_ids, seed=seed,
                                logprobs=0)
        rows: list[list[int]] = [[] for _ in token_ids]
        entropy = [torch.zeros(()), torch.zeros(())]

        def on_tokens(step_B, active_B, logprobs_BV):
            # The sampling policy's entropy at each generated token (its raw logits, before temperature).
            h = -(logprobs_BV.exp() * logprobs_BV).sum(-1)
            entropy[0] += h[active_B].sum().cpu()
            entropy[1] += active_B.sum().cpu()
            for row in torch.nonzero(active_B).flatten().tolist():
                rows[row].append(int(step_B[row]))
            return None

        with logits_gathered(model):
            generate(model, token_ids, params, pad_id=self.pad_id, on_tokens=on_tokens)
        return rows, entropy[0], entropy[1]

    def _texts(self, rows: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode([t for t in row if t not in self.stop_ids], skip_special_tokens=True)
                for row in rows]

    def _score(self, prompts, rows) -> torch.Tensor:
        """(completions, functions) rewards; `prompts` has one entry per completion."""
        keys = sorted({key for p in prompts for key in p.fields})
        fields = {key: [p.fields.get(key) for p in prompts] for key in keys}
        return self.rewards.score([p.prompt for p in prompts], self._texts(rows), fields)

    @torch.no_grad()
    def _rollout(self, trainer) -> list[dict]:
        """Each of this rank's prompts' group, generated as one batch with a seed of its own (from
        train.seed and the prompt's position in the run), so that a group's completions do not depend
        on the data-parallel layout or on what else the rank generates."""
        rl, device = self.config.rl, trainer.device
        rows, prompts, entropy_sum, entropy_count = [], [], 0.0, 0.0
        start = time.perf_counter()
        with gathered(trainer.model):
            for position, prompt in next(trainer.data_iter):
                group, h_sum, h_count = self._generate(trainer.model, [prompt.token_ids] * rl.group_size,
                                                       rl.temperature, self.config.train.seed * 1_000_003 + position)
                rows += group
                prompts += [prompt] * rl.group_size
                entropy_sum, entropy_count = entropy_sum + h_sum, entropy_count + h_count
        rollout_s = time.perf_counter() - start
        per_function = self._score(prompts, rows)
        rewards = self.rewards.total(per_function)
        batches = self._micro_batches([p.token_ids for p in prompts], rows, self.row_values(rewards), device)
        self._add_logps(trainer, batches)
        self._record_rollout(trainer, rows, per_function, rewards, entropy_sum, entropy_count, rollout_s)
        self.finish_rollout(trainer, batches)
        return batches

    def row_values(self, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        """What each completion's row of the micro-batches carries: its advantage against its group."""
        rl = self.config.rl
        return {"advantages": group_advantages(rewards, rl.group_size, rl.scale_rewards)}

    def finish_rollout(self, trainer, batches: list[dict]) -> None:
        """After the log-probs: anything else the rollout's batches need (ppo: the critic's part)."""

    def _micro_batches(self, prompts: list[list[int]], rows: list[list[int]], per_row: dict[str, torch.Tensor],
                       device) -> list[dict]:
        """Prompt + completion rows in micro-batches, labelled on the completion (its stop token
        included), right-padded to the micro-batch's longest row."""
        mbs, batches = self.config.train.micro_batch_size, []
        for start in range(0, len(rows), mbs):
            sequences = [prompts[i] + rows[i] for i in range(start, min(start + mbs, len(rows)))]
            width = max(len(s) for s in sequences) - 1
            input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
            document_ids = torch.ones((len(sequences), width), dtype=torch.long)  # padding: a document of its own
            for r, (seq, prompt) in enumerate(zip(sequences, prompts[start:start + mbs])):
                n = len(seq) - 1
                input_ids[r, :n] = torch.tensor(seq[:-1])
                labels[r, len(prompt) - 1:n] = torch.tensor(seq[len(prompt):])
                document_ids[r, :n] = 0
            batch = {"input_ids": input_ids, "labels": labels, "document_ids": document_ids,
                     "position_ids": torch.arange(width).expand(len(sequences), width).clone(),
                     **{key: value[start:start + mbs].clone() for key, value in per_row.items()}}
            batches.append({k: v.to(device) for k, v in batch.items()})
        return batches

    def _add_logps(self, trainer, batches: list[dict]) -> None:
        """The rollout policy's log-probs (for several updates per rollout) and the reference's."""
        models = {"ref_logps": self.reference} if self.reference is not None else {}
        if self.config.rl.updates_per_rollout > 1 or self.needs_old_logps:
            models["old_logps"] = trainer.model
        for key, model in models.items():
            for batch in batches:
                with trainer.train_context():
                    batch[key] = per_token_logps(model, self.prepare_batch(batch)).float()
        if "old_logps" in models:
            reshard(trainer.model)  # forwards without a backward leave the root's parameters gathered

    def _record_rollout(self, trainer, rows, per_function, rewards, entropy_sum, entropy_count, rollout_s):
        """The rollout's metrics over all data-parallel ranks."""
        lengths = torch.tensor([float(len(r)) for r in rows])
        truncated = torch.tensor([float(not r or r[-1] not in self.stop_ids) for r in rows])
        sums = torch.cat([torch.stack([rewards.sum(), (rewards**2).sum(), torch.tensor(float(len(rows))),
                                       lengths.sum(), truncated.sum(), entropy_sum, entropy_count]),
                          per_function.sum(0)]).to(trainer.device)
        sums = trainer._dp_sum(sums).cpu()
        longest = lengths.max().to(trainer.device)
        if trainer.dims.dp_size > 1:
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=trainer.meshes.dp.get_group())
        total, total_sq, n, length_sum, truncated_sum, h_sum, h_count = sums[:7].tolist()
        mean = total / n
        self.rollout_metrics = {
            "reward": mean,
            "reward_std": max(total_sq / n - mean**2, 0.0) ** 0.5,
            **{f"reward/{name}": value / n for name, value in zip(self.rewards.names, sums[7:].tolist())},
            "completion_length": length_sum / n,
            "completion_length_max": longest.item(),
            "truncated_fraction": truncated_sum / n,
            "entropy": h_sum / max(h_count, 1.0),
            "rollout_tokens_per_s": length_sum / trainer.dims.dp_size / max(rollout_s, 1e-9),
        }

    # ---- training -------------------------------------------------------------------------

    def num_loss_units(self, batch) -> torch.Tensor:
        return loss_units((batch["labels"] != IGNORE_INDEX).float(), self.config.rl.loss_type)

    def loss_sum(self, model, batch) -> torch.Tensor:
        rl = self.config.rl
        logps = per_token_logps(model, batch)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        old = batch.get("old_logps", logps.detach())
        loss, clipped, kl = token_losses(logps, old, batch["advantages"], clip_low=rl.clip_low,
                                         clip_high=rl.clip_high, kl_coef=rl.kl_coef, ref_logps=batch.get("ref_logps"),
                                         kl_estimator=rl.kl_estimator)
        sums = {"tokens": mask.sum(), "clipped": (clipped * mask).sum()}
        if kl is not None:
            sums["kl"] = (kl.detach() * mask).sum()
        for key, value in sums.items():
            self.train_sums[key] = self.train_sums.get(key, torch.zeros((), device=value.device)) + value.detach()
        return aggregate(loss, mask, rl.loss_type, rl.max_new_tokens)

    def step_metrics(self) -> dict[str, float]:
        sums, self.train_sums = self.train_sums, {}
        metrics = dict(self.rollout_metrics)
        if sums:
            sums["trained_tokens"] = sum((b["document_ids"] == 0).sum() for b in self.batches).float()
            keys = sorted(sums)
            totals = dict(zip(keys, self.trainer._dp_sum(torch.stack([sums[k] for k in keys])).tolist()))
            tokens = max(totals["tokens"], 1.0)
            metrics["clip_fraction"] = totals["clipped"] / tokens
            # Prompt and completion tokens through the model per second of the step's training (per rank).
            metrics["train_tokens_per_s"] = (totals["trained_tokens"] / self.trainer.dims.dp_size
                                             / max(time.perf_counter() - self.training_since, 1e-9))
            if "kl" in totals:
                metrics["kl"] = totals["kl"] / tokens
        return metrics

    # ---- held-out evaluation --------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        """Greedy completions of this rank's share of the held-out prompts, scored: eval_reward and
        eval_reward/<function> (the accuracy of a 0/1 reward), over all ranks."""
        dp_rank, dp_size = trainer.meshes.dp.get_local_rank(), trainer.dims.dp_size
        mine = trainer.eval_dataset[dp_rank::dp_size]
        sums = torch.zeros(len(self.rewards.names) + 2)
        for start in range(0, len(mine), EVAL_BATCH):
            prompts = mine[start:start + EVAL_BATCH]
            with gathered(trainer.model):
                rows, _, _ = self._generate(trainer.model, [p.token_ids for p in prompts], 0.0, None)
            per_function = self._score(prompts, rows)
            sums += torch.cat([torch.tensor([float(len(rows))]), self.rewards.total(per_function).sum(0, keepdim=True),
                               per_function.sum(0)])
        sums = trainer._dp_sum(sums.to(trainer.device)).cpu().tolist()
        n = max(sums[0], 1.0)
        return {"eval_reward": sums[1] / n,
                **{f"eval_reward/{name}": value / n for name, value in zip(self.rewards.names, sums[2:])}}
