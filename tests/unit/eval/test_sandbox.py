"""The HumanEval sandbox contains what generated code must not do."""

import os

import pytest

from meshtron.eval.harness import pass_at_k
from meshtron.eval.sandbox import run_program


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3").passed
    result = run_program("assert sum([1, 2]) == 4")
    assert not result.passed and result.status == "failed" and "AssertionError" in result.detail


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", timeout=1.5)
    assert result.status == "timeout"


def test_write_outside_the_working_directory_is_refused(tmp_path):
    target = tmp_path / "escaped.txt"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    assert not run_program(f"open({str(target)!r}, 'w').write('x')").passed
    assert not run_program(f"import os\nos.remove({str(victim)!r})").passed
    assert not run_program(f"import shutil\nshutil.rmtree({str(tmp_path)!r})").passed
    assert not target.exists() and victim.read_text() == "keep me"
    # Inside its own temporary directory a program may write and read.
    assert run_program("open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'").passed


def test_network_is_refused():
    result = run_program("import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)")
    assert not result.passed and "sandbox" in result.detail
    assert not run_program("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)").passed


def test_fork_bomb_and_subprocesses_are_contained(tmp_path):
    result = run_program("import os\nwhile True:\n    os.fork()\n", timeout=3)
    assert not result.passed and "os.fork" in result.detail
    marker = tmp_path / "spawned"
    assert not run_program(f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}])").passed
    assert not run_program(f"import os\nos.system('touch {marker}')").passed
    assert not marker.exists()


def test_escape_hatches_are_closed():
    assert not run_program("import ctypes").passed
    assert not run_program("import multiprocessing").passed
    assert not run_program("x = bytearray(8 << 30)").passed  # memory limit


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (200, 17, 100)])
def test_pass_at_k_matches_the_reference_formula(n, c, k):
    from math import comb

    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_sandbox_leaves_no_temporary_directory():
    import tempfile

    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("meshtron-sandbox-")}
    run_program("open('x', 'w').write('y')")
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("meshtron-sandbox-")}
    assert after == before
