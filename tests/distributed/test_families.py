"""Layout parity on the families beyond the dense llama shape: gemma2's debug flavor (sandwich
norms, (1 + w) norms, GeGLU, soft-capped scores and logits, a window on one layer) trains at
tp=2 (with sequence parallel), pp=2 and dp_shard=2 exactly like one process."""

import pytest

RTOL = 2e-5  # as in test_parity.py: layouts differ only in the order of float32 reductions
GEMMA2 = ["--model.name_or_path", "gemma2:debug"]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def gemma2_reference(run_train, tiny_config, tmp_path_factory):
    _, records = run_train(tiny_config, tmp_path_factory.mktemp("gemma2"), overrides=GEMMA2)
    assert losses(records)[-1] < losses(records)[0] - 0.01  # it trains (slowly: the final logits are soft-capped)
    return records


@pytest.mark.parametrize("layout", [["--parallel.tp", "2", "--parallel.dp_shard", "1"],
                                    ["--parallel.pp", "2", "--parallel.dp_shard", "1"],
                                    ["--parallel.dp_shard", "2"]],
                         ids=["tp2-sp", "pp2", "fsdp2"])
def test_gemma2_layouts_match_single_process(run_train, gemma2_reference, tiny_config, tmp_path, layout):
    _, records = run_train(tiny_config, tmp_path, nproc=2, overrides=GEMMA2 + layout)
    assert losses(records) == pytest.approx(losses(gemma2_reference), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in gemma2_reference], rel=1e-4)
