"""The [profile] section: a torch.profiler trace of chosen steps per rank, a memory snapshot, and a
picture of a trace's named regions.

Files, under OUTPUT_DIR/profile/step-A-B/ (steps A..B):
  rank-N.trace.json.gz   Chrome trace (Perfetto, chrome://tracing, TensorBoard's profiler plugin)
  rank-N.regions.png     rank N's named regions (data, forward, backward, optimizer, ...) on a time line
  rank-N.memory.html     with memory_snapshot: memory over the profiled steps (GPU: the CUDA caching
                         allocator's history, its raw snapshot in rank-N.memory.pickle; CPU: the
                         profiler's active-memory timeline)
"""

import gzip
import json
import logging
import pickle
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from meshtron.config.job import ProfileConfig
from meshtron.train.ops import PHASES

log = logging.getLogger(__name__)

# The regions of a step, in the order they are drawn (forward and backward nest in forward_backward).
REGIONS = ("data", "forward_backward", "forward", "backward", "optimizer", "eval", "checkpoint")
_MAX_MEMORY_ENTRIES = 100_000


class StepProfiler:
    """Profiles steps start_step .. start_step + num_steps - 1 of this run (the step before them warms
    up); does nothing unless config.enable."""

    def __init__(self, config: ProfileConfig, run_dir: Path, rank: int, device: torch.device, first_step: int,
                 final_step: int):
        self.config, self.rank, self.device = config, rank, device
        # A run that ends earlier (a shortened run, a resume past the start) profiles what it trains.
        start = max(config.start_step, first_step)
        self.last_step = min(start + config.num_steps - 1, final_step)
        self.out_dir = run_dir / "profile" / f"step-{start}-{self.last_step}"
        self._warmup = 1 if start > first_step else 0
        self.first_step = start - self._warmup if config.enable and start <= self.last_step else -1
        self._profiler: profile | None = None

    def step_begins(self, step: int) -> None:
        if step != self.first_step:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        memory_on_cpu = self.config.memory_snapshot and self.device.type != "cuda"
        self._profiler = profile(
            activities=activities, on_trace_ready=self._write,
            # Built only for a run that reaches the profiled steps: a shorter one would have none active.
            schedule=schedule(wait=0, warmup=self._warmup, active=self.last_step - self.first_step - self._warmup + 1,
                              repeat=1),
            # The CPU memory timeline is built from allocation events and their operators' shapes.
            record_shapes=self.config.record_shapes or memory_on_cpu, profile_memory=memory_on_cpu,
            with_stack=self.config.with_stack or memory_on_cpu,
        )
        if self.config.memory_snapshot and self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=_MAX_MEMORY_ENTRIES)
        self._profiler.start()

    def step_ends(self, step: int) -> None:
        if self._profiler is None:
            return
        self._profiler.step()
        if step == self.last_step:
            self._profiler.stop()
            self._profiler = None

    def _write(self, prof: profile) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank-{self.rank}.trace.json.gz"
        prof.export_chrome_trace(str(trace))  # gzipped because of the suffix
        plot_regions(trace, self.out_dir / f"rank-{self.rank}.regions.png")
        if self.config.memory_snapshot:
            self._write_memory(prof)
        log.info("profile written to %s", trace)

    def _write_memory(self, prof: profile) -> None:
        from torch.cuda import _memory_viz

        html = self.out_dir / f"rank-{self.rank}.memory.html"
        if self.device.type == "cuda":
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            (self.out_dir / f"rank-{self.rank}.memory.pickle").write_bytes(pickle.dumps(snapshot))
            html.write_text(_memory_viz.trace_plot(snapshot, device=self.device.index))
        else:
            html.write_text(_memory_viz.profile_plot(prof))


def read_regions(trace_path: Path) -> list[dict]:
    """The named step regions of a Chrome trace: [{name, start_us, duration_us}], in time order."""
    with gzip.open(trace_path, "rt") if str(trace_path).endswith(".gz") else open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    regions = [{"name": e["name"], "start_us": float(e["ts"]), "duration_us": float(e["dur"])}
               for e in events if e.get("ph") == "X" and e.get("name") in REGIONS and e.get("cat") == "user_annotation"]
    return sorted(regions, key=lambda r: r["start_us"])


def plot_regions(trace_path: Path, out_png: Path) -> Path | None:
    """Draw the step regions of a trace as a time line, one row per region name."""
    regions = read_regions(trace_path)
    if not regions:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = regions[0]["start_us"]
    names = [n for n in REGIONS if any(r["name"] == n for r in regions)]
    colors = dict(zip(PHASES + ("forward", "backward"), plt.get_cmap("tab10").colors))
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(names) + 1.2))
    for row, name in enumerate(names):
        spans = [((r["start_us"] - t0) / 1e3, r["duration_us"] / 1e3) for r in regions if r["name"] == name]
        ax.broken_barh(spans, (row - 0.4, 0.8), color=colors[name])
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title(f"{Path(trace_path).name}: step regions")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
