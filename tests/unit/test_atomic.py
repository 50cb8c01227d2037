"""atomic_directory: a failed write leaves the previous directory untouched; a good one replaces it, with
the modes the user's umask gives. check_output: nothing is replaced without --force, no output inside its input."""

import os
import stat

import pytest
import torch

from meshtron.checkpoint.atomic import atomic_directory, check_output
from meshtron.errors import UserError


def test_failed_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "export"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "first"
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary leftovers


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_follow_the_umask(tmp_path, umask):
    from safetensors.torch import save_file

    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "export") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors writes 0600
            (tmp / "sub").mkdir(mode=0o700)
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "export") == mode(tmp_path / "export" / "sub") == 0o777 & ~umask
    assert mode(tmp_path / "export" / "model.safetensors") == 0o666 & ~umask


def test_check_output_refuses_what_it_would_replace(tmp_path):
    check_output(tmp_path / "new")  # absent
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"full.* already exists .* --force"):
        check_output(tmp_path / "full")
    check_output(tmp_path / "full", force=True)
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(UserError, match="report.json already exists"):
        check_output(tmp_path / "report.json")
    with pytest.raises(UserError, match="data_text_document.bin already exists"):
        check_output(tmp_path / "data", existing=[tmp_path / "data_text_document.bin"])


@pytest.mark.parametrize("output", ["run", "run/hf", "."], ids=["is", "inside", "contains"])
def test_check_output_refuses_its_input_even_with_force(tmp_path, output):
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match="is, contains or lies inside the input"):
        check_output(tmp_path / output, inputs=[tmp_path / "run"], force=True)
