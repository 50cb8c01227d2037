"""Run `meshtron` commands for the tests in fresh processes forked from a server that has already
imported torch and meshtron.

Each test runs meshtron as a user does, in its own processes, one per rank. Started from scratch, every
one of them spends 3-4 s of a core importing torch, torch.distributed and transformers, and torchrun
adds a process that imports torch too: on 2 cores that was most of the default suite's time (a 5-step
2-rank run: 9 s, 2 of them training). Here the ranks are forked from a `multiprocessing` fork server
that imported those modules once and never ran a torch op (so no thread pool is copied into a child).
Each rank gets the environment torchrun gives it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, the
restart count and an error file), and the job ends like torchrun's: the first rank that fails stops
the others and the launch returns 1. What the tests check of torchrun itself (restarts, signals to the
launcher, its exit codes) still runs under real torchrun: pass `torchrun=True`.
"""

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What every meshtron command imports before its own work: loaded once, in the fork server.
_PRELOAD = ["torch", "torch.distributed.tensor", "torch.distributed.checkpoint", "torch.distributed.fsdp",
            "transformers", "meshtron.cli", "meshtron.train.trainer"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(argv: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> None:
    """One rank: the environment, working folder and output files of a fresh process, then
    `python -m meshtron ARGV` as `meshtron/__main__.py` runs it."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(target, fd)
        os.close(target)
    # The import path of `python -m meshtron` started here: the working folder, then PYTHONPATH (user
    # modules such as reward functions are imported by name).
    extra = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    import torch

    from meshtron.cli import main

    # torch sizes its thread pool from OMP_NUM_THREADS at start-up, which here was the server's.
    if env.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["meshtron", *argv]
    code = 0
    try:
        main(argv)
    except SystemExit as e:  # as the interpreter ends: None is 0, a message is printed and is 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def _stop(processes, grace: float = 5.0) -> None:
    for p in processes:
        # terminate() tolerates a rank that exits between the check and the signal (os.kill raised
        # ProcessLookupError there once in CI).
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def run_meshtron(argv, nproc: int = 1, env: dict | None = None, timeout: float = 300, cwd=None,
                 torchrun: bool = False, max_restarts: int = 0) -> subprocess.CompletedProcess:
    """`python -m meshtron ARGV` (nproc 1) or `torchrun --standalone --nproc-per-node NPROC -m meshtron ARGV`,
    with `env` as the whole environment (default: this process's); what `subprocess.run(capture_output=True,
    text=True, timeout=...)` returns, or raises, for that command."""
    argv = [str(a) for a in argv]
    env = dict(os.environ if env is None else env)
    if torchrun or max_restarts:
        launcher = [sys.executable, "-m", "meshtron"] if nproc == 1 and not torchrun else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            f"--max-restarts={max_restarts}", "-m", "meshtron"]
        return subprocess.run([*launcher, *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    cwd = str(cwd or os.getcwd())
    with tempfile.TemporaryDirectory(prefix="meshtron-launch-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        envs = [env] if nproc == 1 else [{**env, **_rank_env(rank, nproc, tmp, port)}
                                         for port in [str(_free_port())] for rank in range(nproc)]
        processes = [_server().Process(target=_rank_main, args=(argv, e, cwd, str(out), str(err))) for e in envs]
        for p in processes:
            p.start()
        code = _wait(processes, timeout, argv, out, err)
        # torchrun reports a failed job as 1, whatever the rank's own code.
        return subprocess.CompletedProcess(["meshtron", *argv], code if nproc == 1 else int(code != 0),
                                           out.read_text(errors="replace"), err.read_text(errors="replace"))


def _rank_env(rank: int, nproc: int, tmp: str, port: str) -> dict:
    error_file = Path(tmp, "attempt_0", str(rank), "error.json")
    error_file.parent.mkdir(parents=True, exist_ok=True)
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
            "TORCHELASTIC_RUN_ID": "meshtron-test", "TORCHELASTIC_ERROR_FILE": str(error_file)}


def _wait(processes, timeout: float, argv, out: Path, err: Path) -> int:
    """The launch's exit code: the first failing rank's (the others are stopped, as torchrun does), else 0."""
    deadline = time.monotonic() + timeout
    pending = list(processes)
    while pending:
        for p in list(pending):
            p.join(0.05)
            if p.exitcode is None:
                continue
            pending.remove(p)
            if p.exitcode != 0:
                _stop(pending)
                return p.exitcode
        if time.monotonic() > deadline:
            _stop(pending)
            raise subprocess.TimeoutExpired(["meshtron", *argv], timeout, out.read_text(errors="replace"),
                                            err.read_text(errors="replace"))
    return 0
