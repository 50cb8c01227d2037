"""Nothing is deleted by surprise: commands that write outputs refuse to replace existing ones
without --force (exit 2, naming them) and never write into their own input."""

import os
import subprocess
import sys

import pytest


def meshtron(*args):
    return subprocess.run([sys.executable, "-m", "meshtron", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


def refused(result, *words):
    line = result.stderr.strip().splitlines()[-1]
    return result.returncode == 2 and all(w in line for w in words) and "Traceback" not in result.stderr


def test_convert_keeps_an_existing_directory_unless_forced(tiny_native_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert refused(meshtron("convert", "--input", tiny_native_dir, "--output", out), str(out), "--force")
    assert (out / "notes.txt").read_text() == "mine"
    assert meshtron("convert", "--input", tiny_native_dir, "--output", out, "--force").returncode == 0
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


@pytest.mark.parametrize("output", ["", "sub", ".."], ids=["is", "inside", "contains"])
def test_convert_never_writes_over_its_input(tiny_native_dir, output):
    before = sorted(p.name for p in tiny_native_dir.iterdir())
    result = meshtron("convert", "--input", tiny_native_dir, "--output", tiny_native_dir / output, "--force")
    assert refused(result, "is, contains or lies inside the input")
    assert sorted(p.name for p in tiny_native_dir.iterdir()) == before


def test_eval_keeps_an_existing_report(tiny_llama_dir, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}")
    result = meshtron("eval", "--model", tiny_llama_dir, "--tasks", "boolq", "--output", report)
    assert refused(result, "report.json", "--force") and report.read_text() == "{}"
