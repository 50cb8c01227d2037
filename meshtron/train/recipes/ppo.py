"""PPO with a critic, on grpo's rollout (meshtron.train.recipes.rl): the same generation, rewards,
micro-batches and clipped policy loss; what differs is where the advantages come from.

Each completion's per-token rewards are its sequence reward on its last token minus kl_coef x the
per-token KL estimate of the rollout policy to the frozen reference; a critic (a value head on a
copy of the starting model, trained by its own AdamW at rl.critic_lr, as OpenRLHF trains its
critic) predicts each token's value; GAE (rl.gamma, rl.lam) turns rewards and values into
per-token advantages, whitened over the step's rollout, and returns, the critic's target. The
critic trains at rollout time for rl.updates_per_rollout epochs on the rollout with the clipped
value loss; the policy then takes rl.updates_per_rollout optimizer steps on it, as for grpo.
The critic and its optimizer are checkpointed with the run (resume is exact).
"""

import dataclasses

import torch

from meshtron.align.rl import (aggregate, clipped_value_loss, gae, kl_estimate, masked_whiten, ppo_token_rewards,
                               token_losses)
from meshtron.errors import UserError
from meshtron.train.losses import IGNORE_INDEX
from meshtron.train.recipes.alignment import reshard
from meshtron.train.recipes.rl import GRPORecipe, per_token_logps


