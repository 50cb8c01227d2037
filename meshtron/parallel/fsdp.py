"""FSDP2 (`fully_shard`) over the data-parallel axes: FSDP, HSDP and DDP in one code path.

Each block of the family's plan is one FSDP unit; the root unit holds the embedding, final norm and
output head (so that tied embedding and head stay in one unit). On a 1-D mesh (dp_shard)
this is FSDP/ZeRO-3; on a 2-D mesh (dp_replicate, dp_shard) it is HSDP, and with a shard
degree of 1 it is DDP (parameters replicated, gradients all-reduced).
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from meshtron.parallel.plan import ParallelPlan


def apply_fsdp(model: nn.Module, plan: ParallelPlan, dp_mesh: DeviceMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool = True) -> None:
    """Wrap blocks, then the root. param_dtype is the compute dtype; reduce_dtype that of gradient reduction.

    `reshard_after_forward=False` keeps the gathered parameters between forward and backward: a
    pipeline stage runs several micro-batches' forwards before their backwards and would
    otherwise gather its parameters again for each.
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    shards = dp_mesh.size(dp_mesh.ndim - 1)  # (torch 2.11 takes no negative mesh dim)

    def placement(param: nn.Parameter):
        # A matrix with fewer rows than shards (a reward model's one-output score head) is split by
        # columns instead, so that every rank holds a piece and seeded initialization can scatter it.
        if param.ndim == 2 and param.shape[0] < shards and param.shape[1] % shards == 0:
            return Shard(1)
        return None

    blocks = plan.blocks_of(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, shard_placement_fn=placement)
