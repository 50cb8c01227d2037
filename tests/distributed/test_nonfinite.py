"""Non-finite steps: a step whose loss or gradient norm is not finite on any rank is skipped on every
rank (parameters, optimizer state and grad scaler unchanged, compared tensor by tensor between the
checkpoints before and after it), counted as skipped_steps in metrics.jsonl, and too many in a row
stop the run with one line naming the step and the last good checkpoint. No checkpoint is written
from non-finite parameters."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from meshtron.train.metrics import read_metrics

# Test hook: `python POISON.py KIND RANK STEP meshtron-args...` runs meshtron with one fault injected on
# rank RANK at step STEP: KIND "loss" makes that rank's loss NaN (as a corrupt batch would), "param"
# writes inf into one of its parameters before the step (as an overflowing update would).
POISON = """
import sys

import torch
import torch.distributed as dist

from meshtron.cli import main
from meshtron.train.trainer import Trainer, _shard

kind, rank, step = sys.argv.pop(1), int(sys.argv.pop(1)), int(sys.argv.pop(1))
forward_backward = Trainer.forward_backward


def poisoned(self, batch, loss_scale):
    if dist.get_rank() != rank or self.state.step + 1 != step:
        return forward_backward(self, batch, loss_scale)
    if kind == "param":
        with torch.no_grad():
            _shard(next(self.model.parameters())).view(-1)[0] = float("inf")
        return forward_backward(self, batch, loss_scale)
    loss_sum = self.recipe.loss_sum
    self.recipe.loss_sum = lambda model, b: loss_sum(model, b) * float("nan")
    try:
        return forward_backward(self, batch, loss_scale)
    finally:
        del self.recipe.loss_sum


Trainer.forward_backward = poisoned
main()
"""

SAVE_EVERY_STEP = ["--checkpoint.interval", "1", "--checkpoint.keep", "0"]


def run_poisoned(config: Path, out: Path, kind: str, rank: int, step: int, nproc: int, overrides=()):
    script = out.parent / "poison.py"
    script.write_text(POISON)
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*launcher, str(script), kind, str(rank), str(step), "train", str(config), "--train.output_dir", str(out),
           *SAVE_EVERY_STEP, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    return result, read_metrics(out / "metrics.jsonl")


def state(checkpoint: Path) -> dict:
    """The model, optimizer state and grad scaler of a checkpoint (all ranks' shards, gathered); not the
    optimizer's lr, which the schedule moves on at every step, skipped or not."""
    flat = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, flat)
    saved = torch.load(flat, weights_only=False)
    return {f"{part}/{key}": value for part in ("model", "optimizer", "grad_scaler")
            for key, value in saved.get(part, {}).items() if not key.startswith("param_groups")}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not (torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor)
                                          else a[key] == b[key])]
    assert not different, different[:5]


@pytest.mark.parametrize("nproc, overrides", [
    (1, []),
    (2, ["--parallel.dp_shard", "2", "--model.dtype", "float16"]),  # FSDP with its sharded grad scaler
], ids=["one-process", "dp_shard2-fp16"])
def test_a_step_poisoned_on_one_rank_is_skipped_on_every_rank(tiny_config, tmp_path, nproc, overrides):
    out = tmp_path / "run"
    result, records = run_poisoned(tiny_config, out, "loss", rank=nproc - 1, step=3, nproc=nproc,
                                   overrides=overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert math.isnan(records[2]["loss"]) and all(math.isfinite(r["loss"]) for r in records[3:])
    assert "step 3 skipped: loss nan" in result.stderr
    checkpoints = out / "checkpoints"
    before, skipped, after = (state(checkpoints / f"step-{s}") for s in (2, 3, 4))
    if "--model.dtype" in overrides:
        assert "grad_scaler/scale" in before
    assert_same_state(before, skipped)  # step 3 changed nothing, on any rank
    assert not torch.equal(skipped["model/embed.weight"], after["model/embed.weight"])  # step 4 trained again


def test_a_diverged_run_stops_naming_the_last_good_checkpoint(run_train, tiny_config, tmp_path):
    """The real route: at lr 1e30 step 1's update overflows the activations; every later loss is NaN."""
    out = tmp_path / "run"
    result, records = run_train(tiny_config, out, overrides=["--optim.lr", "1e30", "--optim.grad_clip", "0",
                                                             *SAVE_EVERY_STEP], check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("meshtron train: error: training stopped at step 4: 3 steps in a row had a non-finite "
                           "loss or gradient norm"), last
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step-3'};" in last
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]  # train.max_skipped_steps = 3 by default
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-1", "step-2", "step-3"]
    assert_same_state(state(out / "checkpoints" / "step-1"), state(out / "checkpoints" / "step-3"))


def test_no_checkpoint_is_written_from_non_finite_parameters(tiny_config, tmp_path):
    out = tmp_path / "run"
    result, records = run_poisoned(tiny_config, out, "param", rank=1, step=3, nproc=2,
                                   overrides=["--parallel.dp_shard", "2"])
    assert result.returncode != 0
    assert "training stopped at step 3: the parameters hold inf or NaN. Last good checkpoint: " \
           f"{out / 'checkpoints' / 'step-2'};" in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-1", "step-2"]
    assert [r["step"] for r in records] == [1, 2, 3]  # step 3 is logged before the run stops
