"""The step guard: skipped steps counted, in a row and in all; a stop after train.max_skipped_steps in a
row; loss spikes (above k x the running median) reported, not skipped."""

import logging

import torch

from meshtron.train.guard import SPIKE_MIN_HISTORY, StepGuard, finite_on_every_rank


def test_skips_are_counted_and_a_streak_diverges():
    guard = StepGuard(max_skipped_steps=2, loss_spike_factor=0.0, report=False)
    outcomes = [True, False, True, False, False]
    metrics = [guard.observe(step, 1.0, 1.0, applied) for step, applied in enumerate(outcomes, 1)]
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1, 2, 3]
    assert guard.consecutive_skips == 2 and guard.diverged  # two in a row; the one at step 2 was not


def test_a_loss_spike_is_reported_against_the_running_median(caplog):
    guard = StepGuard(max_skipped_steps=3, loss_spike_factor=2.0, report=True)
    losses = [3.0, 2.0, 2.5] * 4  # median 2.5
    spikes = [guard.observe(step, loss, 1.0, True)["loss_spikes"] for step, loss in enumerate(losses, 1)]
    assert spikes == [0] * len(losses)
    with caplog.at_level(logging.WARNING):
        assert guard.observe(13, 4.9, 1.0, True)["loss_spikes"] == 0  # below 2 x 2.5
        assert guard.observe(14, 5.1, 1.0, True)["loss_spikes"] == 1
    assert "step 14: loss spike, 5.1000" in caplog.text and "step 13" not in caplog.text


def test_no_spike_before_enough_history():
    guard = StepGuard(max_skipped_steps=3, loss_spike_factor=2.0, report=False)
    counts = [guard.observe(s, 1.0 if s % 2 else 100.0, 1.0, True)["loss_spikes"] for s in range(SPIKE_MIN_HISTORY)]
    assert counts == [0] * SPIKE_MIN_HISTORY


def test_finite_in_one_process():
    assert finite_on_every_rank([torch.ones(3), torch.zeros(())])
    assert not finite_on_every_rank([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not finite_on_every_rank([torch.tensor(float("nan"))])
