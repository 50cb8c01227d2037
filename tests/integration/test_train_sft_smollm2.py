"""Full SFT of the example model with the shipped config lowers the held-out loss clearly.

Slow (a few minutes on 2 CPU cores): the default suite covers SFT on a tiny model in
test_train_cli.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.acceptance
@pytest.mark.smollm2
def test_sft_full_lowers_held_out_loss(smollm2_dir, tmp_path):
    cmd = [sys.executable, "-m", "meshtron", "train", str(REPO / "configs" / "smollm2" / "sft_full.toml"),
           "--train.output_dir", str(tmp_path / "run"), "--train.steps", "8", "--train.eval_interval", "0",
           "--model.name_or_path", str(smollm2_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=1800,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert set(evals) == {0, 8}
    assert evals[8] < 0.8 * evals[0], evals
    manifest = json.loads((tmp_path / "run" / "checkpoints" / "step-8" / "manifest.json").read_text())
    assert manifest["recipe"] == "sft" and manifest["chat_template"]
