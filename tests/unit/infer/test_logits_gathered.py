"""`logits_gathered`: a tensor-parallel training model (the grpo / ppo rollout) returns whole logits only
inside it; outside, its logits stay vocabulary-sharded DTensors for the loss under loss_parallel. On a
one-rank gloo group (the two-rank rollouts are compared with one process in tests/distributed/test_rl.py)."""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from meshtron.infer.tp import logits_gathered
from meshtron.models.registry import build_model, get_family, get_flavor
from meshtron.parallel.tp import apply_tp


def test_logits_are_whole_inside_and_sharded_again_after():
    args = get_flavor("llama:debug")
    torch.manual_seed(0)
    model = build_model(args, device="cpu")
    reference = build_model(args, device="cpu")
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 5))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        apply_tp(model, get_family(args.family).plan, mesh, sequence_parallel=True)
        with torch.no_grad(), logits_gathered(model):
            inside = model(tokens)
        with torch.no_grad():
            after = model(tokens)
    finally:
        dist.destroy_process_group()
    assert not isinstance(inside, DTensor) and inside.shape == (2, 5, args.vocab_size)
    assert isinstance(after, DTensor) and after.placements == (Shard(2),)  # over the vocabulary
    with torch.no_grad():
        torch.testing.assert_close(inside, reference(tokens))
