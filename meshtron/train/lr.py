"""Learning-rate schedules with linear warmup: constant, cosine, linear and WSD (warmup-stable-decay).

A schedule is a function of the 0-based optimizer step giving a factor of the peak lr, wrapped
in a LambdaLR so that its position is checkpointed like any Stateful.
"""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from meshtron.config import LRConfig


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float,
              decay_ratio: float) -> float:
    """Factor of the peak lr used by optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    # The decay would reach min_lr one step after the last, so that no step runs at lr 0 when min_lr is 0.
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - (1 - min_ratio) * progress
    assert schedule == "wsd", schedule
    # Stable at the peak, then a linear decay over the last `decay_ratio` of the post-warmup steps.
    stable = 1 - decay_ratio
    if progress <= stable:
        return 1.0
    return 1 - (1 - min_ratio) * (progress - stable) / decay_ratio


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRConfig, peak_lr: float, total_steps: int) -> LambdaLR:
    factor = partial(
        lr_factor,
        schedule=cfg.schedule,
        warmup_steps=cfg.warmup_steps,
        total_steps=total_steps,
        min_ratio=cfg.min_lr / peak_lr,
        decay_ratio=cfg.decay_ratio,
    )
    return LambdaLR(optimizer, factor)
