"""Preference and reward losses, per sample (the caller sums and normalizes by the global
number of pairs, ARCHITECTURE principle 5).

Inputs are summed sequence log-probabilities of the chosen and rejected responses (policy and
reference), or rewards. Definitions:
- DPO (Rafailov et al. 2023), h = (pi_c - ref_c) - (pi_r - ref_r):
  sigmoid  -(1-eps) log s(beta h) - eps log s(-beta h)   (eps: label smoothing, conservative DPO)
  hinge    max(0, 1 - beta h)                             (SLiC-style)
  ipo      (h - 1/(2 beta))^2 with length-averaged log-probs (Azar et al. 2023)
- SimPO (Meng et al. 2024): -log s(beta (avg_c - avg_r) - gamma), avg = log-prob / length,
  no reference model.
- Bradley-Terry reward model: -log s(r_c - r_r - margin).
- Process reward model: binary cross-entropy of a step's score against its +/- label.
"""

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards beta * (policy - reference) of chosen and rejected.

    For `ipo`, pass length-averaged log-probs (the IPO definition)."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose from {', '.join(DPO_LOSS_TYPES)}")
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair SimPO losses and the rewards beta * average log-prob."""
    chosen = beta * chosen_logps / chosen_lengths
    rejected = beta * rejected_logps / rejected_lengths
    logits = chosen - rejected - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen.detach(), rejected.detach()


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin=0.0) -> torch.Tensor:
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def prm_loss(step_logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    """Per-step binary cross-entropy; labels are 1 (good step) or 0 (bad step)."""
    return F.binary_cross_entropy_with_logits(step_logits.float(), step_labels.float(), reduction="none")


def sequence_logps(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled tokens per row, and their count (labels -100 are ignored).

    `labels` are already shifted: labels[:, t] is the token predicted at position t."""
    mask = labels_BS != -100
    targets = labels_BS.masked_fill(~mask, 0)
    logps = torch.log_softmax(logits_BSV.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return (logps * mask).sum(-1), mask.sum(-1)


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over pairs (the caller divides by the global number of pairs)."""
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "rewards/margin": (chosen_rewards - rejected_rewards).sum(),
    }
