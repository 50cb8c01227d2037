"""Nothing is deleted by surprise: commands that write outputs refuse to replace existing ones
without --force (exit 2, naming them) and never write into their own input."""

import os
import subprocess

import pytest
from launch import run_meshtron


def meshtron(*args):
    return run_meshtron(args, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


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


def test_no_single_process_warning_on_convert_and_generate_from_a_checkpoint(tiny_llama_dir, tiny_native_dir,
                                                                            tmp_path):
    """torch warns that it assumes a single-process load (or save); meshtron asks for exactly that."""
    results = [meshtron("convert", "--input", tiny_llama_dir, "--output", tmp_path / "native"),
               meshtron("convert", "--input", tiny_native_dir, "--output", tmp_path / "hf"),
               meshtron("generate", "--model", tiny_native_dir, "--prompt", "Hi", "--max-new-tokens", "2")]
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "assuming the intent" not in result.stderr and "UserWarning" not in result.stderr


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (a tmpfs mounted ro); needs root, skipped elsewhere."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a read-only file system needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_an_output_on_a_read_only_file_system_is_one_line(tiny_native_dir, read_only_dir, tmp_path):
    result = meshtron("convert", "--input", tiny_native_dir, "--output", read_only_dir / "hf")
    assert refused(result, "read-only file system", str(read_only_dir))
    (tmp_path / "c.toml").write_text('[model]\nname_or_path = "llama:debug"\n[data]\nmock = true\n'
                                     '[train]\nsteps = 1\nglobal_batch_size = 2\nmicro_batch_size = 2\nseq_length = 16\n')
    result = meshtron("train", tmp_path / "c.toml", "--train.output_dir", read_only_dir / "run")
    assert refused(result, "read-only file system", str(read_only_dir / "run"))


def test_score_never_writes_over_its_input_and_keeps_an_existing_output(tiny_llama_dir, tmp_path):
    data = tmp_path / "responses.jsonl"
    data.write_text('{"prompt": "Hi", "response": "Hello"}\n')
    result = meshtron("score", "--model", tiny_llama_dir, "--input", data, "--output", data, "--force")
    assert refused(result, "is, contains or lies inside the input") and data.read_text().startswith('{"prompt"')
    (tmp_path / "scored.jsonl").write_text("earlier\n")
    result = meshtron("score", "--model", tiny_llama_dir, "--input", data, "--output", tmp_path / "scored.jsonl")
    assert refused(result, "scored.jsonl", "--force") and (tmp_path / "scored.jsonl").read_text() == "earlier\n"
