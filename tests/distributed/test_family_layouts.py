"""Tensor-parallel parity of the model types issue 14 adds: each family's debug flavor trains at
tp=2 (with sequence parallel) exactly like one process. (gemma2 and phi3 also run pp=2 and
dp_shard=2 in test_families.py.)"""

import pytest

RTOL = 2e-5  # as in test_parity.py: layouts differ only in the order of float32 reductions
TP2 = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]
FLAVORS = ["gemma3:debug", "glm4:debug", "smollm3:debug"]


def losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_tp2_matches_single_process(run_train, tiny_config, tmp_path, flavor):
    overrides = ["--model.name_or_path", flavor]
    _, expected = run_train(tiny_config, tmp_path / "one", overrides=overrides)
    _, records = run_train(tiny_config, tmp_path / "tp2", nproc=2, overrides=overrides + TP2)
    assert losses(expected)[-1] < losses(expected)[0]  # it trains, so later steps test the gradients too
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)


# Two steps: step 1's gradients are compared exactly, and step 2 runs on the weights they updated. (Later
# steps under AdamW amplify the float32 rounding differences of the tp=2 matmuls; see test_pipeline.py.)
SHORT = ["--train.steps", "2"]
OWN_PLAN_CASES = {
    "olmo2": ("olmo2", TP2),
    "olmo2-nosp": ("olmo2", [*TP2, "--parallel.sequence_parallel", "false"]),  # its plan differs without SP
    "granite": ("granite", TP2),
    "starcoder2": ("starcoder2", TP2),
    "internlm3": ("internlm3", TP2),
}


@pytest.fixture(scope="module")
def two_steps_single_process(run_train, tiny_config, tmp_path_factory):
    """`two_steps_single_process(family)`: the one-process records of its debug flavor, run once per module."""
    cache = {}

    def records(family: str) -> list[dict]:
        if family not in cache:
            overrides = ["--model.name_or_path", f"{family}:debug", *SHORT]
            _, cache[family] = run_train(tiny_config, tmp_path_factory.mktemp(family), overrides=overrides)
        return cache[family]

    return records


@pytest.mark.parametrize("case", list(OWN_PLAN_CASES))
def test_tp2_two_steps_match_single_process(run_train, two_steps_single_process, tiny_config, tmp_path, case):
    family, layout = OWN_PLAN_CASES[case]
    expected = two_steps_single_process(family)
    _, records = run_train(tiny_config, tmp_path, nproc=2,
                           overrides=["--model.name_or_path", f"{family}:debug", *SHORT, *layout])
    assert len(records) == len(expected) == 2
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
