"""The grpo recipe on the Trainer with a tiny model and the real SmolLM2 tokenizer: its metrics in
metrics.jsonl, the same run at dp_shard=2 and dp_replicate=2 (the rollout gathered once under FSDP2:
no deadlock when ranks decode different numbers of steps), at tp=2 (the rollout generated tensor-parallel,
every rank sampling one process's completions) and at tp=2 x dp_shard=2 equal to one process, and a
resumed run equal to the uninterrupted one (the rollout's sampling included)."""

from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RTOL = 2e-5

RL = """
[rl]
prompts_per_step = 2
group_size = 4
max_new_tokens = 6
kl_coef = 0.05
updates_per_rollout = 2
rewards = {math = 1.0, "tiny_rewards:letters" = 1.0}
"""


@pytest.fixture(scope="module")
def grpo_setup(recipe_config, reward_module_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join((REPO / "data" / "arithmetic_heldout.jsonl").read_text().splitlines(True)[:6]))
    config = recipe_config(root / "grpo.toml", "grpo", "arithmetic_prompts.jsonl", eval_paths=[heldout],
                           train="global_batch_size = 8\nmicro_batch_size = 4", lr=0.01, sections=RL)
    return config, reward_module_env


@pytest.fixture(scope="module")
def grpo_single_run(run_train, grpo_setup, completions_log, tmp_path_factory):
    """(run directory, metrics records) of the one-process run, its completions logged."""
    config, env = grpo_setup
    output_dir = tmp_path_factory.mktemp("grpo-single")
    _, records = run_train(config, output_dir, env=completions_log.env(env, output_dir))
    return output_dir, records


@pytest.fixture(scope="module")
def grpo_single(grpo_single_run):
    return grpo_single_run[1]


def train_records(records):
    return [r for r in records if "loss" in r]


def test_grpo_logs_rollout_and_training_metrics(grpo_single):
    steps = train_records(grpo_single)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    rollouts = [r for r in steps if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 3]  # updates_per_rollout = 2
    for r in rollouts:
        for key in ("reward_std", "reward/math", "reward/tiny_rewards:letters", "completion_length",
                    "completion_length_max", "truncated_fraction", "entropy", "rollout_tokens_per_s"):
            assert key in r
        assert r["reward_std"] > 0 and 0 < r["completion_length"] <= r["completion_length_max"] <= 6
    # The policy starts as its reference: no KL before the first update, some after it.
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["kl"] > 0
    assert steps[1]["loss"] != 0 and all("clip_fraction" in r and r["train_tokens_per_s"] > 0 for r in steps)
    evals = [r for r in grpo_single if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 4] and "eval_reward/math" in evals[0]


def assert_same_run(records, reference):
    records, reference = train_records(records), train_records(reference)
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for key in ("loss", "kl"):
        assert [r[key] for r in records] == pytest.approx([r[key] for r in reference], rel=RTOL, abs=1e-7)
    # The norm sums squares shard by shard, then over ranks: another float32 order than one process's, and
    # FSDP's units (embedding, blocks, head) each reduce their gradients apart; 1e-4 as in test_parity.
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in reference], rel=1e-4)
    for key in ("reward", "completion_length"):
        assert [r.get(key) for r in records] == [r.get(key) for r in reference]


@pytest.mark.parametrize("layout", [["--parallel.dp_shard", "2"],
                                    ["--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"]], ids=["fsdp2", "ddp"])
def test_grpo_data_parallel_matches_single_process(run_train, grpo_setup, grpo_single, tmp_path, layout):
    config, env = grpo_setup
    _, records = run_train(config, tmp_path, nproc=2, overrides=layout, env=env)
    assert_same_run(records, grpo_single)


@pytest.mark.parametrize("layout", [
    pytest.param(["--parallel.tp", "2"], id="tp2"),
    pytest.param(["--parallel.tp", "2", "--parallel.dp_shard", "2"], id="tp2-fsdp2", marks=pytest.mark.slow)])
def test_grpo_tensor_parallel_matches_single_process(run_train, grpo_setup, grpo_single_run, completions_log,
                                                     tmp_path, layout):
    """The rollout generates tensor-parallel (sequence parallel on: its one-token decode steps leave a rank
    no token) on the training weights, at temperature 1: every rank of a tp group samples the same
    completions, and over the data-parallel ranks they are one process's; the log-probs of the losses
    run on vocabulary-sharded logits, and the run equals one process."""
    config, env = grpo_setup
    single_dir, single = grpo_single_run
    nproc = 4 if "--parallel.dp_shard" in layout else 2
    _, records = run_train(config, tmp_path, nproc=nproc, overrides=layout, env=completions_log.env(env, tmp_path))
    assert_same_run(records, single)
    sampled = [completions_log.read(tmp_path, rank) for rank in range(nproc)]
    for group in range(0, nproc, 2):  # tp is the innermost mesh axis: ranks 2k and 2k + 1 form a tp group
        assert sampled[group + 1] == sampled[group]
    expected = completions_log.read(single_dir, 0)
    # Each reward call's completions over the data-parallel ranks (a rollout's prompts, a held-out batch's).
    calls = [[c for group in range(0, nproc, 2) for c in sampled[group][call]] for call in range(len(expected))]
    assert len(sampled[0]) == len(expected) and len(expected) == 4  # 2 rollouts, held-out before and after
    assert [Counter(c) for c in calls] == [Counter(c) for c in expected]


def test_grpo_resume_repeats_the_uninterrupted_run(run_train, grpo_setup, grpo_single, tmp_path):
    config, env = grpo_setup
    run_train(config, tmp_path, overrides=["--train.steps", "2", "--checkpoint.save_final", "true"], env=env)
    _, records = run_train(config, tmp_path, overrides=["--log.plot", "true"], env=env)
    assert_same_run(records, grpo_single)
    assert (tmp_path / "loss.png").is_file() and (tmp_path / "reward.png").is_file()
