"""Hostile and damaged checkpoints through the commands: a `.metadata` that would run code is refused
with one line naming it (generate, convert, train resume) and the code never runs."""

import os
import pickle
import shutil

import pytest
from launch import run_meshtron

CONFIG = """
[model]
name_or_path = "llama:debug"
args = { num_layers = 1 }
[data]
mock = true
[train]
steps = 2
global_batch_size = 2
micro_batch_size = 2
seq_length = 16
[log]
tensorboard = false
plot = false
"""


class CreatesFile:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def meshtron(*args, check=True):
    result = run_meshtron(args, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(config, a 2-step run directory with checkpoint step-2)."""
    root = tmp_path_factory.mktemp("safety")
    (root / "c.toml").write_text(CONFIG)
    meshtron("train", root / "c.toml", "--train.output_dir", root / "run")
    return root / "c.toml", root / "run"


@pytest.fixture
def poisoned(trained, tmp_path):
    """A copy of the run whose checkpoint metadata creates `tmp_path/pwned` when unpickled."""
    config, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    target = tmp_path / "pwned"
    (copy / "checkpoints" / "step-2" / ".metadata").write_bytes(pickle.dumps(CreatesFile(target)))
    return config, copy, target


def assert_refused(result, target):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "step-2/.metadata: refusing to load this checkpoint" in lines[-1] and "Traceback" not in result.stderr
    assert not target.exists()


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_a_crafted_metadata_never_runs(poisoned, tmp_path, command):
    _, run, target = poisoned
    args = (["generate", "--model", run, "--prompt", "Hi", "--max-new-tokens", "2"] if command == "generate"
            else ["convert", "--input", run, "--output", tmp_path / "hf"])
    assert_refused(meshtron(*args, check=False), target)


def test_train_resume_of_a_crafted_checkpoint_never_runs(poisoned):
    config, run, target = poisoned
    # Without the checksum check (a forger can rewrite the manifest too), the reader itself refuses.
    result = meshtron("train", config, "--train.output_dir", run, "--train.steps", "3", "--checkpoint.verify", "false",
                      check=False)
    assert_refused(result, target)
