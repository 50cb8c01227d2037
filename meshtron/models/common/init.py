"""Seeded parameter initialization that every module applies to its own parameters.

Each module kind with parameters defines `init_weights(init: ParamInit)` and writes its own
tensors through `init`; the model walks its modules and hands each one a `ParamInit` scoped to its
name. Every value is drawn from a CPU generator seeded by the run's seed and the name of the
module that owns it, so a pipeline stage holding some layers, or a tensor-parallel rank keeping
a shard of the drawn tensor, gets exactly what the whole single-device model gets.

`ParamInit` records every tensor it was asked to write; `init_model` refuses a model with a
parameter that no module claimed, so a new kind of parameter can never keep the memory that
`to_empty` leaves. Tensors named in `skip` (already loaded from a checkpoint) are claimed but
left untouched: pretrained weights are never overwritten by random ones.
"""

import zlib

import torch
from torch import nn


def module_generator(seed: int | None, name: str) -> torch.Generator | None:
    """A CPU generator seeded by `seed` and a module name (None without a seed)."""
    if seed is None:
        return None
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


class ParamInit:
    def __init__(self, seed: int | None, skip: frozenset[str] = frozenset(), prefix: str = "",
                 claimed: set[str] | None = None):
        self.seed, self.skip, self.prefix = seed, skip, prefix
        self.claimed = claimed if claimed is not None else set()

    def at(self, name: str) -> "ParamInit":
        """The same initializer for a submodule called `name`."""
        return ParamInit(self.seed, self.skip, self._full(name), self.claimed)

    def _full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _take(self, name: str) -> bool:
        """Claim a tensor; whether it is to be written."""
        full = self._full(name)
        self.claimed.add(full)
        return full not in self.skip

    def normal_(self, tensor: torch.Tensor, name: str, std: float, seed_module: str | None = None) -> None:
        """Normal(0, std), drawn from the generator of the owning module (or of `seed_module`, a full
        module name, for a copy that must equal another module's values)."""
        if not self._take(name):
            return
        gen = module_generator(self.seed, self._full(name).rsplit(".", 1)[0] if seed_module is None else seed_module)
        if gen is None:
            nn.init.normal_(tensor, 0.0, std)
        else:
            # Drawn on CPU in float32, so that a seed gives the same weights on any device and dtype.
            tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))

    def uniform_(self, tensor: torch.Tensor, name: str, bound: float, seed_module: str | None = None) -> None:
        if not self._take(name):
            return
        gen = module_generator(self.seed, self._full(name).rsplit(".", 1)[0] if seed_module is None else seed_module)
        tensor.copy_(torch.empty(tensor.shape, dtype=torch.float32).uniform_(-bound, bound, generator=gen))

    def fill_(self, tensor: torch.Tensor, name: str, value: float) -> None:
        if self._take(name):
            tensor.fill_(value)

    def linear(self, module: nn.Linear, name: str, std: float) -> None:
        """A projection `name` of the calling module: normal weight, zero bias."""
        self.normal_(module.weight, f"{name}.weight", std)
        if module.bias is not None:
            self.fill_(module.bias, f"{name}.bias", 0.0)


@torch.no_grad()
def init_model(model: nn.Module, seed: int | None, skip: frozenset[str] = frozenset()) -> None:
    """Call every module's `init_weights` with its scoped initializer; check that nothing was left out."""
    root = ParamInit(seed, skip)
    for name, module in model.named_modules():
        init_weights = getattr(module, "init_weights", None)
        if init_weights is not None and module is not model:
            init_weights(root.at(name))
    if hasattr(model, "init_own_weights"):
        model.init_own_weights(root)
    unclaimed = [n for n, _ in model.named_parameters() if n not in root.claimed]
    assert not unclaimed, f"parameters without an init_weights of their module: {unclaimed[:5]}"
