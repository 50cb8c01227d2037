"""Alignment recipes on the Trainer with a tiny model and the real SmolLM2 tokenizer: DPO loss
parity across layouts (single process vs dp_shard=2 and tp=2), reward-model parity (dp_shard=2,
tp=2), DPO with precomputed reference
log-probs (equal to the frozen copy's, across a resume and dp_shard=2), SimPO and PRM runs with
their metrics in metrics.jsonl."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RTOL = 2e-5

@pytest.fixture(scope="module")
def dpo_config(recipe_config, tmp_path_factory):
    return recipe_config(tmp_path_factory.mktemp("dpo") / "dpo.toml", "dpo", "preferences.jsonl")


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


def assert_same_run(records, reference_records):
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference_records], rel=RTOL)
    # The margin is beta x a difference of sequence log-probs near -600: float32 sums of that size
    # carry about 1e-5 of reduction-order noise.
    assert [r["rewards/margin"] for r in records] == pytest.approx(
        [r["rewards/margin"] for r in reference_records], abs=5e-5)


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.dp_shard", "2"]),
                                           (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"]),
                                           (2, ["--parallel.cp", "2"])],
                         ids=["fsdp2", "tp2-sp", "cp2"])
def test_dpo_layouts_match_single_process(run_train, dpo_config, dpo_single, tmp_path, nproc, layout):
    """cp2: each rank holds half of every chosen and rejected sequence; their log-prob sums meet before the loss."""
    _, records = run_train(dpo_config, tmp_path, nproc=nproc, overrides=layout)
    assert_same_run(records, dpo_single)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in dpo_single], rel=1e-4)


PRECOMPUTED = ["--align.reference", "precomputed"]


def test_precomputed_reference_matches_frozen_copy_across_resume(run_train, dpo_config, dpo_single, tmp_path):
    """Stopped after step 2 and resumed: the second start recomputes the reference log-probs on a
    rebuilt starting model (the policy has moved by then)."""
    out = tmp_path / "run"
    run_train(dpo_config, out, overrides=[*PRECOMPUTED, "--train.steps", "2", "--checkpoint.save_final", "true"])
    process, records = run_train(dpo_config, out, overrides=PRECOMPUTED)
    assert "resuming from" in process.stderr and "precomputed" in process.stderr
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert_same_run(records, dpo_single)


def test_precomputed_reference_under_dp_shard(run_train, dpo_config, dpo_single, tmp_path):
    heldout = REPO / "data" / "preferences_heldout.jsonl"
    _, records = run_train(dpo_config, tmp_path, nproc=2, overrides=[
        *PRECOMPUTED, "--parallel.dp_shard", "2", "--data.eval_paths", f'["{heldout}"]', "--train.eval_interval", "4"])
    assert_same_run([r for r in records if "loss" in r], dpo_single)
    evals = [r for r in records if "eval_loss" in r]
    # Before the first step the policy is its reference: every held-out pair got its own values.
    assert evals[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert evals[0]["eval_rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert evals[-1]["step"] == 4 and evals[-1]["eval_rewards/margin"] != evals[0]["eval_rewards/margin"]


def test_precomputed_reference_needs_data_files(run_train, tiny_config, tmp_path):
    process, _ = run_train(tiny_config, tmp_path, check=False, overrides=[
        "--train.recipe", "dpo", *PRECOMPUTED, "--train.steps", "1"])
    assert process.returncode != 0
    assert "align.reference = 'precomputed' needs pairwise data files" in process.stderr.strip().splitlines()[-1]


def test_simpo_and_prm_run(run_train, recipe_config, tmp_path):
    simpo = recipe_config(tmp_path / "simpo.toml", "simpo", "preferences.jsonl", sections="[align]\nbeta = 2.0\n")
    _, records = run_train(simpo, tmp_path / "simpo")
    assert len(records) == 4 and "rewards/accuracy" in records[-1]
    prm = recipe_config(tmp_path / "prm.toml", "prm", "prm.jsonl", eval_paths=["prm_heldout.jsonl"])
    _, records = run_train(prm, tmp_path / "prm")
    evals = [r for r in records if "eval_loss" in r]
    assert evals and all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert all("accuracy" in r for r in records if "loss" in r)


def test_held_out_evaluation_covers_every_sample_at_any_micro_batch_size(run_train, recipe_config, tmp_path):
    """60 held-out solutions (one row of 96 tokens each): in micro-batches of 4 (15 of them) and of 8 (7, then one
    of 4; this used to leave the last 4 out) the held-out values are the same, and nothing is said."""
    prm = recipe_config(tmp_path / "prm.toml", "prm", "prm.jsonl", eval_paths=["prm_heldout.jsonl"],
                        train="global_batch_size = 8\nmicro_batch_size = 8\nseq_length = 96")
    evals = {}
    for mbs in (8, 4):
        process, records = run_train(prm, tmp_path / f"mbs{mbs}",
                                     overrides=["--train.steps", "1", "--train.micro_batch_size", str(mbs)])
        assert "held-out evaluation" not in process.stderr
        evals[mbs] = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals[8]] == [0, 1]
    for key in ("eval_loss", "eval_accuracy"):
        assert [r[key] for r in evals[8]] == pytest.approx([r[key] for r in evals[4]], rel=RTOL)


@pytest.mark.parametrize("recipe", ["simpo", "prm"])
def test_simpo_and_prm_under_context_parallel_match_single_process(run_train, recipe_config, tmp_path, recipe):
    """cp2: SimPO's length-normalized log-prob sums and PRM's per-step labels, each split over two ranks'
    halves of every sequence, give one process's losses and gradients."""
    if recipe == "simpo":
        config = recipe_config(tmp_path / "simpo.toml", "simpo", "preferences.jsonl", sections="[align]\nbeta = 2.0\n")
    else:
        config = recipe_config(tmp_path / "prm.toml", "prm", "prm.jsonl")
    _, single = run_train(config, tmp_path / "single")
    _, records = run_train(config, tmp_path / "cp2", nproc=2, overrides=["--parallel.cp", "2"])
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in single], rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)


