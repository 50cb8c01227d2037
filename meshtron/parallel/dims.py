"""ParallelDims: the parallel degrees of a run, checked once, and the one DeviceMesh they build.

The mesh always has every axis, in the order pp, dp_replicate, dp_shard, cp, tp (a disabled
axis has size 1), so that code asks for an axis by name and never branches on which exist.
Flattened views: `dp` (dp_replicate x dp_shard: who sees different data) and `dp_shard_cp`
(dp_shard x cp: over what FSDP shards, since cp ranks hold the same parameters and each computes
gradients from its part of the sequences) and `loss` (dp x cp: every rank whose loss tokens differ).
Under hybrid context parallel, cp is further split into (cp_ring, cp_ulysses). Expert parallel (`ep`)
adds no axis of processes: it splits dp_shard_cp into (expert_fsdp, ep), the ranks that shard the same
experts and those that hold different experts (see parallel/ep.py). tp is innermost so that its ranks are neighbours
(one node, fastest links); dp_replicate is outer so that HSDP replicates across nodes.
"""

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshtron.errors import UserError
from meshtron.parallel import cp as context_parallel

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def gpu_index(local_rank: int, device_count: int) -> int:
    """The GPU of the process with this local rank among the GPUs it sees.

    A launcher may show every process all of the node's GPUs (then it takes the one of its local
    rank) or only its own (CUDA_VISIBLE_DEVICES set per process, as Slurm's --gpus-per-task does:
    then each process sees one GPU, index 0, whatever its local rank).
    """
    return local_rank % device_count


