"""Learning-rate schedules with linear warmup: constant, cosine, linear and WSD (warmup-stable-decay).

A schedule is a function of the 0-based optimizer step giving a factor of the peak lr, wrapped
in a LambdaLR so that its position is checkpointed like any Stateful.

The decaying schedules run from the peak at the last warmup step (the first step when there is no
warmup) to min_lr at the last step, as torchtitan's do; wsd holds the peak until its decay phase,
the last `decay_ratio` of the steps after warmup. A run with no step left after the peak (a 1-step
run, or one that is all warmup) does not decay.
"""

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

from meshtron.config import LRConfig


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int, min_ratio: float,
              decay_ratio: float) -> float:
    """Factor of the peak lr used by optimizer step `step` (0-based) of a `total_steps` run."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    last = total_steps - 1
    peak = max(warmup_steps - 1, 0)  # the step at the peak the decay starts from
    if schedule == "wsd":
        # At least one decaying step whenever decay_ratio > 0, however short the run.
        decay_steps = max(1, math.floor(decay_ratio * (total_steps - warmup_steps) + 0.5)) if decay_ratio else 0
        peak = max(peak, last - decay_steps)
    progress = min(1.0, max(0.0, (step - peak) / (last - peak))) if last > peak else 0.0
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    assert schedule in ("linear", "wsd"), schedule
    return 1 - (1 - min_ratio) * progress


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
