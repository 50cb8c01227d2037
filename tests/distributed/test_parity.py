"""Loss parity: every parallel layout trains like one process on the same data and init.
(FSDP, DDP, HSDP, TP with and without sequence parallel, FSDP x TP, gradient accumulation on one
process and under FSDP and DDP.)

Tiny llama:debug model, mock data with packed documents and a varying number of loss tokens
per sample, 5 AdamW steps in float32 at a high lr (so that differences would grow). Tolerance:
the per-step losses agree to 2e-5 relative; layouts differ only in the order of float32
reductions (observed differences are around 1e-7).
"""

import pytest

RTOL = 2e-5


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


def grad_norms(records: list[dict]) -> list[float]:
    return [r["grad_norm"] for r in records]


@pytest.fixture(scope="module")
def reference(run_train, tiny_config, tmp_path_factory):
    """One process, the whole global batch (4 sequences) in one micro-batch."""
    _, records = run_train(tiny_config, tmp_path_factory.mktemp("ref"), overrides=["--train.micro_batch_size", "4"])
    assert len(records) == 5
    return records


@pytest.mark.parametrize(
    "nproc, layout",
    [
        (2, ["--parallel.dp_shard", "2"]),
        (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]),
        (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]),
        (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1", "--parallel.sequence_parallel", "false"]),
        (4, ["--parallel.dp_shard", "2", "--parallel.tp", "2"]),
        (4, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "2", "--train.micro_batch_size", "1"]),
        # Two accumulated micro-batches: reduce-scattered after each (FSDP), all-reduced after the last (DDP).
        (2, ["--parallel.dp_shard", "2", "--train.micro_batch_size", "1"]),
        (2, ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1", "--train.micro_batch_size", "1"]),
    ],
    ids=["fsdp2", "ddp2", "tp2-sp", "tp2-no-sp", "fsdp2xtp2", "hsdp2x2", "fsdp2-accum2", "ddp2-accum2"],
)
def test_parallel_layout_matches_single_process(run_train, reference, tiny_config, tmp_path, nproc, layout):
    _, records = run_train(tiny_config, tmp_path, nproc=nproc, overrides=layout)
    assert losses(records) == pytest.approx(losses(reference), rel=RTOL)
    # Clipping uses the norm over all shards: it must be the one-process norm.
    assert grad_norms(records) == pytest.approx(grad_norms(reference), rel=1e-4)


def test_gradient_accumulation_matches_one_big_micro_batch(run_train, reference, tiny_config, tmp_path):
    # micro_batch_size 2 with global_batch_size 4 on one process: two accumulated micro-batches.
    _, records = run_train(tiny_config, tmp_path)
    assert losses(records) == pytest.approx(losses(reference), rel=RTOL)
    assert grad_norms(records) == pytest.approx(grad_norms(reference), rel=1e-4)


def test_the_loss_falls(reference):
    # Guards the parity tests against comparing runs that do not train at all.
    assert losses(reference)[-1] < losses(reference)[0] - 0.05
