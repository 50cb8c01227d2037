"""Training throughput benchmark: meshtron's Trainer against transformers, trained in the same run.

For one model shape it trains (a) meshtron's Trainer on mock data (single device, bf16 compute
with fp32 master weights on GPU, float32 on CPU, AdamW) and (b) transformers' LlamaForCausalLM
of the same shape with the same batch, precision (autocast) and optimizer, eager and (on GPU)
torch.compile'd. It prints tokens/s, MFU (PaLM formula, docs/training.md) and peak memory of
each, and meshtron's ratios to the baselines (on GPU meshtron also runs with train.compile, and
the speedup column compares its best run).

    python bench/bench_train.py --shape tiny                       # CPU, seconds
    python bench/bench_train.py --shape smollm2 --seq-length 2048 --micro-batch-size 8
    python bench/bench_train.py --shape llama3.2-1b --seq-length 2048 --micro-batch-size 8   # GPU, ~80 GB

Shapes: llama3.2-1b (hidden 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192, vocab 128256, tied),
smollm2 (SmolLM2-135M: 576, 30 layers, 9/3 heads, ffn 1536, vocab 49152, tied), tiny (a 4-layer
256-wide model for CPU). Not a test: numbers go to bench/RESULTS.md with the device's name.
"""

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from meshtron.config import load_config
from meshtron.models.registry import get_family, get_flavor
from meshtron.train.metrics import flops_per_token, peak_flops

SHAPES = {
    "llama3.2-1b": ("llama:llama3.2-1b", {}),
    "smollm2": ("llama:smollm2-135m", {}),
    "tiny": ("llama:debug", {"dim": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 64,
                             "ffn_dim": 704, "vocab_size": 8192}),
}


def model_args(shape: str):
    flavor, changes = SHAPES[shape]
    args = get_flavor(flavor)
    return flavor, changes, type(args).from_dict({**args.to_dict(), **changes})


def bench_meshtron(shape: str, opts, device: torch.device, compile_blocks: bool) -> dict:
    from meshtron.train.trainer import Trainer

    flavor, changes, args = model_args(shape)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    args_toml = "{" + ", ".join(f"{k} = {v}" for k, v in changes.items()) + "}"
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            "--model.name_or_path", flavor, "--model.args", args_toml, "--model.dtype", dtype,
            "--data.mock", "true", "--train.steps", str(opts.warmup + opts.steps),
            "--train.global_batch_size", str(opts.micro_batch_size), "--train.micro_batch_size",
            str(opts.micro_batch_size), "--train.seq_length", str(opts.seq_length), "--train.output_dir", out,
            "--lr.schedule", "constant", "--log.tensorboard", "false", "--log.plot", "false",
            "--checkpoint.save_final", "false", "--recompute.mode", opts.recompute,
            "--train.compile", str(compile_blocks).lower(),
        ]
        trainer = Trainer(load_config(None, overrides))
        trainer.train()
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    step_time = statistics.median(r["step_time_s"] for r in records[opts.warmup:])
    del trainer
    return {"step_time_s": step_time, "mem_gb": records[-1]["mem_gb"] if device.type == "cuda" else None}


def bench_transformers(shape: str, opts, device: torch.device, compile_model: bool) -> dict:
    from transformers import AutoModelForCausalLM

    _, _, args = model_args(shape)
    config = get_family(args.family).hf_config_from_args(args)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).train()
    if compile_model:
        model = torch.compile(model)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=not fused)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = torch.randint(0, args.vocab_size, (opts.micro_batch_size, opts.seq_length), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(opts.warmup + opts.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= opts.warmup:
            times.append(time.perf_counter() - start)
    mem = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    del model, optimizer
    return {"step_time_s": statistics.median(times), "mem_gb": mem}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=SHAPES, default="tiny")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default: 8 on GPU, 4 on CPU")
    parser.add_argument("--seq-length", type=int, default=None, help="default: 2048 on GPU, 256 on CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator)")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--baselines", default="eager,compile", help="transformers baselines to run (eager,compile)")
    opts = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    opts.micro_batch_size = opts.micro_batch_size or (8 if device.type == "cuda" else 4)
    opts.seq_length = opts.seq_length or (2048 if device.type == "cuda" else 256)
    _, _, args = model_args(opts.shape)
    tokens_per_step = opts.micro_batch_size * opts.seq_length
    flops = flops_per_token(args, opts.seq_length)
    peak = peak_flops(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {opts.shape}: {args.num_params() / 1e6:.1f}M params, micro-batch {opts.micro_batch_size} x "
          f"{opts.seq_length} tokens, {name}, torch {torch.__version__}", file=sys.stderr)

    results = {"meshtron": bench_meshtron(opts.shape, opts, device, compile_blocks=False)}
    gc.collect()
    if device.type == "cuda":
        results["meshtron-compile"] = bench_meshtron(opts.shape, opts, device, compile_blocks=True)
        gc.collect()
    for baseline in filter(None, opts.baselines.split(",")):
        if baseline == "compile" and device.type != "cuda":
            continue  # compiling on CPU takes longer than the benchmark itself
        results[f"transformers-{baseline}"] = bench_transformers(opts.shape, opts, device, baseline == "compile")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print("| run | tokens/s | MFU | peak mem (GB) | meshtron speedup |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ours = tokens_per_step / min(r["step_time_s"] for run, r in results.items() if run.startswith("meshtron"))
    for run, r in results.items():
        tps = tokens_per_step / r["step_time_s"]
        mfu = f"{tps * flops / peak:.1%}" if peak else "n/a"
        mem = f"{r['mem_gb']:.1f}" if r["mem_gb"] is not None else "n/a"
        print(f"| {run} | {tps:,.0f} | {mfu} | {mem} | {ours / tps:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
