"""FSDP2 (`fully_shard`) over the data-parallel axes: FSDP, HSDP and DDP in one code path.

Each block of the family's plan is one FSDP unit, and so are the embedding and the final norm with
the output head (as torchtitan shards them): a rank holds the whole of a large vocabulary's
embedding only while it is used, not through the whole step. A head tied to the embedding stays
with it in the root unit (one parameter, one unit). On a 1-D mesh (dp_shard)
this is FSDP/ZeRO-3; on a 2-D mesh (dp_replicate, dp_shard) it is HSDP, and with a shard
degree of 1 it is DDP (parameters replicated, gradients all-reduced).

Under expert parallel each MoE block's experts are a unit of their own, sharded over the ranks that hold
the same experts (`Meshes.expert_fsdp`), on their second dim (the expert dim is ep's).
"""

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from meshtron.parallel.dims import Meshes
from meshtron.parallel.plan import ParallelPlan


def apply_fsdp(model: nn.Module, plan: ParallelPlan, meshes: Meshes, param_dtype: torch.dtype,
               reduce_dtype: torch.dtype, reshard_after_forward: bool = True) -> None:
    """Wrap blocks, then the root. param_dtype is the compute dtype; reduce_dtype that of gradient reduction.

    `reshard_after_forward=False` keeps the gathered parameters between forward and backward: a
    pipeline stage runs several micro-batches' forwards before their backwards and would
    otherwise gather its parameters again for each.
    """
    dp_mesh = meshes.fsdp
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if meshes.ep is not None:
        _shard_experts(model, plan, meshes.expert_fsdp, dp_mesh.size(), mp_policy, reshard_after_forward)
    shards = dp_mesh.size(dp_mesh.ndim - 1)  # (torch 2.11 takes no negative mesh dim)

    def placement(param: nn.Parameter):
        # A matrix with fewer rows than shards (a reward model's one-output score head) is split by
        # columns instead, so that every rank holds a piece and seeded initialization can scatter it.
        if param.ndim == 2 and param.shape[0] < shards and param.shape[1] % shards == 0:
            return Shard(1)
        return None

    embedding = getattr(model, plan.embedding, None)
    head = [module for module in (getattr(model, name, None) for name in plan.head) if module is not None]
    if not model.args.head_is_tied:
        if embedding is not None:
            fully_shard(embedding, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
        if head:
            # Not resharded after forward: backward needs the head first, and the chunked loss
            # (train/losses.py) recomputes with the gathered weight it saved. The norm's forward
            # gathers the unit, as the loss uses the head's weight without calling the head.
            fully_shard(head, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=False,
                        shard_placement_fn=placement)
    blocks = plan.blocks_of(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, shard_placement_fn=placement)


def _shard_experts(model: nn.Module, plan: ParallelPlan, mesh, dp_size: int, mp_policy: MixedPrecisionPolicy,
                   reshard_after_forward: bool) -> None:
    """Each MoE block's experts, split over ep already, as one unit over `mesh`. An expert's gradient sums
    the rows that every rank of its ep group sent it, so it is divided by all data-parallel ranks (as the
    other gradients are), not by the ranks of `mesh` only."""
    for experts in plan.experts_of(model):
        fully_shard(experts, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=lambda param: Shard(1))
        experts.set_gradient_divide_factor(dp_size)
        # gloo has no pre-multiplied sum (NCCL's PreMulSum): sum, then divide. Not on one shard rank, where
        # torch 2.13 would divide twice (it divides its copy of the gradient and then again after it).
        if mesh.device_type != "cuda" and mesh.size(mesh.ndim - 1) > 1:
            experts.set_force_sum_reduction_for_comms(True)
