"""StepProfiler on runs shorter than its window (a one-step run crashed building an empty schedule)."""

import torch

from meshtron.config.job import ProfileConfig
from meshtron.train.profiling import StepProfiler


def _run(config, tmp_path, first_step, final_step):
    profiler = StepProfiler(config, tmp_path, rank=0, device=torch.device("cpu"), first_step=first_step,
                            final_step=final_step)
    for step in range(first_step, final_step + 1):
        profiler.step_begins(step)
        torch.ones(8, 8) @ torch.ones(8, 8)
        profiler.step_ends(step)
    return sorted(p.name for p in (tmp_path / "profile").rglob("*.trace.json.gz"))


def test_a_run_that_ends_before_the_profiled_steps_trains_and_profiles_nothing(tmp_path):
    assert _run(ProfileConfig(enable=False), tmp_path, 1, 1) == []
    assert _run(ProfileConfig(enable=True, start_step=5), tmp_path, 1, 1) == []


def test_a_shortened_run_profiles_up_to_its_end(tmp_path):
    assert _run(ProfileConfig(enable=True, start_step=2, num_steps=4), tmp_path, 1, 3) == ["rank-0.trace.json.gz"]
