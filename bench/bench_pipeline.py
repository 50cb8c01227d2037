"""Pipeline-parallel benchmark: step time and bubble fraction of the four schedules (gpipe, 1f1b,
interleaved 1f1b, zero-bubble V) against one process training the same model on the same global
batch, all in one run.

Every configuration is a `meshtron train` run on mock data: the schedules under torchrun with pp
ranks (gloo on CPU, NCCL on GPU: the Trainer picks the device), the baseline as one process that
accumulates the same micro-batches one after another. Step time is the Trainer's `step_time_s`
of rank 0, which waits for the last stage in the step's loss reduction and gradient clipping.
Rounds run every configuration in turn, so that load from other jobs falls on all of them; the
table gives the median of the timed steps of all rounds, and the fastest step, the figure least
touched by other jobs on a shared machine.

Bubble fraction, two figures per schedule:
- measured: 1 - (T_1 / pp) / T_pp, with T_1 the baseline's step time and T_pp the pipeline's. It
  counts as bubble everything that keeps the pipeline from pp times the baseline's speed: idle
  slots of the schedule, stage imbalance (the last stage also runs the output head and the loss),
  the sends and receives between stages, and the schedule's own overhead.
- theoretical: (p-1)/(m+p-1) for gpipe and 1f1b, (p-1)/(v*m+p-1) for interleaved 1f1b; for zbv,
  the idle share of torch's own zbv action order (`pipeline_order`) played out with forward,
  input-backward and weight-backward one time unit each (the zero-bubble paper's assumption).

    python bench/bench_pipeline.py                                         # CPU, 3 to 4 minutes on 2 cores
    python bench/bench_pipeline.py --num-layers 32 --dim 2048 --num-heads 16 --num-kv-heads 8 \\
        --ffn-dim 5632 --vocab-size 32000 --seq-length 2048 --dtype bfloat16 --threads 4   # 2 GPUs

Not a test: numbers go to bench/RESULTS.md with the machine's description.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

# Schedule names as in parallel.pp_schedule, each with its virtual stages per rank.
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved_1f1b": 2, "zbv": 2}


def config_toml(opts) -> str:
    """The run's TOML: everything but the parallel layout and the output directory."""
    model_args = {"num_layers": opts.num_layers, "dim": opts.dim, "num_heads": opts.num_heads,
                  "num_kv_heads": opts.num_kv_heads, "head_dim": opts.dim // opts.num_heads,
                  "ffn_dim": opts.ffn_dim, "vocab_size": opts.vocab_size, "max_seq_len": opts.seq_length}
    return f"""
[model]
name_or_path = "llama:debug"
args = {{{", ".join(f"{k} = {v}" for k, v in model_args.items())}}}
dtype = "{opts.dtype}"
[data]
mock = true
[train]
steps = {opts.warmup + opts.steps}
global_batch_size = {opts.micro_batch_size * opts.num_microbatches}
micro_batch_size = {opts.micro_batch_size}
seq_length = {opts.seq_length}
[lr]
schedule = "constant"
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
resume = "none"
"""


