"""Optimizers (AdamW, SGD) and gradient clipping by the true global norm.

Weight decay applies to matrices only: norms, biases and embeddings are excluded (as in
Megatron-LM and nanoGPT), since decaying them hurts and saves nothing.
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from meshtron.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device_type: str) -> torch.optim.Optimizer:
    # Parameters on different meshes (or plain ones beside DTensors, as with TP alone without sequence
    # parallel) go to separate groups: a foreach kernel cannot mix them.
    from meshtron.parallel.pipeline import StageParts, holds_split_head

    parts = list(model) if isinstance(model, StageParts) else [model]
    # A pipeline stage's copy of a tied embedding is the embedding: no decay either.
    no_decay = {id(part.lm_head.weight) for part in parts if hasattr(part, "args") and holds_split_head(part)}
    groups: dict[tuple, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if param.requires_grad:
            decays = param.ndim >= 2 and "embed" not in name and id(param) not in no_decay
            mesh = param.device_mesh if isinstance(param, DTensor) else None
            groups.setdefault((decays, mesh), []).append(param)
    groups = [{"params": params, "weight_decay": cfg.weight_decay if decays else 0.0}
              for (decays, _), params in groups.items()]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # The fused kernel is one launch for all parameters on GPU; on CPU the foreach path is as fast.
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused, foreach=not fused)


@torch.no_grad()
def clip_grad_norm(params: list[torch.Tensor], max_norm: float, pp_group=None, counted_elsewhere=()) -> torch.Tensor:
    """Clip to `max_norm` (0: no clipping) by the L2 norm over every shard of every gradient; returns that norm.

    Gradients are grouped by device mesh: with FSDP x TP some parameters live on the 2-D mesh and,
    without sequence parallel, the norms on the data-parallel mesh only, and one foreach norm
    cannot mix DTensors of different meshes (nor DTensors and plain tensors, as with TP alone without
    sequence parallel). `full_tensor()` reduces each partial norm across its mesh. With pipeline
    parallel each rank holds some stages' parameters: the squared norms are summed over `pp_group`.
    `counted_elsewhere`: parameters clipped here but left out of the norm (a pipeline stage's copy of
    a tied embedding, whose gradient the embedding's stage already counts).
    """
    skip = {id(p) for p in counted_elsewhere}
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in groups.values():
        group = [p for p in group if id(p) not in skip]
        if not group:
            continue
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], foreach=True)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if pp_group is not None:
        squared = total.float().pow(2)
        dist.all_reduce(squared, group=pp_group)
        total = squared.sqrt()
    if max_norm > 0:
        for group in groups.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total
