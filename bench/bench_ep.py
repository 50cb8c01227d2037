"""Expert parallel against none: one MoE layer's forward and backward on every rank at ep = 1 (each rank
holds all experts and computes its own tokens) and at ep = world size (each rank holds E / ep experts and
computes every rank's rows for them, sent by all-to-all; parallel/ep.py). Per rank: the experts' weight
memory, the median step time and the all-to-all share of it (the profiler's time in the backend's
all-to-all: the counts and rows of the forward's dispatch and combine and the rows of the backward's two). Same weights and
tokens for both. Median of --repeats after one warmup.

    torchrun --nproc-per-node 2 bench/bench_ep.py                 # CPU, gloo, float32
    torchrun --nproc-per-node 8 bench/bench_ep.py --device cuda --dtype bfloat16 --tokens 16384   # one GPU node

Not a test: results go to bench/RESULTS.md.
"""

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.experimental import implicit_replication
from torch.profiler import ProfilerActivity, profile

from meshtron.models.common.init import init_model
from meshtron.models.common.moe import MoE, MoEArgs
from meshtron.parallel.ep import ExpertParallel


def build(args, ep_mesh) -> MoE:
    moe_args = MoEArgs(dim=args.dim, num_heads=4, num_kv_heads=4, head_dim=args.dim // 4, num_layers=1,
                       num_experts=args.experts, num_experts_per_token=args.top_k, expert_ffn_dim=args.expert_dim)
    with torch.device("meta"):
        moe = MoE(moe_args, out_std=0.02)
    if ep_mesh is not None:
        ExpertParallel()._apply(moe.experts, ep_mesh)
    moe.to_empty(device=args.device)
    with implicit_replication():
        init_model(torch.nn.ModuleDict({"mlp": moe}), seed=0)  # the same weights on every rank and at every ep
    return moe.to(getattr(torch, args.dtype))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(moe: MoE, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(median step seconds, median all-to-all seconds per step). The backend records each all-to-all as one
    event (`gloo:all_to_all`, `nccl:all_to_all`) spanning the transfer, waits for slower peers included."""
    comm_event = f"{dist.get_backend()}:all_to_all"
    steps, a2a = [], []
    for i in range(repeats + 1):
        sync(x.device.type)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            moe(x).float().square().mean().backward()
            sync(x.device.type)
            elapsed = time.perf_counter() - start
        if i:  # the first is a warmup
            steps.append(elapsed)
            a2a.append(sum(e.cpu_time_total for e in prof.key_averages() if e.key == comm_event) / 1e6)
    return statistics.median(steps), statistics.median(a2a)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--expert-dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        args.device = f"cuda:{torch.cuda.current_device()}"
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,), mesh_dim_names=("ep",))
    gen = torch.Generator().manual_seed(rank)  # each rank its own tokens
    x = torch.randn(1, args.tokens, args.dim, generator=gen).to(args.device, getattr(torch, args.dtype))
    rows = []
    for ep in (1, world):
        moe = build(args, mesh if ep > 1 else None)
        local = moe.experts.gate_proj.to_local() if ep > 1 else moe.experts.gate_proj
        expert_mib = 3 * local.numel() * local.element_size() / 2**20
        step, a2a = measure(moe, x, args.repeats)
        rows.append((ep, expert_mib, step, a2a))
    results = [None] * world
    dist.all_gather_object(results, rows)
    if rank == 0:
        print(f"{args.experts} experts, top {args.top_k}, dim {args.dim}, expert hidden {args.expert_dim}, "
              f"{args.tokens} tokens per rank, {world} ranks, {args.dtype} on {args.device.split(':')[0]}")
        print("| ep | expert weights per rank (MiB) | step (ms), slowest rank | all-to-all (ms) | all-to-all share |")
        print("| --- | --- | --- | --- | --- |")
        for i, (ep, mib, _, _) in enumerate(rows):
            step = max(r[i][2] for r in results)
            a2a = max(r[i][3] for r in results)
            print(f"| {ep} | {mib:.1f} | {step * 1e3:.1f} | {a2a * 1e3:.1f} | {a2a / step:.0%} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
