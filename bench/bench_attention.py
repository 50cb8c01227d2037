"""Attention backends on packed training: step time and peak memory per backend and sequence length.

One training step (forward and backward) of a tiny model (llama:debug shape widened to 4 layers)
on one row of packed documents (lengths drawn between 64 and 1024 tokens, the same draw for every
backend), through each `model.attention` backend. Each (backend, length) runs in a fresh process so
that its peak memory is its own: CPU peak resident set size (ru_maxrss), or GPU peak allocated.
The baseline in the same run is `causal`: the same row as one document (SDPA's causal fast path),
the lower bound a document mask can reach.

    python bench/bench_attention.py                                   # CPU: 2k, 8k, 32k
    python bench/bench_attention.py --device cuda --lengths 2048,8192,32768,131072   # GPU

On CPU, `flex` is left out (torch has no FlexAttention backward on CPU) and `dense` is skipped where
its score matrices would exceed --max-gb. Not a test: results go to bench/RESULTS.md.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from meshtron.models.registry import build_model, get_flavor

BACKENDS = ("causal", "dense", "varlen", "flex")


def _row(length: int, seed: int = 0) -> torch.Tensor:
    """Document ids of one packed row: documents of 64..1024 tokens until `length` is filled."""
    gen = torch.Generator().manual_seed(seed)
    ids, doc = [], 0
    while len(ids) < length:
        ids += [doc] * int(torch.randint(64, 1025, (1,), generator=gen))
        doc += 1
    return torch.tensor(ids[:length])[None]


def run_one(backend: str, length: int, device: str, steps: int) -> dict:
    args = get_flavor("llama:debug")
    args.num_layers, args.max_seq_len = 4, max(length, args.max_seq_len)
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.init_weights(seed=0)
    model.set_attention("sdpa" if backend == "causal" else backend)
    tokens = torch.randint(0, args.vocab_size, (1, length), device=device)
    document_ids = None if backend == "causal" else _row(length).to(device)
    times = []
    for step in range(steps + 1):  # the first step warms up (and compiles flex on GPU)
        start = time.perf_counter()
        model(tokens, document_ids=document_ids).float().logsumexp(-1).mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"backend": backend, "length": length, "step_s": statistics.median(times), "peak_mib": peak_mib,
            "documents": int(_row(length).max()) + 1}


def dense_gb(length: int, num_layers: int = 4, num_heads: int = 4) -> float:
    """Rough memory of the dense path: fp32 scores and probabilities kept for backward, per layer."""
    return 2 * num_layers * num_heads * length * length * 4 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-gb", type=float, default=6.0, help="skip dense where it would need more (default 6)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # backend:length, run in this process
    opts = parser.parse_args()
    if opts.one:
        backend, length = opts.one.split(":")
        print(json.dumps(run_one(backend, int(length), opts.device, opts.steps)))
        return
    print("| backend | seq_length | documents | step s | peak MiB |\n| --- | ---: | ---: | ---: | ---: |")
    for length in (int(x) for x in opts.lengths.split(",")):
        for backend in BACKENDS:
            if backend == "flex" and opts.device == "cpu":
                continue
            if backend == "dense" and dense_gb(length) > opts.max_gb:
                print(f"| dense | {length} | | skipped: ~{dense_gb(length):.0f} GB of scores | |", flush=True)
                continue
            out = subprocess.run([sys.executable, __file__, "--device", opts.device, "--steps", str(opts.steps),
                                  "--one", f"{backend}:{length}"], capture_output=True, text=True)
            if out.returncode:
                print(f"| {backend} | {length} | | failed: {out.stderr.strip().splitlines()[-1]} | |", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {backend} | {length} | {r['documents']} | {r['step_s']:.3f} | {r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
