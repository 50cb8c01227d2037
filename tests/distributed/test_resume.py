"""Checkpoints that reshard and resume: a run saved at one layout continues at another (or at
world size 1) with the losses of the uninterrupted run; a deterministic run resumed from its
checkpoint repeats the uninterrupted losses bit for bit; SIGTERM leaves a complete checkpoint;
a checkpoint without its commit marker is skipped.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from meshtron.train.metrics import read_metrics

RTOL = 2e-5
EIGHT_STEPS = ["--train.steps", "8", "--checkpoint.interval", "4", "--checkpoint.keep", "0"]


def losses(records):
    return [r["loss"] for r in records]


def terminate_after_two_steps(cmd: list[str], out) -> tuple[subprocess.Popen, str]:
    """Start a long `meshtron train`, send SIGTERM once two steps are logged; (finished process, its stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr


@pytest.fixture(scope="module")
def fsdp_run(run_train, tiny_config, tmp_path_factory):
    """8 steps at dp_shard=2, saving at step 4 and 8 (in the background): the uninterrupted run."""
    out = tmp_path_factory.mktemp("fsdp")
    _, records = run_train(tiny_config, out, nproc=2, overrides=[*EIGHT_STEPS, "--parallel.dp_shard", "2",
                                                                  "--checkpoint.async", "true"])
    assert [r["step"] for r in records] == list(range(1, 9))
    assert (out / "checkpoints" / "step-4" / "COMMITTED").is_file()
    return out, records


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]), (1, [])],
                         ids=["to-tp2", "to-one-process"])
def test_resume_at_another_layout(run_train, tiny_config, fsdp_run, tmp_path, nproc, layout):
    out, straight = fsdp_run
    _, records = run_train(tiny_config, tmp_path, nproc=nproc, overrides=[
        *EIGHT_STEPS, *layout, "--checkpoint.resume", str(out / "checkpoints" / "step-4")])
    assert [r["step"] for r in records] == [5, 6, 7, 8]
    assert losses(records) == pytest.approx(losses(straight[4:]), rel=RTOL)


def test_exact_resume_is_bit_identical(run_train, tiny_config, tmp_path):
    deterministic = [*EIGHT_STEPS, "--train.deterministic", "true"]
    started, straight = run_train(tiny_config, tmp_path / "straight", overrides=deterministic)
    resumed_run, resumed = run_train(tiny_config, tmp_path / "resumed", overrides=[
        *deterministic, "--checkpoint.resume", str(tmp_path / "straight" / "checkpoints" / "step-4")])
    # A resume takes every weight from the checkpoint: none is drawn first.
    assert "drew" in started.stderr and "drew" not in resumed_run.stderr
    assert losses(resumed) == losses(straight)[4:]  # exact float equality
    assert [r["loss_tokens"] for r in resumed] == [r["loss_tokens"] for r in straight][4:]  # same data order


def test_sigterm_saves_a_checkpoint_that_resume_continues(run_train, tiny_config, tmp_path):
    """Stopped by SIGTERM, then resumed: the losses of every step are the uninterrupted run's."""
    constant = ["--lr.schedule", "constant"]  # the same lr at every step, however many steps a run has
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "meshtron", "train", str(tiny_config), "--train.output_dir", str(out),
           "--train.steps", "100000", *constant]
    proc, stderr = terminate_after_two_steps(cmd, out)
    assert proc.returncode == 0, stderr[-3000:]
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "COMMITTED").is_file()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert stopped_at >= 2

    total = ["--train.steps", str(stopped_at + 2), *constant]
    run_train(tiny_config, out, overrides=total)
    _, straight = run_train(tiny_config, tmp_path / "straight", overrides=total)
    resumed = read_metrics(out / "metrics.jsonl")  # the steps of both launches
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, stopped_at + 3))
    assert losses(resumed) == pytest.approx(losses(straight), rel=RTOL)


def test_auto_resume_skips_a_checkpoint_without_commit_marker(run_train, tiny_config, tmp_path):
    _, first = run_train(tiny_config, tmp_path, overrides=["--train.steps", "2", "--checkpoint.save_final", "true"])
    complete = tmp_path / "checkpoints" / "step-2"
    # A save of step 3 that died before its marker: all files but COMMITTED.
    torn = tmp_path / "checkpoints" / "step-3"
    torn.mkdir()
    for f in complete.iterdir():
        if f.name != "COMMITTED" and f.is_file():
            (torn / f.name).write_bytes(f.read_bytes())
    result, records = run_train(tiny_config, tmp_path, overrides=["--train.steps", "4"])
    assert "resuming from" in result.stderr and "step-2" in result.stderr
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # steps 3 and 4 were trained after resuming at 2


