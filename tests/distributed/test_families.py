"""Layout parity on the families beyond the dense llama shape, the two that issue 14's "done when"
names: gemma2's debug flavor (sandwich norms, (1 + w) norms, GeGLU, soft-capped scores and logits, a
window on one layer) and phi3's (LongRoPE, a partial rotary) train at tp=2 (with sequence parallel),
pp=2 and dp_shard=2 exactly like one process."""

import pytest

RTOL = 2e-5  # as in test_parity.py: layouts differ only in the order of float32 reductions


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.fixture(scope="module", params=["gemma2:debug", "phi3:debug"])
def reference(request, run_train, tiny_config, tmp_path_factory):
    """(flavor overrides, the single-process records)."""
    overrides = ["--model.name_or_path", request.param]
    _, records = run_train(tiny_config, tmp_path_factory.mktemp("reference"), overrides=overrides)
    assert losses(records)[-1] < losses(records)[0] - 0.01  # it trains (gemma2 slowly: its logits are soft-capped)
    return overrides, records


@pytest.mark.parametrize("layout", [["--parallel.tp", "2", "--parallel.dp_shard", "1"],
                                    ["--parallel.pp", "2", "--parallel.dp_shard", "1"],
                                    ["--parallel.dp_shard", "2"]],
                         ids=["tp2-sp", "pp2", "fsdp2"])
def test_layouts_match_single_process(run_train, reference, tiny_config, tmp_path, layout):
    overrides, expected = reference
    _, records = run_train(tiny_config, tmp_path, nproc=2, overrides=overrides + layout)
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
