"""What a pipeline stage holds unsharded under FSDP when torch's schedule reduces its gradients.

Run under torchrun (gloo on CPU), pp = 2 x dp_shard = 2:

    torchrun --nproc-per-node 4 bench/bench_pp_stage_memory.py --output-dir /tmp/pp-stage

torch's PipelineStage turns off FSDP's resharding after backward and its gradient reduction for
every micro-batch, and reduces in one REDUCE_GRAD action after the last. At that moment this
counts, on each rank, the bytes of the stage's unsharded parameters and of its unsharded
(accumulated) gradients, reading FSDP2's per-parameter state (torch internals: a measurement,
not meshtron code). The wide llama of bench_grad_accum_memory.py, bfloat16 compute with float32
master weights, 4 micro-batches of 1 x 16 tokens. Each rank prints one JSON line.
"""

import argparse
import json

import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining.stage import _PipelineStageBase

from meshtron.config import load_config
from meshtron.train.trainer import Trainer

WIDE_MODEL = "{num_layers = 8, dim = 256, num_heads = 4, num_kv_heads = 2, head_dim = 64, ffn_dim = 2048, vocab_size = 256}"


def unsharded_bytes(stage_module) -> dict[str, int]:
    held = {"params": 0, "grads": 0}
    for state in fully_shard.state(stage_module)._state_ctx.all_states:
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                param = getattr(fsdp_param, "_unsharded_param", None)
                if param is None:
                    continue
                if param.untyped_storage().size():
                    held["params"] += param.numel() * param.element_size()
                grad = fsdp_param.unsharded_accumulated_grad
                grad = grad if grad is not None else param.grad
                if grad is not None:
                    held["grads"] += grad.numel() * grad.element_size()
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="the run directory (a scratch directory)")
    args = parser.parse_args()
    seen = {}
    reduce_grad = _PipelineStageBase.perform_reduce_grad

    def measured_reduce_grad(stage, grad_scale_factor):
        seen.update(unsharded_bytes(stage.submod), stage=stage.stage_index,
                    stage_params=sum(p.numel() for p in stage.submod.parameters()))
        return reduce_grad(stage, grad_scale_factor)

    _PipelineStageBase.perform_reduce_grad = measured_reduce_grad
    config = load_config(None, [
        "--model.name_or_path", "llama:debug", "--model.args", WIDE_MODEL, "--data.mock", "true",
        "--model.dtype", "bfloat16", "--parallel.dp_shard", "2", "--parallel.pp", "2",
        "--train.micro_batch_size", "1", "--train.seq_length", "16", "--train.global_batch_size", "8",
        "--train.output_dir", args.output_dir, "--log.tensorboard", "false", "--log.plot", "false",
    ])
    trainer = Trainer(config)
    trainer.data_iter = iter(trainer.data_loader)
    trainer.timer.begin(timed=False)
    trainer.train_step()
    trainer.timer.end()
    print(json.dumps({"rank": dist.get_rank(), **seen, "model_args": trainer.model_args.to_dict()}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