def test_sigterm_to_torchrun_saves_every_rank(run_train, tiny_config, tmp_path):
    """Preemption of a multi-process job: torchrun forwards SIGTERM, all ranks agree to stop and save and
    exit 0, and the resumed job repeats the uninterrupted losses."""
    layout = ["--lr.schedule", "constant", "--parallel.dp_shard", "2"]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "meshtron",
           "train", str(tiny_config), "--train.output_dir", str(out), "--train.steps", "100000", *layout]
    proc, stderr = terminate_after_two_steps(cmd, out)
    # torchrun forwards the signal, waits for its workers, then re-raises the signal itself: exit 1, not a
    # worker failure (which it would report as ChildFailedError with the worker's exit code).
    assert proc.returncode == 1 and "got signal: 15" in stderr, stderr[-3000:]
    assert "ChildFailedError" not in stderr and "stopping at step" in stderr, stderr[-3000:]
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert (checkpoint / "COMMITTED").is_file(), stderr[-3000:]
    assert {p.name for p in checkpoint.glob("__*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}

    total = ["--train.steps", str(int(checkpoint.name.split("-")[1]) + 1), *layout]
    run_train(tiny_config, out, nproc=2, overrides=total)
    _, straight = run_train(tiny_config, tmp_path / "straight", nproc=2, overrides=total)
    resumed = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert losses(resumed) == pytest.approx(losses(straight), rel=RTOL)


@pytest.mark.parametrize("damage", ["no checkpoint", "missing .metadata", "truncated shard"])
def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_logs_each_step_once(run_train, tiny_config, tmp_path,
                                                                                  damage):
    """A run that logged 4 steps but lost (or damaged) its step-4 checkpoint resumes at step 2; the rows of
    steps 3 and 4 are dropped from metrics.jsonl before they are trained and logged again."""
    overrides = ["--train.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep", "0"]
    _, straight = run_train(tiny_config, tmp_path, overrides=overrides)
    step4 = tmp_path / "checkpoints" / "step-4"
    if damage == "no checkpoint":
        for f in step4.iterdir():
            f.unlink() if f.is_file() else None
        (step4 / "manifest.json").write_text("{}")  # not COMMITTED: skipped as before
    elif damage == "missing .metadata":
        (step4 / ".metadata").unlink()
    else:
        shard = step4 / "__0_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
    result, records = run_train(tiny_config, tmp_path, overrides=overrides)
    assert "resuming from" in result.stderr and "step-2" in result.stderr
    if damage != "no checkpoint":
        named = ".metadata is missing" if damage == "missing .metadata" else "__0_0.distcp is truncated"
        assert f"falling back to {tmp_path / 'checkpoints' / 'step-2'}" in result.stderr and named in result.stderr
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert losses(records) == pytest.approx(losses(straight), rel=RTOL)


def test_resume_from_a_named_damaged_checkpoint_names_the_file(run_train, tiny_config, tmp_path):
    run_train(tiny_config, tmp_path / "a", overrides=["--train.steps", "2", "--checkpoint.save_final", "true"])
    step2 = tmp_path / "a" / "checkpoints" / "step-2"
    (step2 / "__0_0.distcp").unlink()
    result, _ = run_train(tiny_config, tmp_path / "b", check=False, overrides=[
        "--train.steps", "3", "--checkpoint.resume", str(step2), "--checkpoint.verify", "false"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{step2 / '__0_0.distcp'} is missing" in result.stderr.strip().splitlines()[-1]


# `meshtron train` with a disk that is full for the checkpoint of step 4 (every write DCP opens there fails).
FULL_DISK_AT_STEP_4 = """
import errno, os, sys
import torch.distributed.checkpoint.filesystem as fs
real = fs.FileSystem.create_stream
def full_disk(self, path, mode):
    if "step-4" in str(path) and "w" in mode:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return real(self, path, mode)
fs.FileSystem.create_stream = full_disk
from meshtron.cli import main
main(sys.argv[1:])
"""


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(run_train, tiny_config, tmp_path):
    overrides = ["--train.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep", "1"]
    result = subprocess.run([sys.executable, "-c", FULL_DISK_AT_STEP_4, "train", str(tiny_config),
                             "--train.output_dir", str(tmp_path), *overrides], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    step2 = tmp_path / "checkpoints" / "step-2"
    assert f"no space left on device while saving checkpoint {tmp_path / 'checkpoints' / 'step-4'}" in last
    assert f"the previous checkpoint {step2} is intact" in last
    resumed, records = run_train(tiny_config, tmp_path, overrides=overrides)
    assert "resuming from" in resumed.stderr and "step-2" in resumed.stderr
    assert [r["step"] for r in records] == [1, 2, 3, 4]
