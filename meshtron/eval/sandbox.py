"""Run untrusted generated code (HumanEval) in a separate process that the Linux kernel confines.

The wall is the kernel, not Python: each program runs in its own user/mount/network/pid/IPC
namespaces, sees a read-only file system with a private writable /tmp, runs as uid 65534 without
capabilities, under resource limits and a seccomp filter (the steps are in `confine.py`; what they
hold and what they do not is in docs/evaluation.md). Where the kernel cannot confine it, generated
code is not run unless the user opts out of the sandbox explicitly (`--no-sandbox`), which the
report records as `"sandbox": "none"`.
"""

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from meshtron.errors import UserError

log = logging.getLogger(__name__)

KERNEL = "linux-namespaces"
NONE = "none"
_CONFINE = Path(__file__).with_name("confine.py")


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds; the program and everything it started are killed
    memory_bytes: int = 2 << 30  # address space
    max_processes: int = 32
    file_bytes: int = 16 << 20  # the largest file it may write, its output included
    tmp_bytes: int = 64 << 20  # its writable /tmp in all


@dataclass
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


class SandboxUnavailable(UserError):
    pass


def run_program(code: str, sandbox: str = KERNEL, limits: Limits = Limits()) -> ExecResult:
    """Execute `code` as a program; passed means it exited 0 within the time limit."""
    settings = {**asdict(limits), "confine": sandbox == KERNEL, "cpu_seconds": int(limits.timeout) + 1}
    with tempfile.TemporaryFile() as output:
        settings["output_fd"] = output.fileno()
        # -S: the confining script needs the standard library only.
        proc = subprocess.run([sys.executable, "-I", "-S", "-B", str(_CONFINE), json.dumps(settings)],
                              input=code.encode(), capture_output=True, pass_fds=(output.fileno(),),
                              timeout=limits.timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"the sandbox failed: {proc.stderr.decode(errors='replace')[-2000:]}")
        outcome = json.loads(proc.stdout)
        if outcome["status"] == "unavailable":
            raise SandboxUnavailable(f"cannot confine generated code here: {outcome['reason']}")
        if outcome["status"] == "timeout":
            return ExecResult(False, "timeout", f"exceeded {limits.timeout}s")
        if outcome["status"] == "output":
            return ExecResult(False, "failed", f"killed: its output reached {limits.file_bytes} bytes")
        if outcome["status"] == "signal":
            return ExecResult(False, "failed", f"killed by {signal.Signals(outcome['signal']).name}")
        if outcome["code"] == 0:
            return ExecResult(True, "passed")
        return ExecResult(False, "failed", _last_line(output) or f"exit code {outcome['code']}")


def _last_line(output) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - 4096))
    lines = output.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else ""


@functools.cache
def confinement_problem() -> str | None:
    """Why the kernel cannot confine programs on this machine, or None when it can."""
    try:
        result = run_program("pass")
    except SandboxUnavailable as e:
        return str(e)
    return None if result.passed else f"a confined test program failed ({result.detail})"


def choose_sandbox(no_sandbox: bool) -> str:
    """The sandbox to run generated code in: the kernel's, or none when the user asks for none;
    refuses where the kernel cannot confine it."""
    if no_sandbox:
        log.warning("running generated code WITHOUT a sandbox (--no-sandbox): it can do anything you can")
        return NONE
    problem = confinement_problem()
    if problem is None:
        return KERNEL
    raise SandboxUnavailable(f"{problem}. Run where the kernel allows namespaces (as root, or with unprivileged "
                             "user namespaces enabled), or pass --no-sandbox to run generated code unconfined "
                             "at your own risk")
