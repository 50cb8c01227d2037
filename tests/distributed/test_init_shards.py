"""Initialization shard by shard (models/common/init.py): every rank draws only the blocks of its
shards, and the values are those of the whole single-device tensor at every layout.

Run as a script under torchrun (4 gloo ranks, a 2 x 2 mesh), it checks the block drawing directly
on small blocks for every kind of placement a parameter takes (FSDP, TP column and row, FSDP x TP's
strided shards, HSDP), with shapes that do not divide evenly.
"""

import os
import re
import subprocess
import sys

import pytest

WIDE = "{dim = 512, ffn_dim = 1024, vocab_size = 1024, num_layers = 1, num_heads = 4, num_kv_heads = 4, head_dim = 128}"


def drawn(stderr: str) -> dict[int, int]:
    """Rank -> random values it drew, from the build's log lines."""
    return {int(rank): int(n) for rank, n in re.findall(r"rank (\d+) drew (\d+) initial values", stderr)}


def test_blocks_drawn_on_shards_equal_the_whole_tensor():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", __file__]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("equal") == 4 * 18, result.stdout[-2000:]


def test_each_fsdp_rank_draws_half_of_a_wide_model_and_starts_from_the_same_weights(run_train, tiny_config,
                                                                                   tmp_path):
    """A model wide enough to span several blocks per tensor: at dp_shard=2 each rank draws exactly half
    of what one process draws (shards of whole 256-row blocks), and the first loss is one process's."""
    wide = ["--model.args", WIDE, "--train.steps", "1"]
    single, one = run_train(tiny_config, tmp_path / "one", overrides=wide)
    sharded, two = run_train(tiny_config, tmp_path / "fsdp", nproc=2, overrides=[*wide, "--parallel.dp_shard", "2"])
    whole = drawn(single.stderr)[0]
    assert whole > 2_500_000  # embedding, head and the layer's projections; the norms are filled, not drawn
    assert drawn(sharded.stderr) == {0: whole // 2, 1: whole // 2}
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)


def _check_placements() -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from meshtron.models.common.init import draw_

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    placements = [(Shard(0), Shard(1)), (Replicate(), Shard(0)), (_StridedShard(0, split_factor=2), Shard(0)),
                  (Shard(1), Replicate()), (Shard(0), Shard(0))]
    fill = lambda block, generator: block.normal_(0.0, 1.0, generator=generator)  # noqa: E731
    # (shape, block): uneven splits, blocks that straddle shards, stacked experts, a 1-D tensor
    for shape, tile in [((7, 9), (2, 4)), ((16, 12), (3, 5)), ((3, 8, 6), (1, 2, 4)), ((11,), (3,))]:
        whole = torch.empty(shape)
        draw_(whole, 5, fill, tile)
        for placement in placements:
            if any(getattr(p, "dim", 0) >= len(shape) for p in placement):
                continue
            sharded = distribute_tensor(torch.zeros(shape), mesh, placement, src_data_rank=None)
            n = draw_(sharded, 5, fill, tile)
            assert torch.equal(sharded.full_tensor(), whole), (shape, placement)
            assert n < whole.numel() or placement[1] == Replicate(), (shape, placement, n)
            print("equal", shape, placement, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    _check_placements()
