"""Peak memory per rank of one training step under FSDP, with and without gradient accumulation.

Run under torchrun (gloo on CPU), one process per rank:

    torchrun --nproc-per-node 2 bench/bench_grad_accum_memory.py --micro-batches 1 4 --output-dir /tmp/accum

A tiny-but-wide llama (8 layers, dim 256, ffn 2048, vocab 256: 14.3M parameters) at dp_shard = 2,
micro-batch 1 x 16 tokens, so that parameters, gradients and optimizer states dominate, as they
do for a large model. The memory is counted by torch's FSDPMemTracker (the bytes of live tensor
storages by kind: sharded and unsharded parameters and gradients, optimizer states, activations,
communication buffers), so it is deterministic, unlike the process's resident size. Rank 0 prints
one JSON line per micro-batch count: the step's loss and the breakdown at the step's peak.
"""

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

from meshtron.config import load_config
from meshtron.train.trainer import Trainer

WIDE_MODEL = "{num_layers = 8, dim = 256, num_heads = 4, num_kv_heads = 2, head_dim = 64, ffn_dim = 2048, vocab_size = 256}"


def build_trainer(micro_batches: int, output_dir: str) -> Trainer:
    config = load_config(None, [
        "--model.name_or_path", "llama:debug", "--model.args", WIDE_MODEL, "--data.mock", "true",
        "--parallel.dp_shard", "-1", "--train.micro_batch_size", "1", "--train.seq_length", "16",
        # global batch = micro-batches x micro-batch size x data-parallel ranks
        "--train.global_batch_size", str(micro_batches * int(os.environ["WORLD_SIZE"])),
        "--train.output_dir", output_dir, "--log.tensorboard", "false", "--log.plot", "false",
    ])
    return Trainer(config)


def timed_step(trainer: Trainer) -> dict:
    trainer.timer.begin(timed=False)
    metrics = trainer.train_step()
    trainer.timer.end()
    return metrics


def measure_step(trainer: Trainer) -> tuple[dict, dict[str, int]]:
    """(metrics, memory breakdown at the peak) of one step, after a first step created the optimizer states.

    FSDPMemTracker refuses a second forward in one tracked window, so its module records are reset
    before each micro-batch, keeping the highest peak seen so far.
    """
    trainer.data_iter = iter(trainer.data_loader)
    timed_step(trainer)
    tracker = FSDPMemTracker(trainer.model, trainer.optimizer)
    cpu = torch.device("cpu")
    peaks = []
    forward_backward = trainer.forward_backward

    def tracked_forward_backward(batch, loss_scale):
        peaks.append(tracker.get_tracker_snapshot("peak")[cpu])
        tracker.reset_mod_stats()
        return forward_backward(batch, loss_scale)

    trainer.forward_backward = tracked_forward_backward
    with tracker:
        metrics = timed_step(trainer)
    peaks.append(tracker.get_tracker_snapshot("peak")[cpu])
    return metrics, max(peaks, key=lambda peak: peak["Total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1, 4],
                        help="micro-batches accumulated per step; one measured step for each count")
    parser.add_argument("--output-dir", required=True, help="the run directory (a scratch directory)")
    args = parser.parse_args()
    for micro_batches in args.micro_batches:
        trainer = build_trainer(micro_batches, f"{args.output_dir}/{micro_batches}")
        metrics, peak = measure_step(trainer)
        if dist.get_rank() == 0:
            print(json.dumps({"micro_batches": micro_batches, "loss": metrics["loss"], "peak_bytes": peak,
                              "model_args": trainer.model_args.to_dict()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
