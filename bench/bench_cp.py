"""Context parallel: activation memory and step time per rank, cp = 1 against cp = 2 and 4 per algorithm.

One forward and backward of a tiny model (llama:debug shape with 4 layers) on one row of packed
documents (64 to 1024 tokens each), the same row for every configuration, under the run's default
attention backend. cp = 1 is one process (the baseline, in the same run); cp > 1 runs under torchrun
(gloo on CPU), each rank holding its head-tail share of the row. Per rank, the largest over ranks:
- saved MiB: the activations autograd keeps for the backward (the bytes of the distinct tensors
  that pass its saved-tensor hooks), the memory context parallel divides;
- peak MiB: growth of the peak resident set (CPU, ru_maxrss) or of the peak allocation (GPU) over the
  step, which adds what exists only while a block is computed (scores, transfers);
- step s: the median of the timed steps.

    python bench/bench_cp.py                                            # CPU: 8k, 16k, 32k tokens
    python bench/bench_cp.py --device cuda --lengths 32768,131072       # 4 GPUs (NCCL)

Not a test: results go to bench/RESULTS.md.
"""

import argparse
import json
from contextlib import nullcontext
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from meshtron.models.common.masks import AttentionMask
from meshtron.models.common.transformer import positions_from_documents
from meshtron.models.registry import build_model, get_flavor
from meshtron.parallel.cp import Axis, ContextParallel

LAYOUTS = [("none", 1, 1), ("ring", 2, 1), ("ulysses", 2, 2), ("ring", 4, 1), ("ulysses", 4, 4), ("hybrid", 4, 2)]


def _row(length: int, seed: int = 0) -> torch.Tensor:
    """Document ids of one packed row: documents of 64..1024 tokens until `length` is filled."""
    gen = torch.Generator().manual_seed(seed)
    ids, doc = [], 0
    while len(ids) < length:
        ids += [doc] * int(torch.randint(64, 1025, (1,), generator=gen))
        doc += 1
    return torch.tensor(ids[:length])[None]


def _layout(cp: int, ulysses: int, device: str) -> ContextParallel | None:
    if cp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (cp // ulysses, ulysses), mesh_dim_names=("cp_ring", "cp_ulysses"))
    ring = Axis.of(mesh["cp_ring"]) if cp > ulysses else Axis()
    return ContextParallel(Axis(dist.group.WORLD, cp, dist.get_rank()), ring,
                           Axis.of(mesh["cp_ulysses"]) if ulysses > 1 else Axis())


class SavedBytes:
    """The bytes of the distinct tensors autograd saves for the backward (by storage)."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def mib(self) -> float:
        return sum(self.storages.values()) / 2**20


def _memory_mib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_one(cp: int, ulysses: int, length: int, device: str, steps: int) -> dict:
    layout = _layout(cp, ulysses, device)
    args = get_flavor("llama:debug")
    args.num_layers, args.max_seq_len = 4, max(length, args.max_seq_len)
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.init_weights(seed=0)
    document_ids = _row(length).to(device)
    tokens = torch.randint(0, args.vocab_size, (1, length), generator=torch.Generator().manual_seed(1)).to(device)
    batch = {"input_ids": tokens, "position_ids": positions_from_documents(document_ids),
             "mask": AttentionMask.for_batch(length, document_ids)}
    if layout is not None:
        batch = layout.shard_batch(batch)
    times, saved = [], SavedBytes()
    before = _memory_mib(device)
    for step in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        counting = step == 0
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if counting else nullcontext():
            logits = model(batch["input_ids"], position_ids=batch["position_ids"], mask=batch["mask"])
            loss = logits.float().logsumexp(-1).mean()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    result = torch.tensor([saved.mib, _memory_mib(device) - before, statistics.median(times)])
    if layout is not None:
        dist.all_reduce(result, op=dist.ReduceOp.MAX)
    return {"saved_mib": result[0].item(), "peak_mib": result[1].item(), "step_s": result[2].item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--lengths", default="8192,16384,32768")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--algos", default="none,ring,ulysses,hybrid", help="which of them to run (none: cp = 1)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # cp:ulysses:length, run in this process (a rank)
    opts = parser.parse_args()
    if opts.one:
        cp, ulysses, length = (int(x) for x in opts.one.split(":"))
        if cp > 1:
            dist.init_process_group("nccl" if opts.device == "cuda" else "gloo")
            if opts.device == "cuda":
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        result = run_one(cp, ulysses, length, opts.device, opts.steps)
        if cp == 1 or dist.get_rank() == 0:
            print(json.dumps(result))
        if cp > 1:
            dist.destroy_process_group()
        return
    print("| seq_length | cp_algo | cp | saved MiB / rank | vs cp=1 | peak MiB / rank | step s |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for length in (int(x) for x in opts.lengths.split(",")):
        baseline = None
        for algo, cp, ulysses in (layout for layout in LAYOUTS if layout[0] in opts.algos.split(",")):
            one = [__file__, "--device", opts.device, "--steps", str(opts.steps),
                   "--one", f"{cp}:{ulysses}:{length}"]
            launcher = [sys.executable] if cp == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         f"--nproc-per-node={cp}"]
            out = subprocess.run([*launcher, *one], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"| {length} | {algo} | {cp} | failed: {out.stderr.strip().splitlines()[-1]} | | | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            baseline = baseline or r["saved_mib"]
            print(f"| {length} | {algo} | {cp} | {r['saved_mib']:.0f} | {r['saved_mib'] / baseline:.2f} | "
                  f"{r['peak_mib']:.0f} | {r['step_s']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
