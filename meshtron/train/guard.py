"""Guards of the training loop against steps that would poison the run.

A step whose loss or gradient norm is not finite on some rank is skipped: the optimizer and the
grad scaler are not stepped on any rank (Megatron-LM skips such iterations the same way), its
batch is dropped, and `skipped_steps` counts it. Too many skips in a row mean the run has
diverged (or its weights already hold inf/NaN): it stops, naming the last good checkpoint.
Optionally, a loss far above its recent median (a spike) is reported without skipping anything.
"""

import logging
import statistics
from collections import deque

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SPIKE_WINDOW = 50  # applied steps whose median a spike is measured against
SPIKE_MIN_HISTORY = 10  # no spike is reported before this many applied steps


def finite_on_every_rank(tensors, read=None, stop=False):
    """Whether every element of every tensor is finite on every rank. Collective: all ranks must call it,
    and all get the same answer, so that none steps or saves while another does not.

    With `read` (scalar tensors on the same device), returns (answer, whether any rank asked to `stop`,
    their values): one collective carries both answers and one transfer from the device brings them with
    the values, so that a training step waits for the device once and needs no collective of its own for
    the stop request."""
    tensors = list(tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    ok = torch.ones((), device=device)
    for t in tensors:
        ok = ok * torch.isfinite(t).all()
    # Both answers are agreements, so one MIN reduces them: "finite" and "no rank asked to stop".
    agree = torch.stack([ok, torch.zeros_like(ok) if stop else torch.ones_like(ok)])  # a fill: no host copy
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    if read is None:
        return bool(agree[0].item())
    answer, carry_on, *values = torch.cat([agree, torch.stack([r.float().reshape(()) for r in read])]).tolist()
    return bool(answer), not carry_on, values


class StepGuard:
    """Counts skipped steps and watches the loss for spikes; the Trainer decides what a step does."""

    def __init__(self, *, max_skipped_steps: int, loss_spike_factor: float, report: bool):
        self.max_skipped_steps = max_skipped_steps
        self.loss_spike_factor = loss_spike_factor
        self.report = report  # rank 0 warns; every rank counts
        self.skipped_steps = 0  # since this launch
        self.consecutive_skips = 0
        self.loss_spikes = 0
        self._recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)

    @property
    def diverged(self) -> bool:
        return self.consecutive_skips >= self.max_skipped_steps

    def observe(self, step: int, loss: float, grad_norm: float, applied: bool) -> dict:
        """Record step `step`'s outcome; returns the metrics to log with it."""
        metrics = {"skipped_steps": self.skipped_steps}
        if not applied:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            metrics["skipped_steps"] = self.skipped_steps
            if self.report:
                log.warning("step %d skipped: loss %s, grad_norm %s is not finite on some rank; parameters and "
                            "optimizer state unchanged (%d in a row, the run stops at train.max_skipped_steps = %d)",
                            step, loss, grad_norm, self.consecutive_skips, self.max_skipped_steps)
            return metrics
        self.consecutive_skips = 0
        if self.loss_spike_factor:
            metrics["loss_spikes"] = self._check_spike(step, loss)
        self._recent_losses.append(loss)
        return metrics

    def _check_spike(self, step: int, loss: float) -> int:
        if len(self._recent_losses) >= SPIKE_MIN_HISTORY:
            median = statistics.median(self._recent_losses)
            if loss > self.loss_spike_factor * median:
                self.loss_spikes += 1
                if self.report:
                    log.warning("step %d: loss spike, %.4f is above train.loss_spike_factor (%g) x the median of the "
                                "last %d steps (%.4f)", step, loss, self.loss_spike_factor, len(self._recent_losses),
                                median)
        return self.loss_spikes
