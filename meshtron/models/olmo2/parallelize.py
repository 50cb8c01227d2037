"""OLMo 2's parallelize plan. Its q/k norms span all heads of the projection, so q, k and v are computed
column-wise but gathered (every rank then runs all heads' attention, as transformers' own plan for OLMo 2
does) and the output projection splits its replicated input. The MLP is split as in the dense plan; the
post norms are sequence-parallel under sequence parallel."""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel

from meshtron.models.common.parallelize import _ATTN_EXTRA_INPUTS, dense_model_plan
from meshtron.parallel.plan import ParallelPlan


def block_plan(args, sequence_parallel: bool):
    stream = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attn.q_proj": ColwiseParallel(output_layouts=Replicate()),
        "attn.k_proj": ColwiseParallel(output_layouts=Replicate()),
        "attn.v_proj": ColwiseParallel(output_layouts=Replicate()),
        "attn.o_proj": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream,
                                       use_local_output=not sequence_parallel),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=stream, use_local_output=not sequence_parallel),
    }
    if sequence_parallel:
        # The blocks read the stream itself (no pre-norm to gather it): gather the sequence on entry.
        plan["attn"] = PrepareModuleInput(input_layouts=(Shard(1), *_ATTN_EXTRA_INPUTS),
                                          desired_input_layouts=(Replicate(), *_ATTN_EXTRA_INPUTS),
                                          use_local_output=True)
        plan["mlp"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                         use_local_output=True)
        plan.update({"post_attn_norm": SequenceParallel(), "post_mlp_norm": SequenceParallel()})
    return plan


PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=block_plan)
