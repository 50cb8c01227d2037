"""Seeded parameter initialization that every module applies to its own parameters, shard by shard.

Each module kind with parameters defines `init_weights(init: ParamInit)` and writes its own
tensors through `init`; the model walks its modules and hands each one a `ParamInit` scoped to its
name.

Random values are drawn in tiles: a parameter is cut into fixed blocks of its full shape
(`tile_shape`), and each block is drawn from its own generator, seeded by the run's seed, the
parameter's name and the block's position. A rank draws only the blocks that overlap the shard it
holds, on the shard's device, and copies the overlap in. So a pipeline stage holding some layers,
or a data- or tensor-parallel rank holding a shard, gets exactly the values the whole
single-device model gets, while drawing about its share of them (DTensor's own random ops give
values that depend on the layout: pytorch/pytorch#168058). The values depend on the device type's
generator (CPU and CUDA draw different, equally distributed, numbers).

`ParamInit` records every tensor it was asked to write; `init_model` refuses a model with a
parameter that no module claimed, so a new kind of parameter can never keep the memory that
`to_empty` leaves. Tensors named in `skip` (already loaded from a checkpoint) are claimed but
left untouched: pretrained weights are never overwritten by random ones.
"""

import itertools
import zlib
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

# Rows x columns of a drawn block (1M values): fine along dim 0, which FSDP splits many ways, and
# coarse along dim 1, which only tensor parallel splits.
TILE = (256, 4096)


def tile_shape(shape: torch.Size) -> tuple[int, ...]:
    """The block a tensor of `shape` is drawn in: leading dims (stacked experts) one at a time."""
    if len(shape) == 1:
        return (TILE[0] * TILE[1],)
    return (1,) * (len(shape) - 2) + TILE


def tensor_seed(seed: int, name: str) -> int:
    """The seed of a tensor called `name` (a full parameter name)."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def global_indices(tensor: torch.Tensor) -> list[torch.Tensor]:
    """For each dim, the positions in the full tensor of this rank's entries along it (CPU, int64)."""
    if not isinstance(tensor, DTensor):
        return [torch.arange(n) for n in tensor.shape]
    out = []
    for dim, size in enumerate(tensor.shape):
        # The placements restricted to `dim`, applied to its positions by DTensor's own split (no
        # communication with src_data_rank=None), which is how the parameter itself is laid out.
        along = [_moved_to_dim0(p) if isinstance(p, Shard | _StridedShard) and p.dim == dim else Replicate()
                 for p in tensor.placements]
        positions = distribute_tensor(torch.arange(size), tensor.device_mesh, along, src_data_rank=None)
        out.append(positions.to_local().cpu())
    return out


def _moved_to_dim0(placement: Shard) -> Shard:
    if isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor)
    return Shard(0)


def _blocks_along(positions: torch.Tensor, edge: int) -> list[tuple[int, torch.Tensor | slice, torch.Tensor | slice]]:
    """(block index, where in the local tensor, where in the block) for each block `positions` touch."""
    blocks = positions // edge
    out = []
    for block in torch.unique(blocks).tolist():
        local = torch.nonzero(blocks == block).flatten()
        inside = positions[local] - block * edge
        out.append((block, _as_slice(local), _as_slice(inside)))
    return out


def _as_slice(index: torch.Tensor) -> torch.Tensor | slice:
    """A run of consecutive positions as a slice (a view, the usual case), others as they are."""
    first, last = int(index[0]), int(index[-1])
    return slice(first, last + 1) if last - first + 1 == len(index) else index


def _select(parts: list) -> tuple:
    """An index for a block from one part per dim: slices, or an open mesh when some part is not a slice."""
    if all(isinstance(p, slice) for p in parts):
        return tuple(parts)
    return tuple((torch.arange(p.start, p.stop) if isinstance(p, slice) else p).view(
        [-1 if i == d else 1 for i in range(len(parts))]) for d, p in enumerate(parts))


