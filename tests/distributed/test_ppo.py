"""The ppo recipe on the Trainer with a tiny model and the real SmolLM2 tokenizer: the critic's and the
rollout's metrics in metrics.jsonl, the same run at dp_shard=2 and at tp=2 (the policy, its reference
and the critic tensor-parallel, the rollout generated tensor-parallel) equal to one process, and a
resumed run equal to the uninterrupted one."""

import pytest

RTOL = 2e-5

RL = """
[rl]
prompts_per_step = 2
group_size = 2
max_new_tokens = 6
kl_coef = 0.05
updates_per_rollout = 2
gamma = 1.0
lam = 0.95
value_clip = 0.2
critic_lr = 0.01
rewards = {math = 1.0, "tiny_rewards:letters" = 1.0}
"""


@pytest.fixture(scope="module")
def ppo_setup(recipe_config, reward_module_env, tmp_path_factory):
    config = recipe_config(tmp_path_factory.mktemp("ppo") / "ppo.toml", "ppo", "arithmetic_prompts.jsonl",
                           train="global_batch_size = 4\nmicro_batch_size = 2", lr=0.01, sections=RL)
    return config, reward_module_env


@pytest.fixture(scope="module")
def ppo_single(run_train, ppo_setup, tmp_path_factory):
    config, env = ppo_setup
    _, records = run_train(config, tmp_path_factory.mktemp("ppo-single"), env=env)
    return [r for r in records if "loss" in r]


def test_ppo_logs_critic_and_rollout_metrics(ppo_single):
    assert [r["step"] for r in ppo_single] == [1, 2, 3, 4]
    rollouts = [r for r in ppo_single if "reward" in r]
    assert [r["step"] for r in rollouts] == [1, 3]  # updates_per_rollout = 2
    for r in rollouts:
        for key in ("reward_std", "reward/tiny_rewards:letters", "completion_length", "value_clip_fraction"):
            assert key in r
        assert r["value_loss"] > 0 and r["explained_variance"] <= 1
    # The policy starts as its reference: no KL in the first rollout's rewards, some after two updates.
    assert rollouts[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rollouts[1]["kl"] > 0
    # A fresh value head predicts 0: the first rollout's values explain none of its returns' variance.
    assert rollouts[0]["explained_variance"] == pytest.approx(0.0, abs=1e-9) != rollouts[1]["explained_variance"]
    assert all(r["loss"] != 0 and "clip_fraction" in r for r in ppo_single)


@pytest.mark.parametrize("layout", [["--parallel.dp_shard", "2"], ["--parallel.tp", "2"]], ids=["fsdp2", "tp2"])
def test_ppo_parallel_layouts_match_single_process(run_train, ppo_setup, ppo_single, tmp_path, layout):
    config, env = ppo_setup
    _, records = run_train(config, tmp_path, nproc=2, overrides=layout, env=env)
    records = [r for r in records if "loss" in r]
    # abs: a rollout's first update has ratio 1 and whitened advantages, a loss of 0 up to float32 rounding.
    for key in ("loss", "value_loss", "explained_variance", "kl"):
        assert [r.get(key) for r in records] == pytest.approx([r.get(key) for r in ppo_single], rel=RTOL, abs=1e-5)
    # The norm over shards sums in another float32 order than one process: 1e-4 as in test_parity.
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in ppo_single], rel=1e-4)
    # The same completions: rewards equal up to the float32 order of summing them over ranks.
    assert [r.get("reward") for r in records] == pytest.approx([r.get("reward") for r in ppo_single], rel=1e-6)


def test_ppo_resume_repeats_the_uninterrupted_run(run_train, ppo_setup, ppo_single, tmp_path):
    """The critic and its optimizer are in the checkpoint: the resumed run's losses and values are
    the uninterrupted run's."""
    config, env = ppo_setup
    run_train(config, tmp_path, overrides=["--train.steps", "2", "--checkpoint.save_final", "true"], env=env)
    _, records = run_train(config, tmp_path, env=env)
    records = [r for r in records if "loss" in r and r["step"] > 2]  # the resumed part
    assert [r["step"] for r in records] == [3, 4]
    for key in ("loss", "grad_norm", "value_loss", "explained_variance", "kl"):
        assert [r.get(key) for r in records] == pytest.approx([r.get(key) for r in ppo_single[2:]], rel=RTOL,
                                                              abs=1e-5)


def test_ppo_critic_starts_from_an_rm_run(run_train, ppo_setup, tiny_rm_run, tmp_path):
    """rl.critic = an rm run: the critic is that run's model and trained score head. With a learning rate
    far too small to move a weight, the critic the ppo run saves is the rm run's, tensor for tensor."""
    import torch

    from meshtron.checkpoint.manager import ModelState, resolve_checkpoint
    from meshtron.checkpoint.reader import load_checkpoint
    from meshtron.infer.loading import load_for_generation

    config, env = ppo_setup
    _, rm_run, _ = tiny_rm_run
    run_train(config, tmp_path, env=env, overrides=["--rl.critic", str(rm_run), "--rl.critic_lr", "1e-20",
                                                    "--train.steps", "1", "--checkpoint.save_final", "true"])
    rm = load_for_generation(str(rm_run), dtype="float32").model
    critic = load_for_generation(str(rm_run), dtype="float32").model
    for p in critic.parameters():
        p.data.zero_()
    load_checkpoint({"critic": ModelState(critic)}, resolve_checkpoint(tmp_path), no_dist=True)
    expected = rm.state_dict()
    assert expected["lm_head.weight"].shape[0] == 1  # the score head
    for name, value in critic.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
