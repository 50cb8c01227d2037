"""Tensor-parallel placement of LoRA adapters, consistent with their base layer's TP style.

Column-wise base (output features split): A replicated, B split by rows (its output features),
so the adapter's output is split like the base's. Row-wise base (input features split): A split
by columns (its input features), B replicated, so the adapter's output is a partial sum like
the base's and is reduced with it. The base module's TP hooks hand the adapter DTensor inputs,
so no communication is added.

torch's Colwise/RowwiseParallel shard every parameter under the module they are given, so the
adapters are detached while the base plan is applied and placed afterwards.
"""

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from meshtron.lora.layers import LoRALinear

_ADAPTER_MODULES = ("lora_A", "lora_B", "lora_dropout")


def _distribute(linear: nn.Linear, mesh: DeviceMesh, placement) -> None:
    weight = linear.weight
    linear.weight = nn.Parameter(distribute_tensor(weight.data, mesh, [placement]), requires_grad=weight.requires_grad)


@contextlib.contextmanager
def _adapters_detached(block: nn.Module):
    detached = {}
    for name, module in block.named_modules():
        if isinstance(module, LoRALinear):
            detached[name] = {k: module._modules.pop(k) for k in _ADAPTER_MODULES}
    try:
        yield
    finally:
        for name, children in detached.items():
            block.get_submodule(name)._modules.update(children)


def parallelize_with_adapters(block: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """`parallelize_module(block, mesh, plan)`, then place the adapters of its LoRALinear modules."""
    with _adapters_detached(block):
        parallelize_module(block, mesh, plan)
    for name, style in plan.items():
        module = block.get_submodule(name)
        if not isinstance(module, LoRALinear):
            continue
        if isinstance(style, ColwiseParallel):
            _distribute(module.lora_A, mesh, Replicate())
            _distribute(module.lora_B, mesh, Shard(0))
        elif isinstance(style, RowwiseParallel):
            _distribute(module.lora_A, mesh, Shard(1))
            _distribute(module.lora_B, mesh, Replicate())
