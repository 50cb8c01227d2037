"""Parallelism applied to a single-device model from outside, in one order.

`parallelize` is that order, written once: tensor (+ sequence) parallel, then expert parallel (the
experts are left whole by the TP plan: split over ep, or without it over tp), then activation recompute,
then torch.compile of each block, then FSDP2 last (it must see the final modules and the TP- and EP-sharded parameters).
Pipeline parallel comes first, outside this function: each pipeline stage is a pruned model
(meshtron.parallel.pipeline) that then goes through this same order. Context parallel slots in before
TP when it lands (see ARCHITECTURE.md).
The model is on the meta device throughout; it is materialized afterwards.
"""

import torch
from torch import nn

from meshtron.parallel.dims import AXES, Meshes, ParallelDims
from meshtron.parallel.ep import apply_ep, apply_expert_tp
from meshtron.parallel.fsdp import apply_fsdp
from meshtron.parallel.plan import ParallelPlan
from meshtron.parallel.recompute import apply_recompute
from meshtron.parallel.tp import apply_tp

__all__ = ["AXES", "Meshes", "ParallelDims", "ParallelPlan", "parallelize"]


def parallelize(
    model: nn.Module,
    plan: ParallelPlan,
    dims: ParallelDims,
    meshes: Meshes,
    *,
    sequence_parallel: bool,
    recompute_mode: str,
    recompute_layers: int,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    if dims.tp_enabled:
        apply_tp(model, plan, meshes.tp, sequence_parallel)
    if dims.ep_enabled:
        apply_ep(model, plan, meshes.ep)
    elif dims.tp_enabled:
        apply_expert_tp(model, plan, meshes.tp)
    apply_recompute(model, plan, recompute_mode, recompute_layers)
    if compile_blocks:
        # In place (nn.Module.compile), so parameter names stay free of an `_orig_mod.` prefix;
        # per block, so that FSDP's per-block hooks stay outside the compiled regions.
        for block in plan.blocks_of(model):
            block.compile()
    if dims.fsdp_enabled:
        apply_fsdp(model, plan, meshes, param_dtype, reduce_dtype, reshard_after_forward)
    return model
