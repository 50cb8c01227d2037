"""Every attention backend computes the same attention for the same mask description."""

import pytest
import torch

from meshtron.models.common.masks import ATTENTION_BACKENDS, AttentionMask
from meshtron.models.registry import build_model, get_flavor


def _model(family):
    args = get_flavor(f"{family}:debug")  # mistral's debug flavor has a sliding window of 8
    model = build_model(args, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(seed=4)
    return model, args


def _packed(vocab_size):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (2, 40), generator=gen)
    # Row 0: three documents; row 1: one document (no boundary), as in a packed batch.
    document_ids = torch.tensor([[0] * 9 + [1] * 20 + [2] * 11, [5] * 40])
    return tokens, document_ids


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_backends_agree_on_packed_documents_forward_and_backward(family):
    model, args = _model(family)
    tokens, document_ids = _packed(args.vocab_size)
    results = {}
    for backend in ATTENTION_BACKENDS:
        model.set_attention(backend)
        model.zero_grad()
        # torch has no FlexAttention backward on CPU: flex is compared on the forward only.
        with torch.set_grad_enabled(backend != "flex"):
            logits = model(tokens, document_ids=document_ids)
            if backend != "flex":
                logits.float().pow(2).mean().backward()
        grad = None if backend == "flex" else model.layers["0"].attn.q_proj.weight.grad.clone()
        results[backend] = (logits.detach(), grad)
    reference_logits, reference_grad = results["dense"]
    for backend, (logits, grad) in results.items():
        assert (logits - reference_logits).abs().max().item() <= 1e-5, backend
        if grad is not None:
            assert torch.allclose(grad, reference_grad, atol=1e-6, rtol=1e-4), backend


def test_rows_without_boundaries_take_the_causal_fast_path():
    one_document_each = torch.tensor([[3, 3, 3], [7, 7, 7]])
    assert AttentionMask.for_batch(3, one_document_each).is_causal
    assert not AttentionMask.for_batch(3, torch.tensor([[0, 0, 1], [7, 7, 7]])).is_causal
    assert not AttentionMask.for_batch(1, None, offset=4).is_causal  # a cached decode step


def test_unknown_backend_is_refused():
    model, _ = _model("llama")
    with pytest.raises(ValueError, match="choose from auto, sdpa, flex, varlen, dense"):
        model.set_attention("flash")
