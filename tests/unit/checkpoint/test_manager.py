"""Finding checkpoints: only committed step-N directories count; paths resolve to the newest."""

import json

import pytest

from meshtron.checkpoint.manager import COMMIT_MARKER, FORMAT, MANIFEST, list_checkpoints, resolve_checkpoint
from meshtron.errors import UserError


def make(run, step, committed=True):
    path = run / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step}))
    if committed:
        (path / COMMIT_MARKER).write_text("ok\n")
    return path


def test_uncommitted_directories_are_skipped(tmp_path):
    make(tmp_path, 2)
    newest = make(tmp_path, 10)
    make(tmp_path, 12, committed=False)
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-2", "step-10"]  # numeric order
    assert resolve_checkpoint(tmp_path) == newest
    assert resolve_checkpoint(newest) == newest


def test_an_incomplete_checkpoint_named_directly_is_refused(tmp_path):
    torn = make(tmp_path, 3, committed=False)
    with pytest.raises(UserError, match="incomplete"):
        resolve_checkpoint(torn)


def test_a_directory_without_checkpoints(tmp_path):
    with pytest.raises(UserError, match="holds no complete meshtron checkpoint"):
        resolve_checkpoint(tmp_path)
