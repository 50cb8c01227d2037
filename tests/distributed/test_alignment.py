"""Alignment recipes on the Trainer with a tiny model and the real SmolLM2 tokenizer: DPO loss
parity across layouts (single process vs dp_shard=2 and tp=2), SimPO and PRM runs with their
metrics in metrics.jsonl."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RTOL = 2e-5

CONFIG = """
[model]
name_or_path = "llama:debug"
args = {{vocab_size = 49152}}
tokenizer = "{tokenizer}"
[data]
paths = ["{data}"]
[train]
recipe = "{recipe}"
steps = 4
global_batch_size = 4
micro_batch_size = 2
seq_length = 64
[optim]
lr = 0.003
[lr]
schedule = "constant"
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""


def write_config(tmp_path, smollm2_dir, recipe, data, extra=""):
    path = tmp_path / f"{recipe}.toml"
    path.write_text(CONFIG.format(tokenizer=smollm2_dir, data=REPO / "data" / data, recipe=recipe) + extra)
    return path


@pytest.fixture(scope="module")
def dpo_config(smollm2_dir, tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("dpo"), smollm2_dir, "dpo", "preferences.jsonl")


@pytest.fixture(scope="module")
def dpo_single(run_train, dpo_config, tmp_path_factory):
    _, records = run_train(dpo_config, tmp_path_factory.mktemp("dpo-single"))
    return records


def test_dpo_logs_preference_metrics(dpo_single):
    assert len(dpo_single) == 4
    first = dpo_single[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
                "logps/rejected"):
        assert key in first
    # The policy starts as its reference: zero rewards and the loss log(2).
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert dpo_single[-1]["rewards/margin"] > 0


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.dp_shard", "2"]),
                                           (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"])],
                         ids=["fsdp2", "tp2-sp"])
def test_dpo_layouts_match_single_process(run_train, dpo_config, dpo_single, tmp_path, nproc, layout):
    _, records = run_train(dpo_config, tmp_path, nproc=nproc, overrides=layout)
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in dpo_single], rel=RTOL)
    # The margin is beta x a difference of sequence log-probs near -600: float32 sums of that size
    # carry about 1e-5 of reduction-order noise.
    assert [r["rewards/margin"] for r in records] == pytest.approx([r["rewards/margin"] for r in dpo_single],
                                                                   abs=5e-5)


def test_simpo_and_prm_run(run_train, smollm2_dir, tmp_path):
    simpo = write_config(tmp_path, smollm2_dir, "simpo", "preferences.jsonl", "[align]\nbeta = 2.0\n")
    _, records = run_train(simpo, tmp_path / "simpo")
    assert len(records) == 4 and "rewards/accuracy" in records[-1]
    prm = write_config(tmp_path, smollm2_dir, "prm", "prm.jsonl").read_text()
    prm = prm.replace("[train]", f'eval_paths = ["{REPO / "data" / "prm_heldout.jsonl"}"]\n[train]')
    (tmp_path / "prm.toml").write_text(prm)
    _, records = run_train(tmp_path / "prm.toml", tmp_path / "prm")
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert all("accuracy" in r for r in records if "loss" in r)
