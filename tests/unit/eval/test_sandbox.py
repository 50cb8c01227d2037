"""The HumanEval sandbox: programs run and fail as they should, limits hold, and writes by every
route (absolute, relative after chdir, *at() calls with a directory descriptor) leave a directory the
program can see untouched. The full table of escape attempts runs end to end in
tests/integration/test_eval_sandbox.py."""

import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import meshtron

from meshtron.eval.results import pass_at_k
from meshtron.eval.sandbox import KERNEL, NONE, Limits, run_program


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3").passed
    result = run_program("assert sum([1, 2]) == 4")
    assert not result.passed and result.status == "failed" and result.detail == "AssertionError"


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", limits=Limits(timeout=1.5))
    assert result.status == "timeout"


def test_the_program_runs_as_nobody_without_capabilities():
    code = ("import os\nassert (os.getuid(), os.getgid()) == (65534, 65534)\n"
            "status = dict(line.split(':', 1) for line in open('/proc/self/status'))\n"
            "assert int(status['CapEff'], 16) == 0 and status['NoNewPrivs'].strip() == '1'\n"
            "assert os.listdir('/proc') and [p for p in os.listdir('/proc') if p.isdigit()] == ['1']\n")
    result = run_program(code)
    assert result.passed, result.detail


ROUTES = {
    "absolute": "open(V + '/a.txt', 'w').write('changed')",
    "relative": "os.chdir(V)\nopen('a.txt', 'w').write('changed')",
    "relative_remove": "os.chdir(V)\nos.remove('a.txt')",
    "dir_fd_unlink": "os.unlink('a.txt', dir_fd=os.open(V, os.O_RDONLY))",
    "dir_fd_create": "os.open('b.txt', os.O_CREAT | os.O_WRONLY, dir_fd=os.open(V, os.O_RDONLY))",
    "dir_fd_rename": "fd = os.open(V, os.O_RDONLY)\nos.rename('a.txt', 'c.txt', src_dir_fd=fd, dst_dir_fd=fd)",
}


@pytest.mark.parametrize("route", ROUTES)
def test_writes_by_every_route_leave_a_visible_directory_untouched(visible_victim, route):
    (visible_victim / "a.txt").write_text("original")
    (visible_victim / "a.txt").chmod(0o666)
    visible_victim.chmod(0o777)  # permissions would allow it: only the sandbox stops it
    code = f"import os\nV = {str(visible_victim)!r}\nassert os.path.isdir(V)\n{ROUTES[route]}\n"
    result = run_program(code)
    assert not result.passed and "Read-only file system" in result.detail, result.detail
    assert sorted(p.name for p in visible_victim.iterdir()) == ["a.txt"]
    assert (visible_victim / "a.txt").read_text() == "original"


def test_the_same_routes_write_without_the_sandbox(tmp_path):
    """The routes above are real: unconfined, each one succeeds."""
    for route, body in ROUTES.items():
        (tmp_path / "a.txt").write_text("original")
        result = run_program(f"import os\nV = {str(tmp_path)!r}\n{body}\n", sandbox=NONE)
        assert result.passed, (route, result.detail)


def test_network_is_refused():
    result = run_program("import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)")
    assert not result.passed and "Permission denied" in result.detail


def test_memory_and_file_size_limits():
    assert run_program("x = bytearray(8 << 30)").detail == "MemoryError"
    result = run_program("open('big', 'wb').write(b'x' * (2 << 20))", limits=Limits(file_bytes=1 << 20))
    assert not result.passed and "File too large" in result.detail
    # Writes past the limit fail; a program that keeps trying is killed, long before its time is up.
    endless = "import os\nwhile True:\n    try:\n        os.write(1, b'x' * 65536)\n    except OSError:\n        pass"
    result = run_program(endless, limits=Limits(file_bytes=1 << 20, timeout=60))
    assert result.status == "failed" and result.detail == f"killed: its output reached {1 << 20} bytes"


