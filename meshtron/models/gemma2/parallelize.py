"""Gemma 2's parallelize plan: the dense plan, with its two extra (post) norms sequence-parallel too."""

from torch.distributed.tensor.parallel import SequenceParallel

from meshtron.models.common.parallelize import dense_block_plan, dense_model_plan
from meshtron.parallel.plan import ParallelPlan


def block_plan(args, sequence_parallel: bool):
    plan = dense_block_plan(args, sequence_parallel)
    if sequence_parallel:
        plan.update({"post_attn_norm": SequenceParallel(), "post_mlp_norm": SequenceParallel()})
    return plan


PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=block_plan)
