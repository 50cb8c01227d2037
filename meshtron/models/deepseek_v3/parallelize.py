"""DeepSeek's tensor-parallel plan: the dense and MoE block plans with latent attention's projections in
place of q/k/v/o (models/common/mla.py)."""

from meshtron.models.common.mla import mla_projection_plan
from meshtron.models.common.parallelize import dense_block_plan, dense_model_plan, moe_block_plan
from meshtron.parallel.plan import ParallelPlan

_GQA_PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj")


def _with_latent_attention(plan: dict, args, sequence_parallel: bool) -> dict:
    kept = {name: style for name, style in plan.items() if name not in _GQA_PROJECTIONS}
    return {**kept, **mla_projection_plan(args, sequence_parallel)}


def block_plan(args, sequence_parallel: bool) -> dict:
    return _with_latent_attention(dense_block_plan(args, sequence_parallel), args, sequence_parallel)


def moe_plan(args, sequence_parallel: bool) -> dict:
    return _with_latent_attention(moe_block_plan(args, sequence_parallel), args, sequence_parallel)


PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=block_plan, tp_moe_block=moe_plan)