def test_nothing_the_program_started_outlives_it():
    """Confined, the pid namespace ends with the program, a new session included; unconfined, its
    process group is killed (a new session escapes it: one reason to keep the sandbox)."""
    code = ("import subprocess\nsubprocess.Popen(['sleep', '313.25'])\n"
            "subprocess.Popen(['sleep', '313.5'], start_new_session=True)")
    assert run_program(code).passed
    assert _sleepers("313.25") == _sleepers("313.5") == []
    assert run_program(code, sandbox=NONE).passed
    assert _sleepers("313.25") == []
    for pid in _sleepers("313.5"):
        os.kill(int(pid), 9)


def _sleepers(seconds: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == f"sleep\0{seconds}\0".encode():
                found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.parametrize("sandbox", [KERNEL, NONE])
def test_sandbox_leaves_no_temporary_directory(sandbox):
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("meshtron-sandbox-")}
    assert run_program("open('x', 'w').write('y')", sandbox=sandbox).passed
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("meshtron-sandbox-")}
    assert after == before


def test_a_virtual_environment_under_tmp_is_shown_read_only(tmp_path):
    """meshtron installed in a venv below /tmp (which the sandbox replaces with its own): the
    program runs on that venv's Python, with its packages, and cannot write there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    repo = Path(meshtron.__file__).resolve().parents[1]
    code = (f"import sys\nassert sys.prefix == {str(venv)!r}, sys.prefix\n"
            f"open({str(venv)!r} + '/x', 'w')")
    check = ("from meshtron.eval.sandbox import run_program\n"
             f"print(run_program({code!r}).detail)")
    result = subprocess.run([str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(repo)))
    assert result.returncode == 0, result.stderr
    assert "Read-only file system" in result.stdout and str(venv / "x") in result.stdout, result.stdout
    assert not (venv / "x").exists()


def _first_closed_ancestor(path: Path) -> Path | None:
    """The first directory above `path` that others cannot enter (root's home, for a pyenv Python)."""
    return next((p for p in reversed(path.parents) if not p.stat().st_mode & 0o001), None)


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming an unprivileged user needs root")
def test_an_unprivileged_user_gets_the_same_confinement(visible_victim, tmp_path):
    """meshtron run by uid 65534: the sandbox builds its own user namespace, with the same walls.
    Directories that 65534 could not enter (e.g. /root above a pyenv Python) are covered, in a
    private mount namespace, by an open tmpfs with the interpreter and this checkout bound back."""
    nobody = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if subprocess.run([*nobody, "unshare", "--user", "true"], capture_output=True, cwd="/").returncode != 0:
        pytest.skip("this kernel does not let unprivileged users create user namespaces")
    visible_victim.chmod(0o777)
    repo = Path(meshtron.__file__).resolve().parents[1]
    save, cover, restore = [], [], []
    for i, path in enumerate((Path(sys.prefix).resolve(), repo)):
        closed = _first_closed_ancestor(path)
        if closed is not None:
            saved = tmp_path / f"saved{i}"
            saved.mkdir()
            save.append(f"mount --bind {shlex.quote(str(path))} {saved}")
            cover.append(f"mountpoint -q {closed} || mount -t tmpfs -o mode=755 tmpfs {closed}")
            restore.append(f"mkdir -p {shlex.quote(str(path))} && mount --bind {saved} {shlex.quote(str(path))}")
    check = textwrap.dedent(f"""
        import os
        from meshtron.eval.sandbox import run_program
        assert os.getuid() == 65534
        escape = run_program("import os\\nassert os.getuid() == 65534\\nopen({str(visible_victim)!r} + '/x', 'w')")
        assert not escape.passed and "Read-only file system" in escape.detail, escape
        assert run_program("open('f', 'w').write('x')\\nimport socket\\nsocket.socket()").detail.endswith(
            "Permission denied")
        print("confined")
    """)
    become = (f"exec {shlex.join(nobody)} env PYTHONPATH={shlex.quote(str(repo))} "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(check)}")
    script = " && ".join([*save, *cover, *restore, become])
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0 and result.stdout.strip() == "confined", result.stderr[-3000:]
    assert list(visible_victim.iterdir()) == []


@pytest.mark.parametrize("n,c,k", [(10, 3, 1), (10, 3, 5), (20, 0, 10), (5, 5, 2), (200, 17, 100)])
def test_pass_at_k_matches_the_reference_formula(n, c, k):
    from math import comb

    expected = 1.0 - comb(n - c, k) / comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
