"""Activation recompute: selective (the plan's `recompute_unit` of each block, by default the
attention core, whose score matrix is the largest activation), op (op-level selective: each block's
expensive ops keep their outputs, the cheap ones are recomputed) or full (whole blocks), on the
first `num_layers` blocks.

Neither adds a wrapper module, so parameter names, state dicts and Hugging Face key maps are the
same with and without recompute: selective and full use the composable `checkpoint` (hooks on the
module); op calls `torch.utils.checkpoint.checkpoint` from the block's own forward, which
torch.compile traces into the compiled block (the composable hooks would break its graph).
"""

import torch
from torch import nn
from torch._higher_order_ops.flex_attention import flex_attention
from torch.distributed._composable import checkpoint
from torch.utils.checkpoint import (
    SAC_IGNORED_OPS,
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from meshtron.parallel.plan import ParallelPlan


def _aten_ops(*names: str) -> tuple:
    """The default overloads of the aten ops this torch has (kernels come and go between versions)."""
    return tuple(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


# Under `op` their outputs are kept: matmuls (the experts' grouped GEMM too) and attention are where a
# block's time goes (recomputing them would cost a second forward), while norms, activations, RoPE and
# residual adds are cheap to redo.
SAVED_OPS = frozenset(_aten_ops(
    "mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_mm", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward",
) + (flex_attention,))


# FSDP's hooks on a module inside a block (the experts' own unit under expert parallel) open profiler
# regions in the block's forward, and a different number of them when backward recomputes it (FSDP's
# state differs then): torch's selective checkpoint would find the counts differ and stop (mixtral:debug
# at ep=2, tests/distributed/test_family_layouts.py). The regions are profiling markers, not computation:
# neither saved nor matched.
SAC_IGNORED_OPS.update({torch.ops.profiler._record_function_enter_new.default,
                        torch.ops.profiler._record_function_exit._RecordFunction})


def _save_expensive_ops(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def op_level_contexts():
    """The (forward, recompute) contexts of `op` recompute: torch's selective checkpoint with SAVED_OPS."""
    return create_selective_checkpoint_contexts(_save_expensive_ops)


def _checkpoint_ops(block: nn.Module) -> None:
    """Run the block's forward under op-level selective checkpoint (in place: the block stays itself)."""
    forward = block.forward

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=op_level_contexts,
                                                 **kwargs)

    block.forward = checkpointed


def apply_recompute(model: nn.Module, plan: ParallelPlan, mode: str, num_layers: int = 0) -> None:
    """mode: none | selective | op | full; num_layers: how many blocks from the first (0: all)."""
    if mode == "none":
        return
    blocks = plan.blocks_of(model)
    for block in blocks[: num_layers or len(blocks)]:
        if mode == "selective":
            checkpoint(block.get_submodule(plan.recompute_unit))
        elif mode == "op":
            _checkpoint_ops(block)
        else:
            checkpoint(block)
