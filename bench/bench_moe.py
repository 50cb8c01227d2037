"""The MoE layer: experts as one grouped GEMM (`torch._grouped_mm`) against the per-expert loop.

One forward and backward of one MoE layer (`models/common/moe.py`, no shared expert) on N tokens, for
a few shapes from coarse (Mixtral-like: 8 experts, top 2) to fine-grained (Qwen3-MoE-like: 64 experts,
top 8). The baseline in the same run is the loop over experts, the same layer with
`experts.grouped_mm = False`; both see the same weights and tokens. Median of --repeats after one warmup.

    python bench/bench_moe.py                                          # CPU, float32
    python bench/bench_moe.py --device cuda --dtype bfloat16 --tokens 16384   # GPU

Not a test: results go to bench/RESULTS.md.
"""

import argparse
import statistics
import time

import torch

from meshtron.models.common.init import init_model
from meshtron.models.common.moe import MoE, MoEArgs, grouped_mm_runs

# (label, dim, expert hidden dim, experts, experts per token)
SHAPES = [("coarse E8 K2", 512, 1024, 8, 2), ("fine E64 K8", 512, 256, 64, 8)]


def step_seconds(moe: MoE, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        moe(x).float().square().mean().backward()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warmup
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print("| shape | tokens | loop (ms) | grouped (ms) | speedup |\n| --- | --- | --- | --- | --- |")
    for label, dim, hidden, experts, top_k in SHAPES:
        moe = MoE(MoEArgs(dim=dim, num_heads=1, num_kv_heads=1, head_dim=dim, num_experts=experts,
                          num_experts_per_token=top_k, expert_ffn_dim=hidden), out_std=0.02)
        init_model(torch.nn.ModuleDict({"mlp": moe}), seed=0)
        moe = moe.to(args.device, dtype)
        x = torch.randn(1, args.tokens, dim, generator=torch.Generator().manual_seed(0)).to(args.device, dtype)
        if not grouped_mm_runs(x[0], hidden):
            raise SystemExit(f"torch._grouped_mm does not run on {args.device} in {args.dtype} here")
        results = {}
        for grouped in (False, True):
            moe.experts.grouped_mm = grouped
            results[grouped] = step_seconds(moe, x, args.repeats)
        print(f"| {label} | {args.tokens} | {results[False] * 1e3:.1f} | {results[True] * 1e3:.1f} | "
              f"{results[False] / results[True]:.2f}x |")


if __name__ == "__main__":
    main()
