"""Multi-head latent attention decode: the cached latent expanded into every head's keys and values, against
the up-projections absorbed into the query and output (`set_absorbed_decode`, models/common/mla.py).

One decode step (one new token per sequence) of one latent attention layer with DeepSeek-V3's attention shape
(128 heads, kv_lora_rank 512, nope / rope / value head dims 128 / 64 / 128; model dim reduced to keep the
query projections small, which both variants share) over a cache of --cache tokens. Both see the same
weights, cache and token. Median of --repeats after one warmup.

    OMP_NUM_THREADS=1 python bench/bench_mla_decode.py                          # CPU, float32
    python bench/bench_mla_decode.py --device cuda --dtype bfloat16 --batch 32 --cache 8192   # GPU

Not a test: results go to bench/RESULTS.md.
"""

import argparse
import statistics
import time

import torch

from meshtron.models.common.attention import KVCache
from meshtron.models.common.masks import AttentionMask
from meshtron.models.common.mla import LatentAttention
from meshtron.models.common.rope import RotaryEmbedding
from meshtron.models.deepseek_v3.args import deepseek_v3


def step_seconds(attn, x, cos, sin, cache, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        attn(x, cos, sin, AttentionMask.for_batch(1, None, cache.offset), cache)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cache", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    dtype = getattr(torch, opts.dtype)
    args = deepseek_v3(1024, 1, 128, 1024, 64, 8, 0, 1000, head_dim=64, q_lora_rank=256, kv_lora_rank=512,
                       qk_nope_head_dim=128, v_head_dim=128, num_experts_per_token=2, max_seq_len=65536)
    torch.manual_seed(0)
    attn = LatentAttention(args, 0).to(opts.device, dtype).eval()
    rope = RotaryEmbedding(args).to(opts.device)
    rope.reset_parameters()
    print("| batch | cached tokens | expanded (ms) | absorbed (ms) | speedup |")
    print("| --- | --- | --- | --- | --- |")
    for length in opts.cache:
        cache = KVCache(1, opts.batch, length + 1, device=opts.device)
        x = torch.randn(opts.batch, 1, args.dim, device=opts.device, dtype=dtype)
        with torch.no_grad():
            prefix = torch.randn(opts.batch, length, args.dim, device=opts.device, dtype=dtype)
            cos, sin = rope(torch.arange(length, device=opts.device).expand(opts.batch, length), dtype)
            attn(prefix, cos, sin, AttentionMask.for_batch(length), cache)
            cache.advance(length)
            cos, sin = rope(torch.full((opts.batch, 1), length, device=opts.device), dtype)
            seconds = {}
            for absorbed in (False, True):
                attn.absorb = absorbed
                seconds[absorbed] = step_seconds(attn, x, cos, sin, cache, opts.repeats)
        print(f"| {opts.batch} | {length} | {seconds[False] * 1e3:.1f} | {seconds[True] * 1e3:.1f} | "
              f"{seconds[False] / seconds[True]:.2f}x |")


if __name__ == "__main__":
    main()
