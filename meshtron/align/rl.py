"""The online RL objectives on given log-probs: GRPO (and its DAPO, Dr. GRPO and BNPO variants), and
PPO's per-token rewards, GAE, advantage whitening and clipped value loss.

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
    r = exp(logps - old_logps) and A the completion's advantage (B,) or each token's (B, T); and where
    the clip was active (the ratio left the trust region in the direction the advantage pushes)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
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


# ---- PPO with a critic: per-token rewards, GAE, whitening, the clipped value loss ------------------

WHITEN_EPS = 1e-8


def ppo_token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None,
                      kl_coef: float = 0.0) -> torch.Tensor:
    """(B, T) per-token rewards of PPO for RLHF: -kl_coef x the per-token KL estimate to the
    reference on every completion token, plus the completion's sequence reward (B,) on its last
    (last masked) token."""
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl * mask
    last = mask.shape[-1] - 1 - mask.flip(-1).argmax(-1)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores * (mask.sum(-1) > 0)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) and 0 off the mask: generalized advantage estimation,
    A_t = delta_t + gamma lam A_{t+1} with delta_t = r_t + gamma V_{t+1} - V_t, the value after a
    completion's last token being 0 (the episode ends there); returns = A + V, the critic's target."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, reduce=None) -> torch.Tensor:
    """(values - mean) / sqrt(var + 1e-8) over the masked entries (the unbiased variance, as TRL's
    PPO whitens advantages), 0 off the mask; `reduce` sums the statistics over other processes too
    (e.g. an all-reduce over the data-parallel ranks), so that they whiten as one batch."""
    reduce = reduce or (lambda t: t)
    n, total = reduce(torch.stack([mask.sum(), (values * mask).sum()])).unbind()
    mean = total / n
    var = reduce(((values - mean) * mask).pow(2).sum().reshape(1)).squeeze() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + WHITEN_EPS) * mask


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       value_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token value loss, clip-active mask): 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2),
    the critic kept within value_clip of its rollout-time prediction as PPO keeps the policy; active
    where the clipped term is the larger one."""
    outside = (values - old_values).abs() > value_clip
    # V itself where the clip does not bind (old + (V - old) would round differently from V).
    clipped = torch.where(outside, old_values + torch.clamp(values - old_values, -value_clip, value_clip), values)
    unclipped_sq, clipped_sq = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(unclipped_sq, clipped_sq), outside & (clipped_sq > unclipped_sq)