def train(config: Path, out: Path, nproc: int, overrides: list[str], opts) -> list[dict]:
    """Run `meshtron train` with nproc ranks; returns the metrics records of rank 0."""
    launcher = [sys.executable, "-m", "meshtron"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "meshtron"]
    cmd = [*launcher, "train", str(config), "--train.output_dir", str(out), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def formula_bubble(pp: int, num_microbatches: int, stages_per_rank: int) -> float:
    """Bubble of (interleaved) 1f1b and gpipe with equal stages: p - 1 idle slots of the m v busy ones."""
    return (pp - 1) / (stages_per_rank * num_microbatches + pp - 1)


def zbv_order(pp: int, num_microbatches: int) -> dict:
    """torch's zbv action order for every rank. The schedule only reads the stage count and the rank's
    place from its stages while computing it, so stand-ins serve and no process group is needed."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    num_stages = 2 * pp
    stages = [types.SimpleNamespace(stage_index=i, num_stages=num_stages, group_size=pp, group_rank=0, submod=None)
              for i in (0, num_stages - 1)]
    return get_schedule_class("ZBVZeroBubble")(stages, n_microbatches=num_microbatches).pipeline_order


def simulated_bubble(order: dict, num_stages: int) -> float:
    """Idle share of a per-rank action order when every rank runs its actions in order, each as soon
    as its inputs exist: forward, input-backward and weight-backward one time unit each, a full
    backward two. Communication is free. On torch's gpipe and interleaved orders it gives the
    formulas' figures."""
    from torch.distributed.pipelining.schedules import B, F, I, W

    cost = {F: 1, I: 1, W: 1, B: 2}
    queues = {rank: [a for a in actions if a is not None and a.computation_type in cost]
              for rank, actions in order.items()}
    finished: dict[tuple, int] = {}  # (kind, stage, micro-batch) -> finish time; B and I both give "grad_in"
    clock = dict.fromkeys(queues, 0)
    busy = dict.fromkeys(queues, 0)
    while any(queues.values()):
        progressed = False
        for rank, queue in queues.items():
            while queue:
                a = queue[0]
                s, m, kind = a.stage_index, a.microbatch_index, a.computation_type
                if kind == F:
                    needs = [("fwd", s - 1, m)] if s > 0 else []
                elif kind == W:
                    needs = [("grad_in", s, m)]
                else:
                    needs = [("fwd", s, m)] + ([("grad_in", s + 1, m)] if s < num_stages - 1 else [])
                if any(n not in finished for n in needs):
                    break
                start = max([clock[rank]] + [finished[n] for n in needs])
                clock[rank] = start + cost[kind]
                busy[rank] += cost[kind]
                if kind != W:  # nothing waits for a weight gradient
                    finished[("fwd" if kind == F else "grad_in", s, m)] = clock[rank]
                queue.pop(0)
                progressed = True
        assert progressed, "the action order deadlocks"
    span = max(clock.values())
    return 1 - sum(busy.values()) / (len(queues) * span)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=2, help="pipeline degree (ranks; GPUs on a GPU machine)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES),
                        help="comma-separated, among " + ", ".join(SCHEDULES))
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--num-kv-heads", type=int, default=2)
    parser.add_argument("--ffn-dim", type=int, default=704)
    parser.add_argument("--vocab-size", type=int, default=2048, help="small, so that the output head on the last "
                        "stage costs about 0.6 of a layer")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--num-microbatches", type=int, default=8, help="micro-batches per step (m)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first in every run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all runs; the median of all their timed "
                        "steps is reported")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank and of the baseline")
    opts = parser.parse_args()
    schedules = opts.schedules.split(",")
    unknown = set(schedules) - set(SCHEDULES)
    if unknown:
        parser.error(f"unknown schedules {sorted(unknown)}; choose among {', '.join(SCHEDULES)}")

    m, p = opts.num_microbatches, opts.pp
    theory = {name: formula_bubble(p, m, v) for name, v in SCHEDULES.items() if name != "zbv"}
    theory["zbv"] = simulated_bubble(zbv_order(p, m), 2 * p)
    tokens_per_step = opts.micro_batch_size * m * opts.seq_length
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} logical)"
    print(f"# {datetime.date.today()}, {platform.machine()}, {device}, torch {torch.__version__}, {opts.dtype}, "
          f"load average {os.getloadavg()[0]:.1f} at start; llama {opts.num_layers} layers, dim {opts.dim}, "
          f"{opts.num_heads}/{opts.num_kv_heads} heads, ffn {opts.ffn_dim}, vocab {opts.vocab_size}; pp {p}, "
          f"{m} micro-batches of {opts.micro_batch_size} x {opts.seq_length} tokens per step; OMP_NUM_THREADS "
          f"{opts.threads}; median of {opts.repeats} x {opts.steps} steps, each run after {opts.warmup}",
          file=sys.stderr)

    runs = {"1 process": (1, [])}
    for name in schedules:
        runs[name] = (p, ["--parallel.pp", str(p), "--parallel.pp_schedule", name,
                          "--parallel.vpp", str(SCHEDULES[name])])
    step_times = {name: [] for name in runs}
    first_loss = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "pipeline.toml"
        config.write_text(config_toml(opts))
        # Round after round of every run, so that load from other jobs falls on all of them alike.
        for repeat in range(opts.repeats):
            for name, (nproc, overrides) in runs.items():
                records = train(config, Path(tmp) / f"{name}-{repeat}", nproc, overrides, opts)
                print(f"# {name}: {[round(r['step_time_s'], 2) for r in records]}", file=sys.stderr)
                step_times[name] += [r["step_time_s"] for r in records[opts.warmup:]]
                first_loss[name] = records[0]["loss"]
    # Same model, data and batch: the losses must be one process's, or the runs are not comparable.
    for name, loss in first_loss.items():
        if abs(loss - first_loss["1 process"]) > 1e-4 * abs(first_loss["1 process"]):
            print(f"# warning: {name}'s first loss {loss} differs from one process's {first_loss['1 process']}",
                  file=sys.stderr)
    # The median, and the fastest step as the figure least touched by other jobs on a shared machine.
    median = {name: statistics.median(times) for name, times in step_times.items()}
    fastest = {name: min(times) for name, times in step_times.items()}
    t1, t1_fastest = median["1 process"], fastest["1 process"]

    print("| run | stages per rank | step s (median) | fastest step s | tokens/s (median) | speedup vs 1 process | "
          "measured bubble (median) | measured bubble (fastest) | theoretical bubble |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| 1 process | all | {t1:.2f} | {t1_fastest:.2f} | {tokens_per_step / t1:,.0f} | 1.00x | | | |")
    for name in schedules:
        t_pp, t_pp_fastest = median[name], fastest[name]
        print(f"| {name} | {SCHEDULES[name]} | {t_pp:.2f} | {t_pp_fastest:.2f} | {tokens_per_step / t_pp:,.0f} | "
              f"{t1 / t_pp:.2f}x | {1 - (t1 / p) / t_pp:.1%} | {1 - (t1_fastest / p) / t_pp_fastest:.1%} | "
              f"{theory[name]:.1%} |")
    print(f"# load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
