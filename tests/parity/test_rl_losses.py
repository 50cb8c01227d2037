"""The online RL objective against oracles: TRL's GRPOTrainer loss (trl 1.16, pinned in the test
extras; its `_compute_loss` driven with given log-probs) for the grpo, dapo, dr_grpo and bnpo
aggregations, and the advantage and KL estimators against their formulas written out here."""

import math
from types import SimpleNamespace

import pytest
import torch

from meshtron.align.rl import aggregate, group_advantages, kl_estimate, loss_units, token_losses

B, T = 4, 6


def given_inputs(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    old = logps + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 0.8  # ratios beyond the clip too
    ref = logps + (torch.rand(B, T, generator=gen, dtype=torch.float64) - 0.5) * 0.5
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[0, 4:] = 0  # completions of different lengths
    mask[2, 2:] = 0
    advantages = torch.tensor([1.2, -0.7, 0.3, -1.5], dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "mask": mask, "advantages": advantages}


def trl_loss(inputs: dict, loss_type: str, beta: float, eps_low: float, eps_high: float, max_len: int) -> float:
    """TRL's GRPOTrainer._compute_loss on one process, one accumulation step, with the policy's
    log-probs given instead of computed by a model."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    logps = inputs["logps"].clone().requires_grad_()
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        epsilon_low=eps_low, epsilon_high=eps_high, beta=beta, loss_type=loss_type,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t,
                                                            gather=lambda t: t),
        _metrics={"train": __import__("collections").defaultdict(list)},
    )
    batch = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
             "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": inputs["mask"].long(),
             "advantages": inputs["advantages"], "old_per_token_logps": inputs["old"],
             "ref_per_token_logps": inputs["ref"], "num_items_in_batch": inputs["mask"].sum()}
    return trl_grpo.GRPOTrainer._compute_loss(trainer, None, batch).item()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("beta,eps_low,eps_high", [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_loss_matches_trl(loss_type, beta, eps_low, eps_high):
    x = given_inputs()
    loss, _, _ = token_losses(x["logps"], x["old"], x["advantages"], clip_low=eps_low, clip_high=eps_high,
                              kl_coef=beta, ref_logps=x["ref"], kl_estimator="k3")
    ours = aggregate(loss, x["mask"], loss_type, max_new_tokens=T) / loss_units(x["mask"], loss_type)
    assert ours.item() == pytest.approx(trl_loss(x, loss_type, beta, eps_low, eps_high, T), rel=1e-12)


def test_micro_batches_add_up_to_the_step():
    """The Trainer sums `aggregate` over micro-batches and divides by the summed `loss_units`: for grpo
    and dapo that is the loss of the whole batch at once."""
    x = given_inputs(1)
    loss, _, _ = token_losses(x["logps"], x["old"], x["advantages"], clip_low=0.2, clip_high=0.2)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        whole = aggregate(loss, x["mask"], loss_type, T) / loss_units(x["mask"], loss_type)
        parts = [(aggregate(loss[s], x["mask"][s], loss_type, T), loss_units(x["mask"][s], loss_type))
                 for s in (slice(0, 2), slice(2, 4))]
        assert (sum(p[0] for p in parts) / sum(p[1] for p in parts)).item() == pytest.approx(whole.item(), rel=1e-12)


def test_clip_two_sided_by_hand():
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]], dtype=torch.float64))
    old = torch.zeros(1, 4, dtype=torch.float64)
    for adv in (2.0, -2.0):
        loss, active, _ = token_losses(logps, old, torch.tensor([adv], dtype=torch.float64), clip_low=0.2,
                                       clip_high=0.28)
        expected = []
        for r in (1.5, 0.5, 1.1, 0.7):
            clipped = min(max(r, 0.8), 1.28)
            expected.append(-min(r * adv, clipped * adv))
        assert loss[0].tolist() == pytest.approx(expected)
        # Active where the ratio left the region in the advantage's direction.
        assert active[0].tolist() == ([True, False, False, False] if adv > 0 else [False, True, False, True])


def test_group_advantages_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    advantages = group_advantages(rewards, group_size=4)
    for g in range(3):
        group = rewards[4 * g:4 * g + 4].tolist()
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)  # sample std, as TRL's nanstd
        for i, r in enumerate(group):
            assert advantages[4 * g + i].item() == pytest.approx((r - mean) / (std + 1e-4), rel=1e-6)
    assert group_advantages(rewards, 4, scale=False)[:4].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])


def test_kl_estimators_formulas():
    logps = torch.tensor([-1.0, -2.5, -0.3], dtype=torch.float64)
    ref = torch.tensor([-1.4, -2.0, -0.3], dtype=torch.float64)
    for i in range(3):
        d = ref[i].item() - logps[i].item()
        assert kl_estimate(logps, ref, "k1")[i].item() == pytest.approx(-d)
        assert kl_estimate(logps, ref, "k2")[i].item() == pytest.approx(d * d / 2)
        assert kl_estimate(logps, ref, "k3")[i].item() == pytest.approx(math.exp(d) - d - 1)
    # k3 is an unbiased estimate of KL(p || ref): its mean over samples of p approaches the exact value.
    gen = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64), torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    estimate = kl_estimate(p.log()[samples], q.log()[samples], "k3").mean().item()
    assert estimate == pytest.approx((p * (p / q).log()).sum().item(), abs=5e-3)
