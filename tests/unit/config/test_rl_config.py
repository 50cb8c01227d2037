"""The [rl] section: defaults, and one clear line per mistake."""

import pytest

from meshtron.config import load_config
from meshtron.errors import UserError

GRPO = ["--train.recipe", "grpo", "--data.paths", "prompts.jsonl", "--train.global_batch_size", "16"]


def test_defaults_load():
    cfg = load_config(None, GRPO)
    assert (cfg.rl.prompts_per_step, cfg.rl.group_size, cfg.rl.loss_type, cfg.rl.kl_estimator) == (4, 4, "dapo", "k3")
    assert cfg.rl.rewards == {"math": 1.0}


@pytest.mark.parametrize("overrides,message", [
    (["--train.global_batch_size", "8"], r"global_batch_size \(8\) must be rl.prompts_per_step x rl.group_size"),
    (["--rl.group_size", "1", "--rl.prompts_per_step", "16"], "group_size must be >= 2"),
    (["--rl.loss_type", "dapo2"], "rl.loss_type = 'dapo2' is not one of grpo, dapo, dr_grpo, bnpo; did you mean 'dapo'"),
    (["--rl.kl_estimator", "k4"], "rl.kl_estimator = 'k4' is not one of k1, k2, k3"),
    (["--rl.top_p", "0"], r"rl.top_p must be in \(0, 1\]"),
    (["--rl.clip_low", "1.5"], "rl.clip_low must be below 1"),
    (["--rl.kl_coef", "-0.1"], "rl.kl_coef must be >= 0"),
    (["--rl.rewards", "{}"], "rl.rewards is empty"),
    (["--rl.rewards", '{math = "high"}'], r"rl.rewards\['math'\] must be a number"),
    (["--data.paths", "", "--data.mock", "true"], "grpo recipe generates from prompts"),
])
def test_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, GRPO + overrides)


PPO = ["--train.recipe", "ppo", "--data.paths", "prompts.jsonl", "--train.global_batch_size", "4",
       "--rl.group_size", "1"]


def test_ppo_takes_groups_of_one():
    cfg = load_config(None, PPO)
    assert (cfg.rl.gamma, cfg.rl.lam, cfg.rl.value_clip, cfg.rl.critic_lr) == (1.0, 0.95, 0.2, 0.0)


@pytest.mark.parametrize("overrides,message", [
    (["--rl.lam", "1.5"], r"rl.gamma and rl.lam must be in \[0, 1\]"),
    (["--rl.value_clip", "0"], "rl.value_clip must be > 0"),
    (["--data.paths", "", "--data.mock", "true"], "ppo recipe generates from prompts"),
])
def test_ppo_mistakes_are_one_line_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, PPO + overrides)
