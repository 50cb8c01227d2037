"""Loading a checkpoint never executes code: `.metadata` and non-tensor entries are unpickled through
allowlists; anything else is refused with one line naming the file. Damaged checkpoints are named too."""

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from meshtron.checkpoint.reader import load_checkpoint, verify_checkpoint
from meshtron.errors import UserError


class CreatesFile:
    """Unpickling this opens (creates) `target`: what a crafted checkpoint would do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def save(path, state):
    dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def plain_state():
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "train_state": {"step": 4, "lr": [0.5], "name": "x"}}


def test_a_plain_checkpoint_loads(tmp_path):
    path = save(tmp_path / "ckpt", plain_state())
    state = {"model": {"w": torch.zeros(2, 3)}, "train_state": {"step": 0, "lr": [0.0], "name": ""}}
    load_checkpoint(state, path, no_dist=True)
    assert torch.equal(state["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert state["train_state"] == {"step": 4, "lr": [0.5], "name": "x"}


def test_a_metadata_payload_is_refused_and_never_runs(tmp_path):
    path = save(tmp_path / "ckpt", plain_state())
    target = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(CreatesFile(target)))
    with pytest.raises(UserError, match=r"\.metadata: refusing to load .* io\.open"):
        load_checkpoint({"model": {"w": torch.zeros(2, 3)}}, path, no_dist=True)
    assert not target.exists()


def test_a_non_tensor_entry_payload_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = save(tmp_path / "ckpt", {"train_state": {"step": CreatesFile(target)}})
    assert not target.exists()
    with pytest.raises(UserError, match=r"__0_0\.distcp: refusing to load entry 'train_state\.step'"):
        load_checkpoint({"train_state": {"step": 0}}, path, no_dist=True)
    assert not target.exists()


def test_a_missing_metadata_is_named(tmp_path):
    path = save(tmp_path / "ckpt", plain_state())
    (path / ".metadata").unlink()
    with pytest.raises(UserError, match=r"ckpt/\.metadata is missing"):
        verify_checkpoint(path)


@pytest.mark.parametrize("damage", ["missing", "truncated", "empty"])
def test_a_damaged_shard_is_named(tmp_path, damage):
    path = save(tmp_path / "ckpt", plain_state())
    shard = path / "__0_0.distcp"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:100] if damage == "truncated" else b"")
    with pytest.raises(UserError, match=rf"__0_0\.distcp is {'missing' if damage == 'missing' else 'truncated'}"):
        load_checkpoint({"model": {"w": torch.zeros(2, 3)}}, path, no_dist=True)
