"""The shipped alignment configs on the example model reach their targets (slow: minutes each on
2 CPU cores). DPO and SimPO: reward accuracy on the training pairs >= 0.9 within a few dozen steps
and a growing margin. rm: held-out accuracy >= 0.9. prm: held-out per-step accuracy >= 0.9. grpo and
ppo: held-out greedy accuracy on the arithmetic questions up by >= 15 points (ppo: the rollouts' mean
reward too).

Each is an acceptance test: CI runs it after the default suite (`python -m pytest -m acceptance` alone)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.smollm2


def train(config: str, out: Path, smollm2_dir, *overrides) -> list[dict]:
    cmd = [sys.executable, "-m", "meshtron", "train", str(REPO / "configs" / "smollm2" / config),
           "--train.output_dir", str(out), "--model.name_or_path", str(smollm2_dir), "--checkpoint.save_final", "false",
           *overrides]  # no checkpoint: the targets are read from metrics.jsonl (a SmolLM2 one with Adam is 1.6 GB)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=7200,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# Steps each preference config runs here, the fewest that reach the target (measured on 2 idle cores): dpo's
# accuracy is 1, 1, 1, 1, 0.875, 0.875 at steps 5-10 of a 10-step run (4.2 min, half its shipped 20 steps);
# simpo's last five of 10 steps average 0.875, short of 0.9, so it runs its shipped 20.
PREFERENCE_STEPS = {"dpo.toml": 10, "simpo.toml": 20}


@pytest.mark.parametrize("config", [pytest.param("dpo.toml", marks=pytest.mark.acceptance),
                                    pytest.param("simpo.toml", marks=pytest.mark.acceptance)])
def test_preference_accuracy_and_margin(config, smollm2_dir, tmp_path):
    steps = str(PREFERENCE_STEPS[config])
    records = [r for r in train(config, tmp_path / "run", smollm2_dir, "--train.steps", steps) if "loss" in r]
    last = records[-5:]
    assert sum(r["rewards/accuracy"] for r in last) / len(last) >= 0.9
    first_margin = sum(r["rewards/margin"] for r in records[:3]) / 3
    assert sum(r["rewards/margin"] for r in last) / len(last) > first_margin


@pytest.mark.acceptance
def test_reward_model_held_out_accuracy(smollm2_dir, tmp_path):
    """20 of the shipped 40 steps: held-out accuracy 0.983 at step 20 (4.1 to 6.4 min on 2 idle cores); a 10-step run
    reached 0.833 (from 0.667), short of 0.9."""
    evals = [r for r in train("rm.toml", tmp_path / "run", smollm2_dir, "--train.steps", "20")
             if "eval_rewards/accuracy" in r]
    assert evals[-1]["eval_rewards/accuracy"] >= 0.9


@pytest.mark.acceptance
def test_process_reward_model_held_out_step_accuracy(smollm2_dir, tmp_path):
    """The shipped 100 steps, evaluated at steps 0 and 100 only (the shipped config also evaluates at step 50):
    held-out per-step accuracy 0.944 in 9.5 min on 2 idle cores. Fewer steps fall short: a 50-step run reached
    0.867 at step 25 and 0.844 at step 50; a higher peak lr does worse (1e-4: 0.789 at step 40 of 60; 2e-4:
    0.722 after 40)."""
    evals = [r for r in train("prm.toml", tmp_path / "run", smollm2_dir, "--train.eval_interval", "100")
             if "eval_accuracy" in r]
    assert evals[-1]["eval_accuracy"] >= 0.9


@pytest.mark.acceptance
def test_grpo_raises_held_out_accuracy_by_15_points(smollm2_dir, tmp_path):
    evals = [r for r in train("grpo.toml", tmp_path / "run", smollm2_dir) if "eval_reward/math" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    assert evals[-1]["eval_reward/math"] - evals[0]["eval_reward/math"] >= 0.15


@pytest.mark.acceptance
def test_ppo_raises_the_mean_reward(smollm2_dir, tmp_path):
    """Measured (docs/rl.md): held-out greedy accuracy 8.3% -> 36.7%, the rollouts' mean reward 0.10 over
    the first three steps and 0.38 over the last three."""
    records = train("ppo.toml", tmp_path / "run", smollm2_dir)
    evals = [r for r in records if "eval_reward/math" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] > 0
    assert evals[-1]["eval_reward/math"] - evals[0]["eval_reward/math"] >= 0.15
    rewards = [r["reward"] for r in records if "reward" in r]
    assert sum(rewards[-3:]) / 3 - sum(rewards[:3]) / 3 >= 0.15
