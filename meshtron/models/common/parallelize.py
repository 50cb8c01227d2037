"""The dense decoder's parallelize plan (tensor + sequence parallel as data, recompute and FSDP units).

Attention heads and MLP columns are split Megatron-style: q/k/v and gate/up column-wise, o/down
row-wise. The embedding is split over the vocabulary (row-wise) and the output head over the
vocabulary too (column-wise); its logits stay sharded so that the loss runs under `loss_parallel`
without gathering a (B, S, V) tensor. A score head (`num_labels`, e.g. a reward model's one
output) has too few rows to split: it is replicated and reads the gathered stream.

With sequence parallel the residual stream between blocks is a DTensor sharded on the sequence
dimension (dim 1): norms run on a slice of the tokens, and the row-wise projections
reduce-scatter instead of all-reduce. The stream is kept as a DTensor so that the model still
sees the global sequence length when it builds positions and masks.
"""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
)

from meshtron.models.common.args import ModelArgs
from meshtron.parallel.plan import ParallelPlan
from meshtron.parallel.tp import ReplicatedHead

# Attention takes (x, cos, sin, masks, cache); only x is distributed.
_ATTN_EXTRA_INPUTS = (None, None, None, None)


def dense_model_plan(args: ModelArgs, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    stream = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=stream, use_local_output=not sequence_parallel),
        "lm_head": (ReplicatedHead(stream) if args.num_labels
                    else ColwiseParallel(input_layouts=stream, output_layouts=Shard(-1), use_local_output=False)),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    return plan


def dense_block_plan(args: ModelArgs, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    return {**_dense_block_plan(sequence_parallel), **(_qk_norm_plan() if args.qk_norm else {})}


def _qk_norm_plan() -> dict[str, ParallelStyle]:
    """Per-head q/k norms see only this rank's heads (dim 2 of (B, S, heads, head_dim)): their weight is
    replicated, and its gradient, a sum over all heads, is reduced over the tensor-parallel ranks."""
    heads = SequenceParallel(sequence_dim=2, use_local_output=True)
    return {"attn.q_norm": heads, "attn.k_norm": heads}


def _dense_block_plan(sequence_parallel: bool) -> dict[str, ParallelStyle]:
    if not sequence_parallel:
        return {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
    return {
        "attn_norm": SequenceParallel(),
        # Gather the sequence before attention; the projections then see local (full-sequence) tensors.
        "attn": PrepareModuleInput(
            input_layouts=(Shard(1), *_ATTN_EXTRA_INPUTS),
            desired_input_layouts=(Replicate(), *_ATTN_EXTRA_INPUTS),
            use_local_output=True,
        ),
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "mlp_norm": SequenceParallel(),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
    }


def sandwich_block_plan(args: ModelArgs, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The dense block plan, with the two extra norms of a sandwich block (models/common/transformer.py)
    sequence-parallel too."""
    plan = dense_block_plan(args, sequence_parallel)
    if sequence_parallel:
        plan.update({"post_attn_norm": SequenceParallel(), "post_mlp_norm": SequenceParallel()})
    return plan


def moe_block_plan(args: ModelArgs, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """A block with an MoE feed-forward: attention as in the dense plan; the MoE layer (router, shared
    expert) replicated, computed by every tensor-parallel rank on all the block's tokens. The experts are
    split by parallel/ep.py: over ep ranks, or without expert parallel over these tp ranks. With sequence
    parallel its input is gathered and its output, the same on every rank, sliced back to this rank's part
    of the sequence."""
    plan = {name: style for name, style in dense_block_plan(args, sequence_parallel).items()
            if name != "mlp" and not name.startswith("mlp.")}
    if sequence_parallel:
        plan["mlp"] = PrepareModuleInputOutput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
            output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),), use_local_output=False)
    return plan


DENSE_PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=dense_block_plan)
SANDWICH_PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=sandwich_block_plan)
MOE_PLAN = ParallelPlan(tp_model=dense_model_plan, tp_block=dense_block_plan, tp_moe_block=moe_block_plan,
                        experts="mlp.experts")
