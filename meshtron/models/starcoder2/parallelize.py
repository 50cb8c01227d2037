"""StarCoder2's parallelize plan: the dense plan without a gate projection (its MLP is up -> down:
up column-wise, down row-wise). Its LayerNorms are sequence-parallel like the dense RMSNorms."""

from meshtron.models.common.parallelize import dense_block_plan, dense_model_plan
from meshtron.parallel.plan import ParallelPlan


def block_plan(args, sequence_parallel: bool):
    plan = dense_block_plan(args, sequence_parallel)
    del plan["mlp.gate_proj"]
    return plan


PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=block_plan)
