"""Tensor-parallel inference under torchrun: one process per device, one "tp" mesh axis.

The sharding plan is the training plan (`meshtron.parallel.tp`, without sequence parallel):
q/k/v and gate/up column-wise, o/down row-wise, embedding and head over the vocabulary. The
model reads head counts from tensor shapes, so attention and the KV cache work on each rank's
local heads unchanged. Only the logits are gathered, so that every rank samples the same
token from the same full distribution.
"""

import contextlib
import math
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def init_tp_mesh() -> tuple[DeviceMesh | None, torch.device | None]:
    """Under torchrun with several processes: the process group, a 1-D "tp" mesh and this
    rank's device (gloo on CPU, NCCL on GPUs). (None, None) for a single process."""
    if world_size() == 1:
        return None, None
    device = join_process_group()
    mesh = init_device_mesh(device.type, (world_size(),), mesh_dim_names=("tp",))
    return mesh, device


def join_process_group() -> torch.device:
    """This process's device (its local GPU, else the CPU) and the torchrun process group on it
    (NCCL on GPUs, gloo on CPU)."""
    from meshtron.parallel.dims import device_binding, local_device

    device = local_device()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **device_binding(device))
    return device


def close_tp(tp_mesh: DeviceMesh | None) -> None:
    if tp_mesh is not None and dist.is_initialized():
        dist.destroy_process_group()


def parallelize_for_inference(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard `model` (on the meta device, or materialized: then each rank keeps its shard) in place."""
    from meshtron.models.registry import get_family
    from meshtron.parallel.tp import apply_tp

    check_tp_size(model.args, tp_mesh.size())
    apply_tp(model, get_family(model.args.family).plan, tp_mesh, sequence_parallel=False)
    model.register_forward_hook(_gather_logits)


def check_tp_size(args, size: int) -> None:
    """Every split dimension must divide by the process count; the error names the counts that work."""
    from meshtron.errors import LaunchError

    counts = {"attention heads": args.num_heads, "key/value heads": args.num_kv_heads,
              "MLP width": args.ffn_dim, "vocabulary": args.vocab_size}
    bad = {name: count for name, count in counts.items() if count % size}
    if not bad:
        return
    common = math.gcd(*counts.values())
    usable = [n for n in range(2, common + 1) if common % n == 0]
    listed = ", ".join(f"{name} ({count})" for name, count in counts.items())
    advice = (f"launch {' or '.join(map(str, usable))} processes (the counts that divide all of them)" if usable
              else "run it in one process (no count above 1 divides all of them)")
    raise LaunchError(f"this model cannot be split over {size} processes: its "
                      f"{', '.join(f'{name} ({count})' for name, count in bad.items())} do not divide by {size}. "
                      f"Tensor parallel splits the {listed}; {advice}")


@contextlib.contextmanager
def logits_gathered(model: nn.Module):
    """While inside, a tensor-parallel training model (whose vocabulary-sharded logits feed the loss under
    loss_parallel) returns its logits whole on every rank, as an inference model does: generation samples
    from them."""
    handle = model.register_forward_hook(_gather_logits)
    try:
        yield
    finally:
        handle.remove()


def _gather_logits(module, inputs, output):
    return output.full_tensor() if isinstance(output, DTensor) else output


def shared_seed(seed: int | None) -> int | None:
    """Every rank must sample the same tokens: without a seed, rank 0 draws one for all."""
    if seed is not None or not dist.is_initialized():
        return seed
    drawn = torch.randint(0, 2**62, (1,)) if is_main_process() else torch.zeros(1, dtype=torch.long)
    if dist.get_backend() == "nccl":
        drawn = drawn.cuda()
    dist.broadcast(drawn, src=0)
    return int(drawn.item())
