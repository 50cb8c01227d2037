"""Checkpoint integrity: every file of a 2-rank checkpoint has a checksum in the manifest;
`meshtron checkpoint verify` passes an intact checkpoint and names a damaged file; resume refuses a
damaged checkpoint in one line unless checkpoint.verify = false."""

import json
import os

import pytest
from launch import run_meshtron


def verify(path):
    return run_meshtron(["checkpoint", "verify", path], env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)


@pytest.fixture(scope="module")
def saved(run_train, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("integrity")
    run_train(tiny_config, out, nproc=2, overrides=["--train.steps", "2", "--checkpoint.save_final", "true",
                                                    "--parallel.dp_shard", "2"])
    return out


def test_manifest_covers_every_file_of_every_rank(saved):
    checkpoint = saved / "checkpoints" / "step-2"
    files = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = {p.name for p in checkpoint.iterdir() if p.is_file()} - {"manifest.json", "COMMITTED"}
    assert on_disk == set(files)
    assert {"__0_0.distcp", "__1_0.distcp", "rng-rank0.safetensors", "rng-rank1.safetensors", ".metadata"} <= on_disk
    assert all(files[name]["size"] == (checkpoint / name).stat().st_size for name in files)

    result = verify(saved)  # a run directory means its newest checkpoint
    assert result.returncode == 0 and f"{len(files)} files intact" in result.stdout, result.stderr


def test_damaged_checkpoint_is_named_and_refused(saved, run_train, tiny_config, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved, run)
    shard = run / "checkpoints" / "step-2" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: DCP would load it silently
    shard.write_bytes(bytes(data))

    result = verify(run / "checkpoints" / "step-2")
    assert result.returncode == 1
    assert "__1_0.distcp: checksum" in result.stdout and "does not match" in result.stdout

    refused, _ = run_train(tiny_config, run, overrides=["--train.steps", "3"], check=False)
    assert refused.returncode != 0
    assert "failed verification (__1_0.distcp: checksum" in refused.stderr
    assert "checkpoint.verify = false" in refused.stderr and "Traceback" not in refused.stderr

    _, records = run_train(tiny_config, run, overrides=["--train.steps", "3", "--checkpoint.verify", "false"])
    assert [r["step"] for r in records][-1] == 3
