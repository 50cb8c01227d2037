"""Full fine-tuning vs LoRA vs QLoRA on the SmolLM2 shape, in one run: step time and peak memory.

Each method is a real `meshtron train` run (separate process, so peak memory is its own) from
the example model on mock data with the same batch; the first step (start-up, allocation) is
dropped from the step-time median. On CPU "peak memory" is the process's peak resident set; on
a GPU it is the peak allocated device memory.

    python bench/bench_lora.py                       # CPU: float32 full/LoRA, bfloat16 QLoRA
    python bench/bench_lora.py --dtype bfloat16      # GPU: all three in bfloat16
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = """
[model]
name_or_path = "{model}"
dtype = "{dtype}"
[data]
mock = true
[train]
recipe = "sft"
steps = {steps}
global_batch_size = {batch}
micro_batch_size = {batch}
seq_length = {seq}
[optim]
lr = 1e-4
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""

METHODS = {
    "full": [],
    "lora": ["--lora.rank", "16", "--lora.alpha", "32"],
    "qlora": ["--lora.rank", "16", "--lora.alpha", "32", "--lora.quantize_base", "nf4"],
}


def run(method: str, model: str, args, work: Path) -> dict:
    dtype = "bfloat16" if method == "qlora" else args.dtype
    config = work / f"{method}.toml"
    config.write_text(CONFIG.format(model=model, dtype=dtype, steps=args.steps, batch=args.batch, seq=args.seq))
    out = work / method
    cmd = [sys.executable, "-m", "meshtron", "train", str(config), "--train.output_dir", str(out), *METHODS[method]]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{method} failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    trainable = next((line.split(": ")[-1] for line in result.stderr.splitlines() if "trainable parameters" in line),
                     "all")
    return {"method": method, "dtype": dtype, "step_s": statistics.median(r["step_time_s"] for r in steps[1:]),
            "peak_gb": max(r["mem_gb"] for r in steps), "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="HF directory (default: the example model)")
    parser.add_argument("--dtype", default="float32", help="compute dtype of full and LoRA")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    model = args.model
    if model == "smollm2":
        from meshtron.assets import prepare_smollm2

        model = str(prepare_smollm2())
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(m, model, args, Path(tmp)) for m in METHODS]
    base = rows[0]
    print("| method | dtype | trainable | step s | vs full | peak GB | vs full |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['dtype']} | {r['trainable']} | {r['step_s']:.2f} | "
              f"{r['step_s'] / base['step_s']:.2f}x | {r['peak_gb']:.2f} | {r['peak_gb'] / base['peak_gb']:.2f}x |")
    print(f"\nbatch {args.batch} x seq {args.seq}, {args.steps} steps (median without the first), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


if __name__ == "__main__":
    main()
