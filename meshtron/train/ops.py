"""Operations around the training loop: where a step's time goes (and which rank is slow), the hang
watchdog, the last good state saved on a failed step, and the drill switches that inject faults.

The trainer calls these objects at fixed points of its loop; none of them changes what a step
computes.

Drill switches (environment; for tests and fire drills, never set in production):
  MESHTRON_FAULT_AT_STEP=N        the picked rank dies (SIGKILL) as step N starts
  MESHTRON_FAULT_HANG_AT_STEP=N   the picked rank stops (sleeps forever) as step N starts
  MESHTRON_FAULT_RAISE_AT_STEP=N  the picked rank raises an error while loading step N's data
  MESHTRON_FAULT_SLOW_S=S         the picked rank spends S more seconds loading each step's data
  MESHTRON_FAULT_RANK=R           the rank they apply to (default 0; "all": every rank)
Kill, hang and raise fire on the first launch only (TORCHELASTIC_RESTART_COUNT unset or 0), so a
job restarted by torchrun runs through the step that failed.
"""

import datetime
import faulthandler
import logging
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 124  # as timeout(1): the job did not finish in time


def restart_attempt() -> int:
    """How many times torchrun has restarted this job (0 on the first launch or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


# ---- drill switches ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultDrill:
    kill_at: int = 0
    hang_at: int = 0
    raise_at: int = 0
    slow_s: float = 0.0
    private_run_dir: bool = False
    applies: bool = False  # whether this rank is the one picked
    rank: int = 0

    @classmethod
    def from_env(cls, rank: int) -> "FaultDrill":
        env = os.environ
        picked = env.get("MESHTRON_FAULT_RANK", "0")
        first_launch = restart_attempt() == 0
        return cls(
            kill_at=int(env.get("MESHTRON_FAULT_AT_STEP", 0)) if first_launch else 0,
            hang_at=int(env.get("MESHTRON_FAULT_HANG_AT_STEP", 0)) if first_launch else 0,
            raise_at=int(env.get("MESHTRON_FAULT_RAISE_AT_STEP", 0)) if first_launch else 0,
            slow_s=float(env.get("MESHTRON_FAULT_SLOW_S", 0)),
            private_run_dir=env.get("MESHTRON_FAULT_PRIVATE_RUN_DIR") == "1",
            applies=picked == "all" or int(picked) == rank,
            rank=rank,
        )

    def run_dir(self, path: Path) -> Path:
        """The run directory this rank sees: with MESHTRON_FAULT_PRIVATE_RUN_DIR=1 a directory of its own
        (PATH-rankR), as a node-local disk would give it."""
        if self.private_run_dir and self.applies:
            return path.with_name(f"{path.name}-rank{self.rank}")
        return path

    def before_step(self, step: int) -> None:
        """Called as `step` starts, inside its data phase."""
        if not self.applies:
            return
        if step == self.kill_at:
            log.warning("drill: MESHTRON_FAULT_AT_STEP=%d kills this rank", step)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == self.hang_at:
            log.warning("drill: MESHTRON_FAULT_HANG_AT_STEP=%d stops this rank", step)
            while True:
                time.sleep(3600)
        if step == self.raise_at:
            raise RuntimeError(f"drill: MESHTRON_FAULT_RAISE_AT_STEP={step} fails this step's data loading")
        if self.slow_s:
            time.sleep(self.slow_s)


# ---- step-time breakdown and stragglers ---------------------------------------------------------

PHASES = ("data", "forward_backward", "optimizer", "eval", "checkpoint")


class StepTimer:
    """Wall time of each phase of a step, and a named profiler region per phase.

    A step is a sequence of `phase(name)` calls (each ends the phase before it) closed by `end()`.
    On GPU the boundaries of a timed step (a logged one) synchronize the device, so a phase is
    charged with its own kernels, not with those it launched for the next.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self._timed = False
        self._current: tuple[str, float, torch.autograd.profiler.record_function] | None = None
        self._begin = 0.0

    def begin(self, timed: bool) -> None:
        self.times = dict.fromkeys(PHASES, 0.0)
        self._timed = timed
        self._begin = time.perf_counter()
        self.phase("data")

    def phase(self, name: str) -> None:
        self.end()
        region = torch.autograd.profiler.record_function(name)
        region.__enter__()
        self._current = (name, time.perf_counter(), region)

    def end(self) -> None:
        if self._current is None:
            return
        if self._timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        name, start, region = self._current
        region.__exit__(None, None, None)
        self.times[name] += time.perf_counter() - start
        self._current = None

    def elapsed(self) -> float:
        return time.perf_counter() - self._begin


