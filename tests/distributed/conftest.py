"""Fixtures of the multi-process tests: a tiny training config and a `meshtron train` runner that
launches torchrun (gloo on CPU) and returns the run's metrics records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The llama:debug model on deterministic mock data, a few float32 steps; no plot, TensorBoard or
# final checkpoint unless a test asks for them.
TINY_CONFIG = """
[model]
name_or_path = "llama:debug"
[data]
mock = true
[train]
steps = 5
global_batch_size = 4
micro_batch_size = 2
seq_length = 32
[optim]
lr = 0.01
[lr]
warmup_steps = 1
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.toml"
    path.write_text(TINY_CONFIG)
    return path


def _run_train(config: Path, output_dir: Path, nproc: int = 1, overrides=(), check: bool = True, timeout: int = 300,
               env: dict | None = None, max_restarts: int = 0):
    """(completed process, metrics records). One thread per rank so ranks share the cores without oversubscription.
    `env`: extra environment (drill switches); `max_restarts`: torchrun's --max-restarts."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    launcher = [sys.executable, "-m", "meshtron"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "meshtron"]
    cmd = [*launcher, "train", str(config), "--train.output_dir", str(output_dir), *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result, read_records(output_dir)


def read_records(output_dir: Path) -> list[dict]:
    metrics = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []


@pytest.fixture(scope="session")
def run_train():
    """`run_train(config, output_dir, nproc=1, overrides=(), check=True)` -> (process, metrics records)."""
    return _run_train


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """A tiny random Llama saved as an HF directory (safetensors): a pretrained-model source."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("hf") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path
