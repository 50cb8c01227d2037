"""Operations of a run, each with its drill switch (meshtron/train/ops.py): a rank killed under
`torchrun --max-restarts` is restarted and the job resumes with the uninterrupted losses; a hang
ends with the stacks of every rank; a failed step saves the last completed one; a rank slow to
load its data is named; the step-time breakdown adds up."""

import pytest

EIGHT_STEPS = ["--train.steps", "8", "--checkpoint.interval", "2", "--checkpoint.keep", "0",
               "--parallel.dp_shard", "2", "--train.deterministic", "true"]


@pytest.fixture(scope="module")
def uninterrupted(run_train, tiny_config, tmp_path_factory):
    _, records = run_train(tiny_config, tmp_path_factory.mktemp("straight"), nproc=2, overrides=EIGHT_STEPS)
    return records


def killed_and_restarted(run_train, tiny_config, out):
    kill = {"MESHTRON_FAULT_AT_STEP": "5", "MESHTRON_FAULT_RANK": "1"}
    result, records = run_train(tiny_config, out, nproc=2, overrides=EIGHT_STEPS, env=kill, max_restarts=2)
    assert "drill: MESHTRON_FAULT_AT_STEP=5 kills this rank" in result.stderr
    assert "resuming from" in result.stderr and "step-4" in result.stderr
    return records


def test_a_killed_rank_is_restarted_and_resumes_exactly(run_train, tiny_config, uninterrupted, tmp_path):
    records = killed_and_restarted(run_train, tiny_config, tmp_path)
    # Steps 1-4 from the first launch, 5-8 after the restart from step-4: none lost, none repeated.
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records] == [r["loss"] for r in uninterrupted]  # deterministic: exact


# Restarts once went wrong one time in a few (a rank aborting in teardown, now fixed in meshtron/cli): two more
# kill-and-restart cycles beside the one above, in the acceptance run.
@pytest.mark.acceptance
@pytest.mark.parametrize("attempt", range(2))
def test_restart_is_reliable(run_train, tiny_config, uninterrupted, tmp_path, attempt):
    records = killed_and_restarted(run_train, tiny_config, tmp_path)
    assert [r["loss"] for r in records][5:] == [r["loss"] for r in uninterrupted][5:]


def test_a_hang_leaves_the_stacks_of_every_rank(run_train, tiny_config, tmp_path):
    hang = {"MESHTRON_FAULT_HANG_AT_STEP": "3", "MESHTRON_FAULT_RANK": "1"}
    result, records = run_train(tiny_config, tmp_path, nproc=2, check=False, env=hang, timeout=240,
                                overrides=["--train.hang_timeout_s", "10", "--parallel.dp_shard", "2"])
    assert result.returncode != 0
    assert [r["step"] for r in records] == [1, 2]
    stuck = (tmp_path / "hang" / "rank-1.txt").read_text()
    waiting = (tmp_path / "hang" / "rank-0.txt").read_text()
    assert "no training step completed in 10 s" in stuck and "no training step completed in 10 s" in waiting
    assert "before_step" in stuck  # the drill's sleep, in the rank that stopped
    assert "train_step" in waiting  # the other rank, waiting for it in the step's first collective


def test_a_failed_step_saves_the_last_completed_one(run_train, tiny_config, tmp_path):
    six = ["--train.steps", "6", "--train.deterministic", "true"]
    _, straight = run_train(tiny_config, tmp_path / "straight", overrides=six)
    failed = tmp_path / "failed"
    result, _ = run_train(tiny_config, failed, overrides=six, check=False, env={"MESHTRON_FAULT_RAISE_AT_STEP": "4"})
    assert result.returncode != 0 and "fails this step's data loading" in result.stderr
    assert "saving step 3" in result.stderr
    assert [p.name for p in (failed / "checkpoints").iterdir()] == ["step-3"]
    assert (failed / "checkpoints" / "step-3" / "COMMITTED").is_file()

    _, resumed = run_train(tiny_config, failed, overrides=six)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_breakdown_and_a_slow_rank_named(run_train, tiny_config, tmp_path):
    slow = {"MESHTRON_FAULT_SLOW_S": "2", "MESHTRON_FAULT_RANK": "1"}
    result, records = run_train(tiny_config, tmp_path, nproc=2, env=slow, overrides=[
        "--train.steps", "3", "--parallel.dp_shard", "2", "--log.straggler_fraction", "0.1",
        "--checkpoint.interval", "2"])
    assert "rank 1 is a straggler" in result.stderr
    for r in records:
        phases = sum(r[f"time_{p}_s"] for p in ("data", "forward_backward", "optimizer", "eval", "checkpoint"))
        assert phases == pytest.approx(r["step_time_s"], rel=0.1)
        assert r["step_time_min_s"] <= r["step_time_max_s"]
    assert records[1]["time_checkpoint_s"] > 0 and records[0]["time_checkpoint_s"] == 0
