"""Inference benchmark (not a test): meshtron's KV-cache generation vs transformers' `generate`.

Same model, dtype, device, prompt tokens and lengths for both, greedy, stop tokens off so
that every run produces exactly --new-tokens tokens. For each batch size it reports
time to first token (a generate call with one new token: prefill + first token) and decode
tokens/s (the extra tokens of a full call over the extra time: B x (N - 1) / (T_N - T_1)).
Each measurement is the median of --repeats runs after one warm-up run; the two
implementations alternate run by run, so that load from other processes falls on both alike.

    python bench/bench_inference.py                              # SmolLM2, CPU: batch 1 and 8
    python bench/bench_inference.py --batch-sizes 1 --compile --hf-static-compile   # the issue's CPU targets
    python bench/bench_inference.py --device cuda --batch-sizes 1 16 --hf-static-compile --compile

--hf-static-compile adds transformers with its static cache and torch.compile (mode
"reduce-overhead": CUDA graphs on GPU), beside its default dynamic cache; --compile runs
meshtron's static-shape decode compiled the same way (meshtron/infer/static.py).
"""

import argparse
import json
import platform
import statistics
import time

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model directory (default: the example SmolLM2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 on CPU, 1 16 on GPU")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--hf-static-compile", action="store_true",
                   help="also transformers with static cache + torch.compile")
    p.add_argument("--compile", action="store_true", help="meshtron's compiled static-shape decode")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args()


def prompts_for(tokenizer, batch_size: int, length: int) -> torch.Tensor:
    text = ("The history of science is the study of how people came to understand the natural world, "
            "from ancient astronomy and medicine to modern physics, chemistry and biology. ")
    ids = tokenizer(text * (length // 8 + 1))["input_ids"]
    # Rows start at different offsets so that the batch is not one prompt repeated.
    return torch.tensor([ids[i : i + length] for i in range(batch_size)])


def timed_pair(fns: dict, repeats: int, sync) -> dict[str, float]:
    """Median seconds of each function; the functions alternate run by run, so that load from
    other processes on a shared machine falls on both alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    args = parse_args()
    from transformers import AutoModelForCausalLM

    from meshtron.infer.generation import SamplingParams, generate
    from meshtron.infer.loading import default_device, load_for_generation, resolve_dtype

    device = default_device() if args.device == "auto" else torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.model is None:
        from meshtron.assets import prepare_smollm2

        args.model = str(prepare_smollm2())
    batch_sizes = args.batch_sizes or ([1, 16] if device.type == "cuda" else [1, 8])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    ours = load_for_generation(args.model, dtype=str(dtype).removeprefix("torch."), device=device)
    decode = "compiled" if args.compile else "dynamic"

    def hf_runner(static_compile: bool):
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        extra = {}
        if static_compile:
            extra = {"cache_implementation": "static"}
            hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)

        @torch.no_grad()
        def run(tokens, n):
            out = hf.generate(tokens.to(device), attention_mask=torch.ones_like(tokens, device=device),
                              do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **extra)
            assert out.shape[1] == tokens.shape[1] + n

        return run

    def run_ours(tokens, n):
        generate(ours.model, tokens.tolist(), SamplingParams(max_new_tokens=n), decode=decode)

    impls = {"transformers": hf_runner(False)}
    if args.hf_static_compile:
        impls["transformers static+compile"] = hf_runner(True)
    impls["meshtron" + (" compiled" if args.compile else "")] = run_ours

    rows = []
    for batch_size in batch_sizes:
        tokens = prompts_for(ours.tokenizer, batch_size, args.prompt_tokens)
        first = timed_pair({name: (lambda fn=fn: fn(tokens, 1)) for name, fn in impls.items()}, args.repeats, sync)
        full = timed_pair({name: (lambda fn=fn: fn(tokens, args.new_tokens)) for name, fn in impls.items()},
                          args.repeats, sync)
        for name in impls:
            decode = batch_size * (args.new_tokens - 1) / (full[name] - first[name])
            rows.append({"impl": name, "batch": batch_size, "ttft_ms": first[name] * 1000, "decode_tok_s": decode})
            print(f"{name:>28}  batch {batch_size:>3}  TTFT {first[name] * 1000:8.1f} ms  decode {decode:9.1f} tok/s",
                  flush=True)
    for batch_size in batch_sizes:
        *hf_rows, our_row = (r for r in rows if r["batch"] == batch_size)
        for hf_row in hf_rows:
            print(f"batch {batch_size}: {our_row['impl']} / {hf_row['impl']} decode = "
                  f"{our_row['decode_tok_s'] / hf_row['decode_tok_s']:.2f}x, TTFT = "
                  f"{hf_row['ttft_ms'] / our_row['ttft_ms']:.2f}x faster")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    load = f", load average {open('/proc/loadavg').read().split()[0]}" if device.type == "cpu" else ""
    print(f"machine: {machine}{load}; torch {torch.__version__}; dtype {dtype}; prompt {args.prompt_tokens}, "
          f"new {args.new_tokens}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "dtype": str(dtype), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