def token_values(critic, batch: dict) -> torch.Tensor:
    """(B, S) the critic's value at each position of a prepared batch."""
    values = critic(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"])
    values = values.full_tensor() if hasattr(values, "full_tensor") else values
    return values[..., 0].float()


class PPORecipe(GRPORecipe):
    name = "ppo"

    @property
    def needs_old_logps(self) -> bool:
        """The KL penalty in the rewards is the rollout policy's; without one, a single update per
        rollout uses its own forward's log-probs (grpo's ratio of 1), without a forward of its own."""
        return bool(self.config.rl.kl_coef)

    def setup(self, trainer) -> None:
        from meshtron.train.build import build_parallel_model
        from meshtron.train.optim import build_optimizer

        super().setup(trainer)
        config = dataclasses.replace(self.config, lora=dataclasses.replace(self.config.lora, rank=0))
        self.critic = build_parallel_model(config, self._critic_source(trainer), trainer.dims, trainer.meshes,
                                           trainer.device, load_weights=True)
        if not self.config.rl.critic:
            # A fresh value head starts at 0 (OpenRLHF draws it at std 1/(dim + 1)): a head drawn at the
            # model's init_std predicts values of the order of the rewards themselves, and GAE (then the
            # whitening) turns that noise into the advantages of every token before the critic has learnt.
            with torch.no_grad():
                self.critic.lm_head.weight.zero_()
        optim = dataclasses.replace(self.config.optim, lr=self.config.rl.critic_lr or self.config.optim.lr)
        self.critic_optimizer = build_optimizer(self.critic, optim, trainer.device.type)

    def _critic_source(self, trainer):
        """The starting model with a new one-output score head, or the rm run rl.critic (its model and
        its trained score head)."""
        from meshtron.train.build import resolve_model_source

        policy = trainer.source
        if not self.config.rl.critic:
            return dataclasses.replace(policy, args=dataclasses.replace(policy.args, num_labels=1))
        model = dataclasses.replace(self.config.model, name_or_path=self.config.rl.critic, args={}, tokenizer="")
        source = resolve_model_source(dataclasses.replace(self.config, model=model))
        where = f"rl.critic = {self.config.rl.critic!r}"
        if source.args.num_labels != 1:
            raise UserError(f"{where} has no one-output score head; give the run directory of an rm run, or "
                            "leave rl.critic empty for a value head on a copy of the starting model")
        if source.args.vocab_size != policy.args.vocab_size:
            raise UserError(f"{where} reads a vocabulary of {source.args.vocab_size} tokens and the policy writes "
                            f"{policy.args.vocab_size}: the critic must share the policy's tokenizer")
        return source

    def checkpoint_states(self) -> dict:
        from meshtron.checkpoint.manager import ModelState, OptimizerState

        return {"critic": ModelState(self.critic, part="all"),
                "critic_optimizer": OptimizerState(self.critic, self.critic_optimizer)}

    def row_values(self, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"scores": rewards}

    def finish_rollout(self, trainer, batches: list[dict]) -> None:
        rl = self.config.rl
        masks = [(b["labels"] != IGNORE_INDEX).float() for b in batches]
        kl_sum = torch.zeros((), device=trainer.device)
        with torch.no_grad():
            for batch, mask in zip(batches, masks):
                with trainer.train_context():
                    batch["values"] = token_values(self.critic, self.prepare_batch(batch)) * mask
                kl = (kl_estimate(batch["old_logps"], batch["ref_logps"], rl.kl_estimator)
                      if "ref_logps" in batch else None)
                if kl is not None:
                    kl_sum += (kl * mask).sum()
                rewards = ppo_token_rewards(batch["scores"], mask, kl, rl.kl_coef)
                batch["advantages"], batch["returns"] = gae(rewards, batch["values"], mask, rl.gamma, rl.lam)
            # Whitened over the whole step's rollout (every data-parallel rank's), so that a layout
            # trains as one process would.
            flat = torch.cat([b["advantages"][m.bool()] for b, m in zip(batches, masks)])
            flat = masked_whiten(flat, torch.ones_like(flat), reduce=trainer._dp_sum)
            start = 0
            for batch, mask in zip(batches, masks):
                n = int(mask.sum())
                batch["advantages"][mask.bool()] = flat[start:start + n]
                start += n
        reshard(self.critic)  # forwards without a backward leave the root's parameters gathered
        self._train_critic(trainer, batches, masks, kl_sum)

    @torch.enable_grad()  # called from inside the rollout's no_grad
    def _train_critic(self, trainer, batches: list[dict], masks: list[torch.Tensor], kl_sum: torch.Tensor) -> None:
        """rl.updates_per_rollout optimizer steps of the critic on the rollout, each over all of it: the
        clipped value loss averaged over the step's completion tokens on every rank."""
        from meshtron.train.optim import clip_grad_norm

        rl = self.config.rl
        tokens = trainer._dp_sum(sum(m.sum() for m in masks).reshape(1)).squeeze()
        # FSDP / DDP average gradients over the data-parallel ranks: scale back to the global mean.
        scale = trainer.dims.dp_size / tokens.clamp(min=1)
        loss_sum = clipped_sum = torch.zeros((), device=trainer.device)
        for _ in range(rl.updates_per_rollout):
            for batch, mask in zip(batches, masks):
                with trainer.train_context():
                    values = token_values(self.critic, self.prepare_batch(batch))
                loss, clipped = clipped_value_loss(values, batch["values"], batch["returns"], rl.value_clip)
                loss = (loss * mask).sum()
                (loss * scale).backward()
                loss_sum, clipped_sum = loss_sum + loss.detach(), clipped_sum + (clipped * mask).sum()
            clip_grad_norm(list(self.critic.parameters()), self.config.optim.grad_clip)
            self.critic_optimizer.step()
            self.critic_optimizer.zero_grad(set_to_none=True)
        # In float64: the variances below are differences of sums of squares.
        values = torch.cat([b["values"][m.bool()] for b, m in zip(batches, masks)]).double()
        returns = torch.cat([b["returns"][m.bool()] for b, m in zip(batches, masks)]).double()
        residuals = returns - values
        totals = trainer._dp_sum(torch.stack([loss_sum.double(), clipped_sum.double(), kl_sum.double(), returns.sum(),
                                              (returns**2).sum(), residuals.sum(), (residuals**2).sum()])).tolist()
        n = max(tokens.item(), 1.0)

        def variance(total, total_sq):
            return total_sq / n - (total / n) ** 2

        self.rollout_metrics.update({
            "value_loss": totals[0] / (n * rl.updates_per_rollout),
            "value_clip_fraction": totals[1] / (n * rl.updates_per_rollout),
            "kl": totals[2] / n,
            # Of the rollout-time values against the returns, over every rank's completion tokens.
            "explained_variance": 1 - variance(*totals[5:7]) / max(variance(*totals[3:5]), 1e-12),
        })

    def loss_sum(self, model, batch) -> torch.Tensor:
        """The clipped policy loss on the per-token advantages (the KL penalty is in the rewards)."""
        rl = self.config.rl
        logps = per_token_logps(model, batch)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        loss, clipped, _ = token_losses(logps, batch.get("old_logps", logps.detach()), batch["advantages"],
                                        clip_low=rl.clip_low,
                                        clip_high=rl.clip_high)
        for key, value in {"tokens": mask.sum(), "clipped": (clipped * mask).sum()}.items():
            self.train_sums[key] = self.train_sums.get(key, torch.zeros((), device=value.device)) + value.detach()
        return aggregate(loss, mask, rl.loss_type, rl.max_new_tokens)
