"""Run untrusted generated code (HumanEval) so that it cannot harm the machine or the user's files.

Layers, each covering what the others might miss:
- its own process in its own session, killed with its whole process group at the timeout;
- resource limits: CPU seconds, address space, file size, no core dumps;
- a fresh temporary working directory, removed afterwards, and a minimal environment;
- no network: a new network namespace (`unshare -rn`) where the kernel allows it, and in any
  case a Python audit hook that refuses sockets;
- the same audit hook (installed before the program runs; hooks cannot be removed) refuses
  writes, deletions and renames outside the temporary directory, process creation
  (fork, exec, spawn, subprocess, system) and the modules that could step around it
  (ctypes, _posixsubprocess, multiprocessing).

This is a strong guard against the mistakes and accidents generated code makes; for hostile
code at scale, run evaluation inside a container or VM as well.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass

_UNSHARE = shutil.which("unshare")
_NETNS_OK: bool | None = None

# The runner executes inside the child: limits, then the audit hook, then the program.
_RUNNER = textwrap.dedent(
    r'''
    import os, resource, sys
    ROOT = os.path.realpath(os.getcwd())
    MEM = int(sys.argv[2]); CPU = int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (MEM, MEM))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    source = open(sys.argv[1]).read()

    def inside(path):
        if isinstance(path, int):
            return True
        try:
            path = os.fsdecode(path)
        except TypeError:
            return False
        real = os.path.realpath(os.path.join(ROOT, path))
        return real == ROOT or real.startswith(ROOT + os.sep)

    BLOCKED = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.kill",
               "os.killpg", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind",
               "socket.getaddrinfo", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "os.chroot", "os.setuid"}
    PATH_EVENTS = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate", "os.utime",
                   "os.symlink", "os.link", "os.rename", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
    BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event in BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
            raise PermissionError(f"sandbox: import of {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & WRITE_FLAGS
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} outside the working directory")
        elif event in PATH_EVENTS:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            if not all(inside(p) for p in paths):
                raise PermissionError(f"sandbox: {event} outside the working directory")

    sys.addaudithook(hook)
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
    '''
)


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


def _netns_available() -> bool:
    global _NETNS_OK
    if _NETNS_OK is None:
        _NETNS_OK = bool(_UNSHARE) and subprocess.run([_UNSHARE, "-rn", "true"], capture_output=True).returncode == 0
    return _NETNS_OK


def run_program(code: str, timeout: float = 10.0, memory_bytes: int = 2 << 30) -> ExecResult:
    """Execute `code` as a program in the sandbox; passed means it exited 0 within the timeout."""
    with tempfile.TemporaryDirectory(prefix="meshtron-sandbox-") as workdir:
        program = os.path.join(workdir, "program.py")
        runner = os.path.join(workdir, "runner.py")
        with open(program, "w") as f:
            f.write(code)
        with open(runner, "w") as f:
            f.write(_RUNNER)
        cmd = [sys.executable, "-I", runner, program, str(memory_bytes), str(int(timeout) + 1)]
        if _netns_available():
            cmd = [_UNSHARE, "-rn", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1",
               "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return ExecResult(False, "timeout", f"exceeded {timeout}s")
        finally:
            _kill_group(proc)  # anything the program left behind in its session
        if proc.returncode == 0:
            return ExecResult(True, "passed")
        lines = err.decode(errors="replace").strip().splitlines()
        return ExecResult(False, "failed", lines[-1] if lines else f"exit code {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
