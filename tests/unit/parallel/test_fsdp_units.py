"""FSDP units: each block, the embedding, and the final norm with the head (kept gathered from forward to
backward), as torchtitan shards them; a head tied to the embedding stays with it in the root unit. Built on
a one-rank gloo group (the sharded runs' losses are compared in tests/distributed/test_parity.py)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from meshtron.models.registry import build_model, get_family, get_flavor
from meshtron.parallel.dims import ParallelDims
from meshtron.parallel.fsdp import apply_fsdp


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_head_are_units_of_their_own_unless_tied(tied):
    args = dataclasses.replace(get_flavor("llama:debug"), tie_embeddings=tied)
    model = build_model(args, device="meta")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        meshes = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, world_size=1).build_mesh("cpu")
        apply_fsdp(model, get_family(args.family).plan, meshes, torch.float32, torch.float32)
    finally:
        dist.destroy_process_group()
    units = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    blocks = {f"layers.{i}" for i in range(args.num_layers)}
    assert units == ({""} | blocks if tied else {"", "embed", "norm", "lm_head"} | blocks)
    if not tied:  # one unit of two modules, not resharded after forward
        state = model.norm._get_fsdp_state()
        assert state is model.lm_head._get_fsdp_state()
        assert state._fsdp_param_group.post_forward_mesh_info is None
        assert model.embed._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
