"""One small SFT run of a gemma2-shaped flavor lowers the held-out loss (issue 14's "done when"):
gemma2:debug (sandwich and (1 + w) norms, GeGLU, soft-capped scores and logits, a window on one
layer) with the example model's vocabulary, fine-tuned on the shipped instruction set.

Slow (about a minute on one core): the default suite trains gemma2:debug on mock data in
tests/distributed/test_families.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CONFIG = """
[model]
name_or_path = "gemma2:debug"
tokenizer = "{tokenizer}"
args = {{vocab_size = 49152}}

[data]
paths = ["{data}/instructions.jsonl"]
eval_paths = ["{data}/instructions_heldout.jsonl"]
handler = "alpaca"

[train]
recipe = "sft"
steps = {steps}
global_batch_size = 4
micro_batch_size = 4
seq_length = 128
eval_interval = 0
sample_prompt = ""

[optim]
lr = 5e-3
weight_decay = 0.0
grad_clip = 1.0

[lr]
schedule = "cosine"
warmup_steps = 2
min_lr = 5e-4

[checkpoint]
interval = 0
save_final = false

[log]
interval = 1
tensorboard = false
plot = false
"""


@pytest.mark.acceptance
@pytest.mark.smollm2
def test_gemma2_sft_lowers_held_out_loss(smollm2_dir, tmp_path):
    steps = 16
    config = tmp_path / "sft_gemma2.toml"
    config.write_text(CONFIG.format(tokenizer=smollm2_dir, data=REPO / "data", steps=steps))
    cmd = [sys.executable, "-m", "meshtron", "train", str(config), "--train.output_dir", str(tmp_path / "run")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert set(evals) == {0, steps}
    # From a random start (about ln(49152) = 10.8 nats per token) the held-out loss falls by a quarter.
    assert evals[steps] < 0.75 * evals[0], evals
