"""Tensor-parallel parity of the model types issues 14 and 15 add: each family's debug flavor trains at
tp=2 (with sequence parallel; OLMo 2, whose plan differs without it, also with it off) exactly like
one process; an MoE family (its experts split over the tp ranks, mixtral with its load-balancing loss)
also at dp_shard=2, and at pp=2 with the load-balancing loss, the router z-loss, the sequence-wise
balance loss and auxiliary-loss-free balancing on, whose terms span the layers of both stages; DeepSeek-V3
at ep=2 also with op and full recompute (its blocks' all-to-alls run again in backward). (gemma2
and phi3 also run pp=2 and dp_shard=2 in test_families.py.)

Two steps: step 1's loss and gradient norm are compared, and step 2 runs on the weights those
gradients updated, so a wrong tp=2 gradient shows in step 2's loss. (Later steps under AdamW grow the
float32 rounding differences of the tp=2 matmuls past these tolerances; see test_pipeline.py.)"""

import pytest

RTOL = 2e-5  # as in test_parity.py: layouts differ only in the order of float32 reductions
STEPS = ["--train.steps", "2"]
TP2 = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]
EP2 = ["--parallel.dp_shard", "2", "--parallel.ep", "2"]
EP_MTP = ["--train.micro_batch_size", "1", "--model.mtp_loss_weight", "0.3",
          "--model.args", "{num_mtp_layers = 1, seq_aux_loss_coef = 0.01}"]
CASES = {
    "gemma3": ("gemma3:debug", TP2),
    "glm4": ("glm4:debug", TP2),
    "smollm3": ("smollm3:debug", TP2),
    "olmo2": ("olmo2:debug", TP2),
    "olmo2-nosp": ("olmo2:debug", [*TP2, "--parallel.sequence_parallel", "false"]),
    "granite": ("granite:debug", TP2),
    "starcoder2": ("starcoder2:debug", TP2),
    "internlm3": ("internlm3:debug", TP2),
    "mixtral": ("mixtral:debug", TP2),
    # One sequence per forward: the load-balancing loss is per forward, and ranks take every other
    # sequence, so only then does dp_shard=2 run the same forwards as one process.
    "mixtral-fsdp": ("mixtral:debug", ["--parallel.dp_shard", "2"], ["--train.micro_batch_size", "1"]),
    # Experts split over 2 ranks, each MoE block recomputed op by op (the experts, an FSDP unit inside it,
    # gather again in backward).
    "mixtral-ep-recompute-op": ("mixtral:debug", [*EP2, "--recompute.mode", "op"], ["--train.micro_batch_size", "1"]),
    "qwen2_moe-nosp": ("qwen2_moe:debug", [*TP2, "--parallel.sequence_parallel", "false"]),
    "qwen3_moe": ("qwen3_moe:debug", TP2),
    "mixtral-pp": ("mixtral:debug", ["--parallel.pp", "2"],
                   ["--model.args", "{z_loss_coef = 0.01, seq_aux_loss_coef = 0.01, bias_update_rate = 0.05}"]),
    # Latent attention split by heads (its shared rotary key's gradient summed over the ranks).
    "deepseek_v3": ("deepseek_v3:debug", TP2),
    "deepseek_v2-nosp": ("deepseek_v2:debug", [*TP2, "--parallel.sequence_parallel", "false"]),
    "deepseek_v3-pp": ("deepseek_v3:debug", ["--parallel.pp", "2"]),
    "deepseek_v3-fsdp": ("deepseek_v3:debug", ["--parallel.dp_shard", "2"]),
    # Experts split over 2 ranks with multi-token prediction and the sequence-wise balance loss in the loss.
    "deepseek_v3-ep-mtp": ("deepseek_v3:debug", EP2, EP_MTP),
    # The same with each block recomputed in backward (its all-to-alls run again); the one-process run
    # recomputes nothing. op: the matmuls' and grouped GEMMs' outputs kept, the rest run again.
    "deepseek_v3-ep-mtp-recompute-op": ("deepseek_v3:debug", [*EP2, "--recompute.mode", "op"], EP_MTP),
    "deepseek_v3-ep-mtp-recompute-full": ("deepseek_v3:debug", [*EP2, "--recompute.mode", "full"], EP_MTP),
}
SLOW = {"deepseek_v3-ep-mtp-recompute-full"}


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def single_process(run_train, tiny_config, tmp_path_factory):
    """`single_process(flavor, overrides)`: the one-process records of a flavor, run once per module."""
    cache = {}

    def records(flavor: str, overrides: tuple[str, ...] = ()) -> list[dict]:
        if (flavor, overrides) not in cache:
            _, cache[flavor, overrides] = run_train(tiny_config, tmp_path_factory.mktemp("one"),
                                                    overrides=["--model.name_or_path", flavor, *STEPS, *overrides])
        return cache[flavor, overrides]

    return records


def saved_chunk_shapes(step_dir, suffix: str) -> list[tuple[int, ...]]:
    """The shapes of the pieces a checkpoint stores of its tensors named ...`suffix` (one per distinct piece)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata
    return sorted({tuple(chunk.sizes) for name, meta in metadata.items() if name.endswith(suffix)
                   for chunk in meta.chunks})


@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SLOW else case
                                  for case in CASES])
def test_tp2_matches_single_process(run_train, single_process, tiny_config, tmp_path, case):
    flavor, layout, *both = CASES[case]  # both: overrides of the one-process run too
    common = tuple(both[0]) if both else ()
    expected = single_process(flavor, common)
    save = ["--checkpoint.save_final", "true"] if case == "mixtral" else []
    _, records = run_train(tiny_config, tmp_path, nproc=2,
                           overrides=["--model.name_or_path", flavor, *STEPS, *common, *layout, *save])
    if save:  # without ep, each tp rank holds half of every expert: (E, I / 2, D) and (E, D, I / 2)
        step = tmp_path / "checkpoints" / "step-2"
        assert saved_chunk_shapes(step, "experts.gate_proj") == [(4, 48, 64)]
        assert saved_chunk_shapes(step, "experts.down_proj") == [(4, 64, 48)]
    assert len(records) == len(expected) == 2
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
    # MoE: the router metrics, over all layers. (Data-parallel ranks route other forwards' tokens.)
    same_forwards = dict(zip(layout[::2], layout[1::2])).get("--parallel.dp_shard", "1") == "1"
    for key in ("moe_aux_loss", "moe_z_loss", "moe_seq_aux_loss", "moe_load_max"):
        if key in expected[0] and same_forwards:
            assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], rel=1e-4), key


def test_mtp_loss_is_refused_under_pp(run_train, tiny_config, tmp_path):
    result, _ = run_train(tiny_config, tmp_path, nproc=2, check=False, overrides=[
        "--model.name_or_path", "deepseek_v3:debug", "--model.args", "{num_mtp_layers = 1}",
        "--model.mtp_loss_weight", "0.3", *STEPS, "--parallel.pp", "2"])
    assert result.returncode != 0
    assert "multi-token prediction does not run with parallel.pp > 1 yet" in result.stderr
