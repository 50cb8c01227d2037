"""Time to build a 1B model for training at dp_shard = 2 on CPU: the model on meta, sharded,
materialized and initialized, as a run does before its first step.

Run under torchrun (gloo on CPU), one process per rank:

    torchrun --nproc-per-node 2 bench/bench_init.py --output-dir /tmp/init

llama3.2-1b (1.24B parameters, float32), random initialization (a flavor, nothing loaded).
Each rank prints one JSON line: the seconds `Trainer(config)` took (model, optimizer, data loader
on mock tokens; AdamW's states come at the first step) and the random values the rank drew (from
the build's log line; absent before that line existed). Not a test: results go to bench/RESULTS.md.
"""

import argparse
import json
import logging
import os
import re
import time


class DrawnCounter(logging.Handler):
    """Keeps the number in the build's 'rank R drew N initial values' line."""

    def __init__(self):
        super().__init__()
        self.drawn = None

    def emit(self, record):
        found = re.search(r"drew (\d+) initial values", record.getMessage())
        if found:
            self.drawn = int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavor", default="llama:llama3.2-1b")
    parser.add_argument("--output-dir", required=True, help="the run directory (a scratch directory)")
    args = parser.parse_args()

    import torch.distributed as dist

    from meshtron.config import load_config
    from meshtron.train.trainer import Trainer

    counter = DrawnCounter()
    logging.getLogger("meshtron").addHandler(counter)
    logging.getLogger("meshtron").setLevel(logging.INFO)
    config = load_config(None, [
        "--model.name_or_path", args.flavor, "--data.mock", "true", "--parallel.dp_shard", "-1",
        "--train.micro_batch_size", "1", "--train.seq_length", "16",
        "--train.global_batch_size", os.environ.get("WORLD_SIZE", "1"),
        "--train.output_dir", args.output_dir, "--log.tensorboard", "false", "--log.plot", "false",
    ])
    start = time.perf_counter()
    trainer = Trainer(config)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in trainer.model.parameters())
    print(json.dumps({"rank": dist.get_rank(), "build_seconds": round(seconds, 1), "drawn": counter.drawn,
                      "parameters": params}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
