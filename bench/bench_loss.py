"""Peak memory of an SFT step with a 128k vocabulary: the chunked head + loss (meshtron's
default) against the unchunked one (logits of the whole micro-batch, then cross entropy).

Each variant runs in its own fresh process (so that one's peak cannot hide the other's); a
step is the SFT recipe's loss, backward and an AdamW step on a tiny model with Llama-3's
vocabulary. Peak memory is the process's peak resident set minus its resident set just before
the step (CPU), or torch's peak allocated memory (GPU). Variants alternate over the repeats.

    python bench/bench_loss.py                      # 4 x 1024 tokens, vocab 128256, CPU
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("unchunked", "chunked")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def one_step(variant: str, opts) -> dict:
    from meshtron.config import load_config
    from meshtron.models.registry import build_model, get_flavor
    from meshtron.train.losses import token_cross_entropy_sum
    from meshtron.train.recipes.sft import SFTRecipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = type(get_flavor("llama:debug")).from_dict(
        {**get_flavor("llama:debug").to_dict(), "vocab_size": opts.vocab_size, "dim": opts.dim})
    torch.manual_seed(0)
    model = build_model(args, device=device)
    model.init_weights(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, S = opts.micro_batch_size, opts.seq_length
    tokens = torch.randint(0, args.vocab_size, (B, S + 1), device=device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:].clone(),
             "position_ids": torch.arange(S, device=device).expand(B, S),
             "document_ids": torch.zeros(B, S, dtype=torch.long, device=device)}
    batch["labels"][:, : S // 4] = -100  # prompt tokens carry no loss, as in SFT data
    recipe = SFTRecipe(load_config(None, ["--data.mock", "true"]))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = rss_bytes()
    start = time.perf_counter()
    if variant == "chunked":
        loss = recipe.loss_sum(model, recipe.prepare_batch(batch))  # the recipe's default: head and loss chunked
    else:
        loss = token_cross_entropy_sum(model(batch["input_ids"], position_ids=batch["position_ids"],
                                             document_ids=batch["document_ids"]), batch["labels"])
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"variant": variant, "loss": loss.item(), "peak_bytes": peak, "step_s": time.perf_counter() - start}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(one_step(opts.child, opts)))
        return 0
    runs = {v: [] for v in VARIANTS}
    passthrough = [f"--vocab-size={opts.vocab_size}", f"--dim={opts.dim}",
                   f"--micro-batch-size={opts.micro_batch_size}", f"--seq-length={opts.seq_length}"]
    for _ in range(opts.repeats):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", variant],
                                 check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.splitlines()[-1]))
    losses = {r["loss"] for rs in runs.values() for r in rs}
    print(f"# vocab {opts.vocab_size}, dim {opts.dim}, micro-batch {opts.micro_batch_size} x {opts.seq_length}, "
          f"losses {sorted(losses)}", file=sys.stderr)
    print("| head + loss | peak MiB (median) | step s (median) | peak vs unchunked |")
    print("| --- | ---: | ---: | ---: |")
    base = statistics.median(r["peak_bytes"] for r in runs["unchunked"])
    for variant, rs in runs.items():
        peak = statistics.median(r["peak_bytes"] for r in rs)
        step = statistics.median(r["step_s"] for r in rs)
        print(f"| {variant} | {peak / 2**20:,.0f} | {step:.2f} | {peak / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
