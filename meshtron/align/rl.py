"""The online RL objective (GRPO and its DAPO, Dr. GRPO and BNPO variants) on given log-probs.

Everything here is a pure function of tensors, so that the recipe (meshtron.train.recipes.rl)
and the tests share one definition. Shapes: B completions, T completion tokens (padded), a
`mask` (B, T) that is 1 on a completion's real tokens.

The per-token loss is PPO's clipped surrogate with a two-sided clip (DAPO's "clip-higher" when
clip_high > clip_low) plus kl_coef times a KL estimate against the reference. What differs
between the loss types is only how the per-token losses are aggregated (`aggregate`).
"""

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
STD_EPS = 1e-4  # added to the group std, as TRL does, so that a group of equal rewards gives 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(reward - its group's mean) / (the group's sample std + 1e-4) for rewards laid out group by
    group (completions 0..G-1 of the first prompt, then the next); without `scale`, only centred
    (Dr. GRPO)."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(-1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(-1, keepdim=True) + STD_EPS)
    return advantages.reshape(-1)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs (Schulman's
    k1, k2, k3; k3 is unbiased and never negative)."""
    log_ratio = ref_logps - logps
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                       clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The negated clipped surrogate -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) per token, with
    r = exp(logps - old_logps) and A the completion's advantage; and where the clip was active (the
    ratio left the trust region in the direction the advantage pushes)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    active = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return loss, active


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """The summed loss of one micro-batch, which the Trainer divides (summed over the step's
    micro-batches and ranks) by the step's `loss_units`:

    - grpo: each completion's mean token loss, averaged over completions;
    - dr_grpo: each completion's summed token loss / max_new_tokens, averaged over completions;
    - dapo: the mean over every completion token of the step;
    - bnpo: each micro-batch's mean token loss, averaged over micro-batches (TRL normalizes per
      local batch).
    """
    masked = token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    if loss_type == "dr_grpo":
        return masked.sum() / max_new_tokens
    if loss_type == "dapo":
        return masked.sum()
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"unknown loss type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")


def loss_units(mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """What one micro-batch's `aggregate` sums over: completions (grpo, dr_grpo), tokens (dapo), or
    the micro-batch itself (bnpo)."""
    if loss_type == "dapo":
        return mask.sum().float()
    return torch.tensor(float(mask.shape[0] if loss_type in ("grpo", "dr_grpo") else 1), device=mask.device)


def token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *, clip_low: float,
                 clip_high: float, kl_coef: float = 0.0, ref_logps: torch.Tensor | None = None,
                 kl_estimator: str = "k3") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-token loss, clip-active mask, per-token KL or None): the clipped surrogate plus
    kl_coef x the KL estimate when kl_coef is set."""
    loss, active = clipped_token_loss(logps, old_logps, advantages, clip_low, clip_high)
    kl = None
    if kl_coef:
        kl = kl_estimate(logps, ref_logps, kl_estimator)
        loss = loss + kl_coef * kl
    return loss, active, kl
