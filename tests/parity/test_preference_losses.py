"""Each preference/reward loss against its published definition, on fixed log-probs, computed
here independently with Python's math module."""

import math

import pytest
import torch

from meshtron.align.losses import (
    bradley_terry_loss,
    dpo_loss,
    preference_metrics,
    prm_loss,
    sequence_logps,
    simpo_loss,
)

PC = [-12.0, -30.5, -8.25]  # policy chosen
PR = [-14.0, -29.0, -20.0]  # policy rejected
RC = [-13.0, -31.0, -9.0]  # reference chosen
RR = [-13.5, -29.5, -18.0]  # reference rejected
T = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_sigmoid(beta, eps):
    losses, chosen, rejected = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "sigmoid", eps)
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        expected = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert losses[i].item() == pytest.approx(expected, abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (PC[i] - RC[i]))
        assert rejected[i].item() == pytest.approx(beta * (PR[i] - RR[i]))


def test_dpo_hinge_and_ipo():
    beta = 0.25
    hinge, _, _ = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "hinge")
    ipo, _, _ = dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "ipo")
    for i in range(3):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert hinge[i].item() == pytest.approx(max(0.0, 1 - beta * h))
        assert ipo[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo"):
        dpo_loss(T(PC), T(PR), T(RC), T(RR), beta, "kto")


def test_simpo():
    beta, gamma = 2.0, 0.5
    lc, lr = [10, 20, 5], [12, 18, 9]
    losses, chosen, rejected = simpo_loss(T(PC), T(PR), T(lc), T(lr), beta, gamma)
    for i in range(3):
        logits = beta * PC[i] / lc[i] - beta * PR[i] / lr[i] - gamma
        assert losses[i].item() == pytest.approx(-log_sigmoid(logits), abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * PC[i] / lc[i])


def test_bradley_terry_and_prm():
    rc, rr = [1.5, -0.2, 0.3], [0.5, 0.4, 0.3]
    bt = bradley_terry_loss(T(rc), T(rr), margin=0.1)
    for i in range(3):
        assert bt[i].item() == pytest.approx(-log_sigmoid(rc[i] - rr[i] - 0.1))
    logits, labels = [2.0, -1.0, 0.0], [1, 0, 1]
    prm = prm_loss(T(logits), torch.tensor(labels))
    for z, y, got in zip(logits, labels, prm.tolist()):
        p = 1 / (1 + math.exp(-z))
        assert got == pytest.approx(-(y * math.log(p) + (1 - y) * math.log(1 - p)), abs=1e-6)


def test_sequence_logps_and_metrics():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, 3, 4, -100, -100], [1, 2, -100, 6, 0]])
    total, count = sequence_logps(logits, labels)
    logp = logits.log_softmax(-1)
    assert total[0].item() == pytest.approx(logp[0, 1, 3].item() + logp[0, 2, 4].item())
    assert count.tolist() == [2, 4]
    m = preference_metrics(torch.tensor([1.0, -1.0]), torch.tensor([0.5, 0.0]))
    assert m["rewards/accuracy"].item() == 1.0 and m["rewards/margin"].item() == pytest.approx(-0.5)
