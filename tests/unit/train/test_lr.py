"""Learning-rate schedules: warmup, then constant / cosine / linear / WSD down to min_lr."""

import pytest

from meshtron.train.lr import lr_factor


def factors(schedule, total=100, warmup=10, min_ratio=0.1, decay_ratio=0.2):
    return [lr_factor(s, schedule=schedule, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio,
                      decay_ratio=decay_ratio) for s in range(total)]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "wsd"])
def test_linear_warmup_reaches_the_peak(schedule):
    f = factors(schedule)
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0)


def test_decays_end_near_min_and_never_increase():
    for schedule in ("cosine", "linear", "wsd"):
        f = factors(schedule)[10:]
        assert all(a >= b - 1e-12 for a, b in zip(f, f[1:])), schedule
        assert 0.1 < f[-1] <= 0.16, schedule  # one decay step short of min_lr
    assert factors("constant")[-1] == 1.0


def test_wsd_is_stable_until_its_decay_phase():
    f = factors("wsd")
    # 90 post-warmup steps, the last 20% (18 steps) decay.
    assert f[10:83] == [1.0] * 73
    assert f[83] < 1.0