def draw_(tensor: torch.Tensor, seed: int, fill: Callable[[torch.Tensor, torch.Generator], None],
          tile: tuple[int, ...] | None = None) -> int:
    """Write this rank's part of `tensor` (plain or DTensor) block by block, each block filled by
    `fill(block, generator)` in float32 on the tensor's device; returns the number of values drawn."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.numel() == 0:
        return 0
    tile = tile or tile_shape(tensor.shape)
    grid = [-(-n // t) for n, t in zip(tensor.shape, tile)]
    drawn = 0
    for parts in itertools.product(*(_blocks_along(p, t) for p, t in zip(global_indices(tensor), tile))):
        index = [block for block, _, _ in parts]
        shape = [min(t, n - i * t) for i, t, n in zip(index, tile, tensor.shape)]
        linear = 0
        for i, n in zip(index, grid):
            linear = linear * n + i
        generator = torch.Generator(device=local.device).manual_seed((seed * 1_000_003 + linear) % 2**63)
        block = torch.empty(shape, dtype=torch.float32, device=local.device)
        fill(block, generator)
        local[_select([p[1] for p in parts])] = block[_select([p[2] for p in parts])].to(local.dtype)
        drawn += block.numel()
    return drawn


class ParamInit:
    def __init__(self, seed: int | None, skip: frozenset[str] = frozenset(), prefix: str = "",
                 claimed: set[str] | None = None, drawn: list[int] | None = None):
        self.seed, self.skip, self.prefix = seed, skip, prefix
        self.claimed = claimed if claimed is not None else set()
        self.drawn = drawn if drawn is not None else [0]  # random values drawn, shared by the scopes

    def at(self, name: str) -> "ParamInit":
        """The same initializer for a submodule called `name`."""
        return ParamInit(self.seed, self.skip, self._full(name), self.claimed, self.drawn)

    def _full(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def _take(self, name: str) -> bool:
        """Claim a tensor; whether it is to be written."""
        full = self._full(name)
        self.claimed.add(full)
        return full not in self.skip

    def _random_(self, tensor: torch.Tensor, name: str, same_as: str | None, fill) -> None:
        if not self._take(name):
            return
        if self.seed is None:
            fill(tensor.to_local() if isinstance(tensor, DTensor) else tensor, None)
            return
        self.drawn[0] += draw_(tensor, tensor_seed(self.seed, same_as or self._full(name)), fill)

    def normal_(self, tensor: torch.Tensor, name: str, std: float, same_as: str | None = None) -> None:
        """Normal(0, std), seeded by the tensor's full name (or by `same_as`, the full name of a tensor
        whose values this copy must equal)."""
        self._random_(tensor, name, same_as, lambda block, gen: block.normal_(0.0, std, generator=gen))

    def uniform_(self, tensor: torch.Tensor, name: str, bound: float) -> None:
        self._random_(tensor, name, None, lambda block, gen: block.uniform_(-bound, bound, generator=gen))

    def fill_(self, tensor: torch.Tensor, name: str, value: float) -> None:
        if self._take(name):
            tensor.fill_(value)

    def linear(self, module: nn.Linear, name: str, std: float) -> None:
        """A projection `name` of the calling module: normal weight, zero bias."""
        self.normal_(module.weight, f"{name}.weight", std)
        if module.bias is not None:
            self.fill_(module.bias, f"{name}.bias", 0.0)


@torch.no_grad()
def init_model(model: nn.Module, seed: int | None, skip: frozenset[str] = frozenset()) -> int:
    """Call every module's `init_weights` with its scoped initializer; check that nothing was left out.
    Returns the number of random values this rank drew."""
    root = ParamInit(seed, skip)
    for name, module in model.named_modules():
        init_weights = getattr(module, "init_weights", None)
        if init_weights is not None and module is not model:
            init_weights(root.at(name))
    if hasattr(model, "init_own_weights"):
        model.init_own_weights(root)
    unclaimed = [n for n, _ in model.named_parameters() if n not in root.claimed]
    assert not unclaimed, f"parameters without an init_weights of their module: {unclaimed[:5]}"
    return root.drawn[0]
