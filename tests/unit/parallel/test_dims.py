"""ParallelDims: degrees resolved and checked once, with messages that say what to change."""

import pytest

from meshtron.errors import UserError
from meshtron.parallel import ParallelDims
from meshtron.parallel.dims import gpu_index


def test_dp_shard_takes_the_rest_of_the_world():
    dims = ParallelDims.resolve(dp_replicate=2, dp_shard=-1, tp=2, world_size=8)
    assert (dims.dp_shard, dims.dp_size, dims.fsdp_enabled, dims.tp_enabled) == (2, 4, True, True)
    single = ParallelDims.resolve(dp_replicate=1, dp_shard=-1, tp=1, world_size=1)
    assert not single.fsdp_enabled and not single.tp_enabled and not single.pp_enabled
    piped = ParallelDims.resolve(dp_replicate=1, dp_shard=-1, tp=2, world_size=8, pp=2)
    assert (piped.dp_shard, piped.dp_size, piped.pp_enabled) == (2, 2, True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dp_replicate=1, dp_shard=2, tp=2, world_size=2), "= 4 do not match the world size 2"),
        (dict(dp_replicate=1, dp_shard=-1, tp=3, world_size=4), "world size 4 is not divisible by dp_replicate x tp x pp x cp = 3"),
        (dict(dp_replicate=1, dp_shard=2, tp=1, world_size=2, pp=2), "pp=2 x dp_replicate=1 x dp_shard=2 x cp=1 x tp=1 = 4"),
        (dict(dp_replicate=1, dp_shard=2, tp=1, world_size=2, cp=2), "dp_shard=2 x cp=2 x tp=1 = 4 do not match"),
        (dict(dp_replicate=1, dp_shard=-1, tp=1, world_size=4, cp=4, cp_algo="hybrid"),
         "hybrid needs parallel.cp_ulysses strictly between 1 and cp = 4"),
        (dict(dp_replicate=1, dp_shard=-1, tp=1, world_size=6, cp=6, cp_algo="hybrid", cp_ulysses=4),
         "hybrid needs parallel.cp_ulysses strictly between 1 and cp = 6 and dividing it (got 4)"),
        (dict(dp_replicate=1, dp_shard=-1, tp=1, world_size=4, cp=4, cp_algo="ring", cp_ulysses=2),
         "parallel.cp_ulysses = 2 applies to cp_algo = hybrid only"),
        (dict(dp_replicate=0, dp_shard=-1, tp=1, world_size=2), "parallel.dp_replicate must be >= 1"),
        (dict(dp_replicate=1, dp_shard=-1, tp=2, world_size=4, ep=4), "parallel.ep = 4 does not divide dp_shard x cp = 2 x 1"),
        (dict(dp_replicate=1, dp_shard=-1, tp=1, world_size=2, ep=0), "parallel.ep must be >= 1"),
    ],
)
def test_impossible_layouts(kwargs, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelDims.resolve(**kwargs)


def test_ep_borrows_data_parallel_ranks():
    dims = ParallelDims.resolve(dp_replicate=1, dp_shard=-1, tp=1, world_size=2, ep=2)
    assert (dims.dp_shard, dims.dp_size, dims.ep, dims.ep_enabled, dims.world_size) == (2, 2, 2, True, 2)
    with_cp = ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=1, world_size=2, cp=2, ep=2)  # cp ranks too
    assert (with_cp.dp_size, with_cp.ep) == (1, 2)
    dims.check_experts(8)
    with pytest.raises(UserError, match=r"num_experts \(6\) is not divisible by parallel.ep = 4"):
        ParallelDims.resolve(dp_replicate=1, dp_shard=-1, tp=1, world_size=4, ep=4).check_experts(6)


def test_heads_not_divisible_by_tp():
    dims = ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=4, world_size=4)
    with pytest.raises(UserError, match=r"num_heads \(6\) is not divisible by parallel.tp = 4"):
        dims.check_model(num_heads=6, num_kv_heads=2, ffn_dim=64, vocab_size=128, seq_length=32, sequence_parallel=True)
    with pytest.raises(UserError, match=r"seq_length \(30\) is not divisible by parallel.tp = 4"):
        dims.check_model(num_heads=8, num_kv_heads=4, ffn_dim=64, vocab_size=128, seq_length=30, sequence_parallel=True)
    dims.check_model(num_heads=8, num_kv_heads=4, ffn_dim=64, vocab_size=128, seq_length=30, sequence_parallel=False)
    # Rows of no set length (grpo, ppo): sequence parallel shards each as it comes.
    dims.check_model(num_heads=8, num_kv_heads=4, ffn_dim=64, vocab_size=128, seq_length=None, sequence_parallel=True)


@pytest.mark.parametrize(
    "local_rank, device_count, index",
    [(0, 8, 0), (7, 8, 7),  # every process sees the node's 8 GPUs
     (0, 1, 0), (5, 1, 0),  # each process sees only its own GPU (CUDA_VISIBLE_DEVICES per process)
     (5, 4, 1)],  # 2 processes per GPU
)
def test_gpu_index_is_the_local_rank_among_the_gpus_the_process_sees(local_rank, device_count, index):
    assert gpu_index(local_rank, device_count) == index



def test_context_parallel_degrees():
    ring = ParallelDims.resolve(dp_replicate=1, dp_shard=-1, tp=1, world_size=8, cp=4)
    assert (ring.dp_shard, ring.cp_ulysses, ring.loss_ranks, ring.fsdp_enabled) == (2, 1, 8, True)
    assert ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=1, world_size=2, cp=2).fsdp_enabled
    hybrid = ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=1, world_size=8, cp=8, cp_algo="hybrid", cp_ulysses=2)
    assert hybrid.cp_ulysses == 2
    assert ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=1, world_size=4, cp=4, cp_algo="ulysses").cp_ulysses == 4


def test_context_parallel_needs_of_the_model():
    ulysses = ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=2, world_size=8, cp=4, cp_algo="ulysses")
    with pytest.raises(UserError, match=r"seq_length \(36\) is not divisible by 2 x parallel.cp = 8"):
        ulysses.check_model(num_heads=8, num_kv_heads=2, ffn_dim=64, vocab_size=128, seq_length=36, sequence_parallel=False)
    with pytest.raises(UserError, match=r"heads per tensor-parallel rank \(3\) are not divisible by the Ulysses degree 4"):
        ulysses.check_model(num_heads=6, num_kv_heads=2, ffn_dim=64, vocab_size=128, seq_length=32, sequence_parallel=False)
    ring = ParallelDims.resolve(dp_replicate=1, dp_shard=1, tp=4, world_size=8, cp=2)
    with pytest.raises(UserError, match=r"seq_length / parallel.cp \(6\) is not divisible by parallel.tp = 4"):
        ring.check_model(num_heads=8, num_kv_heads=4, ffn_dim=64, vocab_size=128, seq_length=12, sequence_parallel=True)
    # Fewer key/value heads than the Ulysses degree are repeated, not refused.
    ulysses.check_model(num_heads=8, num_kv_heads=2, ffn_dim=64, vocab_size=128, seq_length=32, sequence_parallel=True)