class StragglerMonitor:
    """At logged steps: every rank's step time and data wait, gathered (one small collective).

    In synchronous training every rank's step takes as long as the slowest one's, so step times
    alone do not say who is slow; what differs is the time a rank spends before it can compute (its
    data wait: reading, preparing, a slow host). A rank whose data wait exceeds the median of the
    other ranks' by more than `fraction` of the step time, `patience` logged steps in a row, is
    named in a warning. (A rank slow in its compute is not told apart this way: the others wait for
    it inside the collectives of forward and backward.)
    """

    def __init__(self, fraction: float, patience: int = 3):
        self.fraction, self.patience = fraction, patience
        self.world = dist.get_world_size()
        self._streak: tuple[int, int] = (-1, 0)  # (rank, consecutive logged steps)

    def gather(self, step_time: float, data_wait: float) -> dict:
        """Metrics of the slowest and fastest rank (collective: every rank calls it at logged steps)."""
        mine = torch.tensor([step_time, data_wait], dtype=torch.float64)
        if self.world == 1:
            return {"step_time_max_s": step_time, "step_time_min_s": step_time, "slowest_rank": 0, "fastest_rank": 0}
        everyone = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)  # CPU tensors: gloo, also beside NCCL
        times = [float(t[0]) for t in everyone]
        waits = [float(t[1]) for t in everyone]
        slowest, fastest = max(range(self.world), key=times.__getitem__), min(range(self.world), key=times.__getitem__)
        self._check(waits, statistics.median(times))
        return {"step_time_max_s": times[slowest], "step_time_min_s": times[fastest], "slowest_rank": slowest,
                "fastest_rank": fastest}

    def _check(self, waits: list[float], step_time: float) -> None:
        if not self.fraction:
            return
        rank = max(range(self.world), key=waits.__getitem__)
        excess = waits[rank] - statistics.median(waits[:rank] + waits[rank + 1:])
        if excess <= self.fraction * step_time:
            self._streak = (-1, 0)
            return
        count = self._streak[1] + 1 if self._streak[0] == rank else 1
        self._streak = (rank, count)
        if count % self.patience == 0 and dist.get_rank() == 0:
            log.warning("rank %d is a straggler: its data wait exceeded the others' by %.0f%% of the step time "
                        "(%.3f s of %.3f s) for %d logged steps in a row", rank, 100 * excess / step_time, excess,
                        step_time, count)


# ---- hang watchdog ------------------------------------------------------------------------------


class HangWatchdog:
    """A thread that ends the job when no step completes within `timeout_s`.

    It writes this rank's Python stacks (all threads, via faulthandler, so a main thread stuck in
    a collective shows where) to RUN/hang/rank-N.txt, on NCCL also the flight recorder's record of
    recent collectives (RUN/hang/nccl_trace/rank_N), and exits with HANG_EXIT_CODE. Every rank runs one,
    so a job with one stuck rank leaves the stacks of all: the others are stuck waiting for it.
    """

    def __init__(self, timeout_s: float, run_dir: Path, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.dump_dir = run_dir / "hang"
        self._last_beat = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="meshtron-hang-watchdog", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self._last_beat > self.timeout_s:
                self._dump_and_exit()

    def _dump_and_exit(self) -> None:
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        path = self.dump_dir / f"rank-{self.rank}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: no training step completed in {self.timeout_s:g} s "
                    "(train.hang_timeout_s); Python stacks of every thread:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        self._dump_nccl_flight_recorder()
        log.error("rank %d: no step completed in %g s; stacks written to %s; exiting", self.rank, self.timeout_s, path)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(HANG_EXIT_CODE)

    def _dump_nccl_flight_recorder(self) -> None:
        """The NCCL flight recorder keeps the last collectives of each rank (TORCH_NCCL_TRACE_BUFFER_SIZE,
        set at process-group creation)."""
        if not (torch.cuda.is_available() and dist.is_initialized()):
            return
        try:
            trace = torch._C._distributed_c10d._dump_nccl_trace()
        except (AttributeError, RuntimeError) as e:
            log.warning("no NCCL flight recorder dump: %s", e)
            return
        # Named as torch's analyser expects: python -m torch.distributed.flight_recorder.fr_trace DIR --prefix rank_
        (self.dump_dir / "nccl_trace").mkdir(exist_ok=True)
        (self.dump_dir / "nccl_trace" / f"rank_{self.rank}").write_bytes(trace)


# ---- last good state ----------------------------------------------------------------------------


class LastGoodState:
    """On an error in a step before the optimizer changed anything, save the last completed step.

    The model and optimizer are still those of the last completed step until the optimizer's
    step begins (a pre-hook notes it). The save is collective, so it is attempted only when every
    rank failed the same step: ranks first meet on a gloo group of their own with a timeout, and
    a rank whose peers are still computing (or gone) gives up the save instead of hanging.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, timeout_s: float = 60.0):
        self.updating = False
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._group = dist.new_group(backend="gloo") if dist.get_world_size() > 1 else None
        optimizer.register_step_pre_hook(self._optimizer_steps)

    def _optimizer_steps(self, optimizer, args, kwargs) -> None:
        self.updating = True

    def step_begins(self) -> None:
        self.updating = False

    def save_if_useful(self, checkpointer, step: int, saved_step: int | None) -> None:
        """Save `step` (the last completed one) unless the optimizer had begun, or it is saved already."""
        if self.updating or step == 0 or saved_step == step:
            return
        if self._group is not None:
            try:
                dist.monitored_barrier(group=self._group, timeout=self._timeout)
            except RuntimeError as e:
                log.error("not saving the last good state: not every rank failed this step (%s)", str(e)[:200])
                return
        log.warning("the step after %d failed before the optimizer step; saving step %d", step, step)
        checkpointer.save(step)
        checkpointer.wait()
