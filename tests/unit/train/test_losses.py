"""The chunked head + cross entropy gives the unchunked loss and gradients, and never keeps a
whole micro-batch's logits for the backward; the process reward model's head (two tokens at the
labelled positions) gives what the full logits give."""

import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F

from meshtron.models.registry import build_model, get_flavor
from meshtron.train.losses import (
    IGNORE_INDEX,
    chunked_head_nll,
    head_cross_entropy_sum,
    head_logits_at,
    token_cross_entropy_sum,
)

RTOL = 1e-5


def _inputs(N=37, E=16, V=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, N, E, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, E, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (1, N), generator=gen)
    labels[0, ::5] = IGNORE_INDEX
    return hidden, weight, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_per_token_loss_and_gradients_match_the_unchunked_head(chunk):
    hidden, weight, labels = _inputs()
    # A different weight per token, as DPO's per-row sums give the backward.
    token_weight = torch.linspace(-1.0, 2.0, labels.numel()).view_as(labels)

    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(labels)
    got = chunked_head_nll(hidden, weight, labels, chunk_tokens=chunk)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-6)
    assert (got[labels == IGNORE_INDEX] == 0).all()
    for g, r in zip(_grads((got * token_weight).sum(), hidden, weight), _grads((ref * token_weight).sum(), hidden, weight)):
        torch.testing.assert_close(g, r, rtol=RTOL, atol=1e-6)


def test_a_micro_batch_without_labelled_tokens_still_reaches_every_input():
    """A context-parallel rank may hold only prompt tokens: its loss is 0, yet its backward must reach the
    head's weight (FSDP reduces that gradient on every rank)."""
    hidden, weight, labels = _inputs()
    labels[:] = IGNORE_INDEX
    got = chunked_head_nll(hidden, weight, labels, chunk_tokens=8)
    assert (got == 0).all()
    g_hidden, g_weight = _grads(got.sum(), hidden, weight)
    assert (g_hidden == 0).all() and (g_weight == 0).all()


def test_model_loss_and_parameter_gradients_match_logits_then_loss():
    torch.manual_seed(0)
    args = dataclasses.replace(get_flavor("llama:debug"), tie_embeddings=True)
    model = build_model(args, device="cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, :5] = IGNORE_INDEX

    ref = token_cross_entropy_sum(model(tokens), labels)
    ref_grads = _grads(ref, *model.parameters())
    head = functools.partial(head_cross_entropy_sum, labels_BS=labels)
    got = model(tokens, head=head)
    got_grads = _grads(got, *model.parameters())

    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0)
    for (name, _), g, r in zip(model.named_parameters(), got_grads, ref_grads):
        # Relative to the gradient's norm: elementwise, float32 rounding of near-zero entries dominates.
        assert (g - r).norm() <= RTOL * r.norm(), name


def test_the_backward_keeps_no_tensor_the_size_of_the_logits():
    hidden, weight, labels = _inputs(N=64, V=200)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        chunked_head_nll(hidden, weight, labels, chunk_tokens=8).sum()
    # The inputs (hidden, weight) and per-token statistics only, not the 64 x 200 logits.
    assert saved and max(saved) == max(hidden.numel(), weight.numel())


@pytest.mark.parametrize("tied", [True, False])
def test_logits_at_positions_match_the_full_head_forward_and_backward(tied):
    torch.manual_seed(0)
    args = dataclasses.replace(get_flavor("llama:debug"), tie_embeddings=tied)
    model = build_model(args, device="cpu")
    model.init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 24))
    where = torch.zeros(2, 24, dtype=torch.bool)
    where[0, [3, 9, 23]] = True
    where[1, [0, 17]] = True
    ids = [7, 11]
    sign = torch.tensor([1.0, -1.0, 0.5, 2.0, -3.0])  # a different weight per position for the backward

    ref = model(tokens)[where][:, ids].float()
    got = model(tokens, head=functools.partial(head_logits_at, where_BS=where, vocab_ids=ids))
    assert got.shape == (5, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-6)
    score = lambda pair: (sign * (pair[:, 0] - pair[:, 1])).sum()  # noqa: E731
    for (name, _), g, r in zip(model.named_parameters(), _grads(score(got), *model.parameters()),
                               _grads(score(ref), *model.parameters())):
        assert (g - r).norm() <= RTOL * r.norm(), name


def test_logits_at_positions_fall_back_to_the_head_forward_where_it_is_not_a_plain_linear():
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 8)
    head = torch.nn.Linear(8, 20, bias=True)  # a bias: not the local fast path
    where = torch.tensor([[False, True, False, False, True, True]])
    torch.testing.assert_close(head_logits_at(hidden, head, where, [4, 2]), head(hidden)[where][:, [4, 2]])
