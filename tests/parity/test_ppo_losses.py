"""PPO's pieces on given rewards, values and log-probs against formulas written out here, one
completion and one token at a time (TRL 1.16 ships no PPO trainer to drive as an oracle): the
per-token rewards, GAE as the explicit discounted sum of TD errors, whitening and the clipped value
loss."""

import math

import pytest
import torch

from meshtron.align.rl import clipped_value_loss, gae, kl_estimate, masked_whiten, ppo_token_rewards

B, T = 3, 5
LENGTHS = [5, 3, 1]  # completions of different lengths, right-padded


def given(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
    return {"mask": mask,
            "values": torch.randn(B, T, generator=gen, dtype=torch.float64),
            "old_values": torch.randn(B, T, generator=gen, dtype=torch.float64),
            "rewards": torch.randn(B, T, generator=gen, dtype=torch.float64),
            "scores": torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64),
            "logps": -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3,
            "ref": -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3}


def test_token_rewards_are_the_kl_penalty_plus_the_score_on_the_last_token():
    x = given()
    kl = kl_estimate(x["logps"], x["ref"], "k1")
    got = ppo_token_rewards(x["scores"], x["mask"], kl, kl_coef=0.1)
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            want = 0.0
            if t < n:
                want = -0.1 * (x["logps"][b, t] - x["ref"][b, t]).item()
            if t == n - 1:
                want += x["scores"][b].item()
            assert got[b, t].item() == pytest.approx(want, abs=1e-12)


def test_token_rewards_find_the_last_token_after_a_prompt():
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)  # prompt positions unlabelled
    got = ppo_token_rewards(torch.tensor([2.0, -1.0], dtype=torch.float64), mask)
    want = torch.zeros(2, 5, dtype=torch.float64)
    want[0, 3], want[1, 4] = 2.0, -1.0
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_is_the_discounted_sum_of_td_errors(gamma, lam):
    x = given()
    advantages, returns = gae(x["rewards"], x["values"], x["mask"], gamma, lam)
    for b, n in enumerate(LENGTHS):
        r, v = x["rewards"][b, :n].tolist(), x["values"][b, :n].tolist() + [0.0]  # the episode ends after n
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(T):
            want = sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) if t < n else 0.0
            assert advantages[b, t].item() == pytest.approx(want, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(want + v[t] if t < n else 0.0, abs=1e-12)


def test_gae_with_lambda_one_and_no_discount_returns_the_reward_to_go():
    x = given()
    _, returns = gae(x["rewards"], x["values"], x["mask"], 1.0, 1.0)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            assert returns[b, t].item() == pytest.approx(x["rewards"][b, t:n].sum().item(), abs=1e-12)


def test_whitening_uses_only_masked_entries():
    x = given()
    got = masked_whiten(x["values"], x["mask"])
    kept = [x["values"][b, t].item() for b, n in enumerate(LENGTHS) for t in range(n)]
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((k - mean) ** 2 for k in kept) / (len(kept) - 1) + 1e-8)
    for b, n in enumerate(LENGTHS):
        for t in range(T):
            want = (x["values"][b, t].item() - mean) / std if t < n else 0.0
            assert got[b, t].item() == pytest.approx(want, abs=1e-10)


@pytest.mark.parametrize("value_clip", [0.2, 10.0])
def test_value_loss_is_the_larger_of_the_clipped_and_unclipped_squared_errors(value_clip):
    x = given()
    returns = x["rewards"]
    loss, active = clipped_value_loss(x["values"], x["old_values"], returns, value_clip)
    for b in range(B):
        for t in range(T):
            v, old, ret = x["values"][b, t].item(), x["old_values"][b, t].item(), returns[b, t].item()
            clipped = min(max(v, old - value_clip), old + value_clip)
            want = 0.5 * max((v - ret) ** 2, (clipped - ret) ** 2)
            assert loss[b, t].item() == pytest.approx(want, abs=1e-12)
            assert bool(active[b, t]) == (abs(v - old) > value_clip and (clipped - ret) ** 2 > (v - ret) ** 2)
    if value_clip == 10.0:  # a loose clip never binds: plain 0.5 (V - R)^2
        torch.testing.assert_close(loss, 0.5 * (x["values"] - returns) ** 2)
    else:
        assert active.any()

