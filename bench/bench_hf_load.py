"""Peak host memory per rank while loading SmolLM2-135M's Hugging Face weights into a sharded model.

Run under torchrun (gloo on CPU), one process per rank, at a layout given as overrides:

    python bench/bench_hf_load.py                                          # one process
    torchrun --nproc-per-node 2 bench/bench_hf_load.py --parallel.dp_shard 2
    torchrun --nproc-per-node 3 bench/bench_hf_load.py --parallel.tp 3 --parallel.dp_shard 1 --train.seq_length 18  # 9 heads

Each rank builds the trainer (model on meta, parallelize, materialize, load the weights; AdamW's
states are created lazily at the first step, so none here) and prints one JSON line: its peak
resident set (`ru_maxrss`) before building and after, the resident set after split into anonymous
memory and mapped file pages, and the loader logs the bytes of weights each rank read. Not a test: results go to bench/RESULTS.md.
"""

import json
import logging
import os
import resource
import sys
import tempfile
from pathlib import Path

from meshtron.config import load_config
from meshtron.train.trainer import Trainer

SMOLLM2 = Path.home() / ".cache/meshtron/SmolLM2-135M-Instruct"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def resident_mib() -> dict[str, int]:
    """The resident set now, split into anonymous memory (tensors) and mapped file pages (safetensors' mmap)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {f"{k.lower()}_mib": int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "RssFile")}


def main(overrides: list[str]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the loader's bytes-read line
    before = peak_mib()
    output_dir = str(Path(tempfile.gettempdir()) / "bench_hf_load")  # one directory all ranks share
    config = load_config(None, [
        "--model.name_or_path", str(SMOLLM2), "--model.dtype", "float32", "--data.mock", "true",
        "--train.micro_batch_size", "1", "--train.seq_length", "16",
        "--train.global_batch_size", os.environ.get("WORLD_SIZE", "1"), "--train.output_dir", output_dir,
        "--log.tensorboard", "false", "--log.plot", "false", *overrides])
    Trainer(config)
    print(json.dumps({"rank": int(os.environ.get("RANK", "0")), "layout": " ".join(overrides) or "1 process",
                      "peak_rss_mib_before": round(before), "peak_rss_mib_after_load": round(peak_mib()), **resident_mib()}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