def test_reward_model_trains_exports_and_scores(run_train, tiny_rm_run, smollm2_dir, tmp_path):
    import json
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config, run, single = tiny_rm_run
    train = [r for r in single if "loss" in r]
    # FSDP, tensor parallel with and without sequence parallel (the one-output score head is replicated),
    # and context parallel (the rank holding a sequence's last token gives its score).
    tp2 = ["--parallel.tp", "2", "--parallel.dp_shard", "1"]
    for name, layout in (("fsdp2", ["--parallel.dp_shard", "2"]), ("tp2-sp", tp2),
                         ("tp2", [*tp2, "--parallel.sequence_parallel", "false"]), ("cp2", ["--parallel.cp", "2"])):
        _, records = run_train(config, tmp_path / name, nproc=2, overrides=layout)
        assert [r["loss"] for r in records if "loss" in r] == pytest.approx([r["loss"] for r in train], rel=RTOL)
        assert [r["grad_norm"] for r in records if "loss" in r] == pytest.approx(
            [r["grad_norm"] for r in train], rel=1e-4)
        # Every layout's held-out pass covers each pair once (at dp_shard=2 its last partial round in
        # smaller micro-batches), so its values are the single process's.
        assert [r["eval_loss"] for r in records if "eval_loss" in r] == pytest.approx(
            [r["eval_loss"] for r in single if "eval_loss" in r], rel=RTOL)
        assert [r["eval_rewards/accuracy"] for r in records if "eval_loss" in r] == pytest.approx(
            [r["eval_rewards/accuracy"] for r in single if "eval_loss" in r], rel=RTOL)
    assert all("rewards/accuracy" in r for r in train)
    assert any("eval_rewards/accuracy" in r for r in single)

    hf_dir = tmp_path / "rm_hf"
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "meshtron", "convert", "--input", str(run), "--output",
                    str(hf_dir)], check=True, capture_output=True, env=env)
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "What is 2 + 2?", "response": "4"}) + "\n"
                         + json.dumps({"instruction": "Name a color.", "output": "Blue"}) + "\n")
    result = subprocess.run([sys.executable, "-m", "meshtron", "score", "--model", str(run), "--input",
                             str(responses)], check=True, capture_output=True, text=True, env=env)
    scored = [json.loads(line) for line in result.stdout.splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"},
                                         {"role": "assistant", "content": "4"}], return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0, 0].item()
    assert len(scored) == 2 and scored[0]["reward"] == pytest.approx(expected, abs=1e-4)
