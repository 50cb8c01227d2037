"""Learning-rate schedules: warmup, then constant / cosine / linear / WSD from the peak down to min_lr,
reached exactly at the last step (docs/training.md), at every run length."""

import math

import pytest

from meshtron.train.lr import lr_factor

DECAYING = ("cosine", "linear", "wsd")


def factors(schedule, total=100, warmup=10, min_ratio=0.1, decay_ratio=0.2):
    return [lr_factor(s, schedule=schedule, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio,
                      decay_ratio=decay_ratio) for s in range(total)]


@pytest.mark.parametrize("schedule", ["constant", *DECAYING])
def test_linear_warmup_reaches_the_peak(schedule):
    f = factors(schedule)
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[9] == 1.0


@pytest.mark.parametrize("schedule", DECAYING)
@pytest.mark.parametrize("total", [2, 3, 10, 100])
@pytest.mark.parametrize("warmup", [0, 1, 5])
def test_decay_runs_from_the_peak_to_min_lr_at_the_last_step(schedule, total, warmup):
    if warmup >= total:
        pytest.skip("all warmup: nothing decays")
    f = factors(schedule, total=total, warmup=warmup)
    peak = max(warmup - 1, 0)
    assert f[peak] == 1.0
    assert f[-1] == pytest.approx(0.1, abs=1e-12)  # min_lr, at the last step, not one step later
    after = f[peak:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # never increases
    assert all(a > 0.1 for a in after[:-1])  # and reaches min_lr only at the end


@pytest.mark.parametrize("schedule", ["constant", *DECAYING])
@pytest.mark.parametrize("warmup", [0, 1])
def test_a_one_step_run_trains_at_the_peak(schedule, warmup):
    assert factors(schedule, total=1, warmup=warmup) == [1.0]


def test_exact_values_at_ten_steps():
    # No warmup: 9 intervals from the peak at step 0 to min at step 9.
    assert factors("linear", total=10, warmup=0) == pytest.approx([1 - 0.9 * s / 9 for s in range(10)])
    assert factors("cosine", total=10, warmup=0) == pytest.approx(
        [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 9)) for s in range(10)])
    # wsd, 2 warmup steps: 8 steps after warmup, 20% of them (2 steps) decay.
    assert factors("wsd", total=10, warmup=2) == pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 1, 0.55, 0.1])


def test_wsd_is_stable_until_its_decay_phase():
    f = factors("wsd")
    # 90 post-warmup steps, the last 20% (18 steps) decay.
    assert f[9:82] == [1.0] * 73
    assert f[82] < 1.0
    assert factors("wsd", decay_ratio=0.0)[9:] == [1.0] * 91  # no decay phase
    assert factors("wsd", decay_ratio=1.0) == factors("linear")


def test_constant_stays_at_the_peak():
    assert factors("constant")[9:] == [1.0] * 91