def local_device() -> torch.device:
    """This process's device, made current: its GPU (see gpu_index), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    device = torch.device("cuda", gpu_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def device_binding(device: torch.device) -> dict:
    """init_process_group's device_id for a GPU: the group binds to it (NCCL connects eagerly on it,
    not on whatever device is current when the first collective runs)."""
    return {"device_id": device} if device.type == "cuda" else {}


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    pp: int = 1
    cp: int = 1
    cp_ulysses: int = 1  # the Ulysses degree inside cp (1: ring only; cp: Ulysses only)
    ep: int = 1

    @classmethod
    def resolve(cls, *, dp_replicate: int, dp_shard: int, tp: int, world_size: int, pp: int = 1, cp: int = 1,
                ep: int = 1, cp_algo: str = "ring", cp_ulysses: int = 0) -> "ParallelDims":
        """Fill in dp_shard = -1 from the world size and check that the degrees multiply to it."""
        for name, value in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
            if value < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {value}")
        others = dp_replicate * tp * pp * cp
        if dp_shard == -1:
            if world_size % others:
                raise UserError(
                    f"world size {world_size} is not divisible by dp_replicate x tp x pp x cp = {others}; "
                    f"launch a multiple of {others} processes or change the degrees"
                )
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise UserError(f"parallel.dp_shard must be >= 1 or -1 (the rest of the world), got {dp_shard}")
        if others * dp_shard != world_size:
            raise UserError(
                f"parallel degrees pp={pp} x dp_replicate={dp_replicate} x dp_shard={dp_shard} x cp={cp} x tp={tp} = "
                f"{others * dp_shard} do not match the world size {world_size}; change them so that their "
                "product is the number of processes (or set dp_shard = -1)"
            )
        if (dp_shard * cp) % ep:
            raise UserError(f"parallel.ep = {ep} does not divide dp_shard x cp = {dp_shard} x {cp}: expert parallel "
                            "borrows data-parallel ranks, so choose an ep that divides dp_shard x cp")
        ulysses = context_parallel.ulysses_degree(cp, cp_algo, cp_ulysses) if cp > 1 else 1
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, world_size=world_size, pp=pp, cp=cp,
                   cp_ulysses=ulysses, ep=ep)

    @property
    def dp_size(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def loss_ranks(self) -> int:
        """Ranks whose loss tokens differ (data parallel x context parallel): FSDP averages gradients
        over them."""
        return self.dp_size * self.cp

    @property
    def fsdp_enabled(self) -> bool:
        """Whether parameters are wrapped with fully_shard (FSDP, HSDP, or DDP as HSDP with shard 1)."""
        return self.loss_ranks > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def ep_enabled(self) -> bool:
        return self.ep > 1

    def check_experts(self, num_experts: int) -> None:
        """Expert parallel splits each MoE layer's experts evenly."""
        if self.ep_enabled and num_experts % self.ep:
            raise UserError(f"the model's num_experts ({num_experts}) is not divisible by parallel.ep = {self.ep}; "
                            "choose an ep that divides the number of experts")

    def check_model(self, num_heads: int, num_kv_heads: int, ffn_dim: int, vocab_size: int, seq_length: int | None,
                    sequence_parallel: bool) -> None:
        """Tensor parallel splits heads, MLP columns, the vocabulary and (with SP) the sequence; context
        parallel the sequence (and, with Ulysses, the heads). `seq_length` None: the rows have no set
        length (grpo, ppo; no context parallel), and sequence parallel takes any."""
        if self.cp > 1:
            context_parallel.check_model(self.cp, self.cp_ulysses, num_heads // self.tp, seq_length)
            seq_length //= self.cp
        if not self.tp_enabled:
            return
        for what, n in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("ffn_dim", ffn_dim),
                        ("vocab_size", vocab_size)):
            if n % self.tp:
                raise UserError(f"the model's {what} ({n}) is not divisible by parallel.tp = {self.tp}; choose a tp "
                                f"that divides {what}")
        if sequence_parallel and seq_length is not None and seq_length % self.tp:
            what = f"train.seq_length / parallel.cp ({seq_length})" if self.cp > 1 else f"train.seq_length ({seq_length})"
            raise UserError(f"{what} is not divisible by parallel.tp = {self.tp}, which sequence parallel needs; "
                            "change one of them")

    def build_mesh(self, device_type: str) -> "Meshes":
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        world = init_device_mesh(device_type, shape, mesh_dim_names=AXES)
        dp = world["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="dp")
        dp_shard_cp = world["dp_shard", "cp"]._flatten(mesh_dim_name="dp_shard_cp")
        loss = world["dp_replicate", "dp_shard", "cp"]._flatten(mesh_dim_name="loss")
        fsdp = world["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else dp_shard_cp
        cp_ring = cp_ulysses = None
        if self.cp_ulysses == 1:
            cp_ring = world["cp"]
        elif self.cp_ulysses == self.cp:
            cp_ulysses = world["cp"]
        else:  # hybrid: Ulysses over neighbouring cp ranks, the ring across them
            split = world._unflatten("cp", (self.cp // self.cp_ulysses, self.cp_ulysses), ("cp_ring", "cp_ulysses"))
            cp_ring, cp_ulysses = split["cp_ring"], split["cp_ulysses"]
        meshes = Meshes(world=world, dp=dp, fsdp=fsdp, tp=world["tp"], pp=world["pp"], cp=world["cp"], loss=loss,
                        cp_ring=cp_ring, cp_ulysses=cp_ulysses)
        if not self.ep_enabled:
            return meshes
        experts = dp_shard_cp._unflatten(0, (self.dp_shard * self.cp // self.ep, self.ep), ("expert_fsdp", "ep"))
        expert_fsdp = experts["expert_fsdp"]
        if self.dp_replicate > 1:
            expert_fsdp = DeviceMesh._concatenate([world["dp_replicate"], expert_fsdp])
        return dataclasses.replace(meshes, ep=experts["ep"], expert_fsdp=expert_fsdp)


@dataclass(frozen=True)
class Meshes:
    """The one mesh (`world`, axes named as AXES) and the views the parallel steps use.

    Flattened views are kept here because torch asks callers to hold them rather than slice
    them again from the root.
    """

    world: DeviceMesh
    dp: DeviceMesh  # dp_replicate x dp_shard, flattened: ranks that see different data
    fsdp: DeviceMesh  # what fully_shard shards over: 1-D (FSDP) or 2-D (HSDP, replicate x shard)
    tp: DeviceMesh
    pp: DeviceMesh
    cp: DeviceMesh
    loss: DeviceMesh  # dp x cp, flattened: ranks whose loss tokens differ
    cp_ring: DeviceMesh | None  # the ring of context parallel (None: no ring)
    cp_ulysses: DeviceMesh | None  # its Ulysses groups (None: no Ulysses)
    # With expert parallel (else None): the ranks holding different experts, and what fully_shard shards
    # the experts over (the data-parallel ranks holding the same ones, 1-D or 2-D like `fsdp`).
    ep: DeviceMesh | None = None
    expert_fsdp: DeviceMesh | None = None
