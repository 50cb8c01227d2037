"""The example model (tied embeddings) fine-tuned through a 2-stage pipeline: the same losses as one
process, and the pipeline's checkpoint generates at one process (slow: a few minutes on 2 cores)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.acceptance, pytest.mark.smollm2]
COMMON = ["--train.steps", "2", "--data.eval_paths", "[]", "--log.plot", "false", "--train.micro_batch_size", "1"]


def train(out: Path, smollm2_dir, nproc: int, *overrides) -> list[float]:
    launcher = [sys.executable, "-m", "meshtron"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "meshtron"]
    cmd = [*launcher, "train", str(REPO / "configs" / "smollm2" / "sft_full.toml"), "--train.output_dir", str(out),
           "--model.name_or_path", str(smollm2_dir), *COMMON, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def generate(model_dir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "meshtron", "generate", "--model", str(model_dir), "--chat",
         "--prompt", "What is the capital of France?", "--max-new-tokens", "12", "--temperature", "0"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_smollm2_sft_through_a_pipeline(smollm2_dir, tmp_path):
    single = train(tmp_path / "single", smollm2_dir, 1)
    piped = train(tmp_path / "piped", smollm2_dir, 2, "--parallel.pp", "2")
    assert piped == pytest.approx(single, rel=1e-4)
    # The pipeline's checkpoint (two stages' shards) loads at one process and answers as the one-process run's
    # does, greedy token for token (two steps of SFT on the shipped arithmetic and word tasks may move the
    # answer off "Paris"; that is not what this checks).
    answer = generate(tmp_path / "piped")
    assert answer.strip() and answer == generate(tmp_path / "single")
