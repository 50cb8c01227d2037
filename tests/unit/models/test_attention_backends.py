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


def _masks_seen_by_cores(model):
    """The mask description every attention core receives, in layer order (a forward hook: nothing patched)."""
    seen = []
    for module in model.modules():
        if type(module).__name__ == "AttentionCore":
            module.register_forward_hook(lambda module, args, output: seen.append(args[3]))
    return seen


def test_block_masks_are_built_once_per_batch_and_shared_by_every_layer():
    # gemma2:debug: a sliding window on layer 0, none on layer 1, soft-capped scores.
    model, args = _model("gemma2")
    model.set_attention("flex")
    tokens, document_ids = _packed(args.vocab_size)
    mask = AttentionMask.for_batch(tokens.shape[1], document_ids, backend="flex")
    seen = _masks_seen_by_cores(model)
    with torch.no_grad():
        first = model(tokens, mask=mask)
        built = dict(mask.derived.built)
        second = model(tokens, mask=mask)  # e.g. a DPO reference forward of the same batch
    assert set(built) == {("block", args.sliding_window), ("block", None)}  # one per window, not per layer
    assert all(mask.derived.built[key] is built[key] for key in built)  # the second forward built nothing
    assert len(seen) == 4 and all(m.derived is mask.derived for m in seen)
    assert torch.equal(first, second)


def test_fsdp_copies_of_the_mask_share_what_it_derives():
    """FSDP2 with a compute dtype casts every wrapped module's inputs, copying a dataclass input per
    block: the copies must still share the derived masks, or each layer would build its own."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model, args = _model("llama")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
        for block in model.layers.values():
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        model.set_attention("dense")
        tokens, document_ids = _packed(args.vocab_size)
        mask = AttentionMask.for_batch(tokens.shape[1], document_ids, backend="dense")
        seen = _masks_seen_by_cores(model)
        with torch.no_grad():
            model(tokens, mask=mask)
    finally:
        dist.destroy_process_group()
    assert len(seen) == 2 and all(m is not mask for m in seen)  # FSDP handed each block a copy
    assert all(m.derived is mask.derived for m in seen)
    assert list(mask.derived.built) == [("dense", None)]


def test_pipeline_split_gives_each_micro_batch_its_rows_of_the_mask():
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

    model, args = _model("llama")
    tokens, document_ids = _packed(args.vocab_size)
    mask = AttentionMask.for_batch(tokens.shape[1], document_ids, backend="varlen")
    args_chunks, kwargs_chunks = split_args_kwargs_into_chunks((tokens,), {"mask": mask}, 2)
    with torch.no_grad():
        for row, ((chunk,), kwargs) in enumerate(zip(args_chunks, kwargs_chunks)):
            assert torch.equal(kwargs["mask"].document_ids, document_ids[row:row + 1])
            assert torch.equal(model(chunk, mask=kwargs["mask"]),
                               model(tokens[row:row + 1], document_ids=document_ids[row:row + 1]))


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                      is_causal=False):
    """torch's variable-length kernel as its documentation describes it, in plain SDPA: each segment
    [cu[i], cu[i+1]) of the packed (T, heads, D) tensors attends within itself; `window_size` (left,
    right) keys around each query ((-1, 0) causal), or `is_causal` (torch 2.9). It runs on CUDA only,
    so this stands in for it on CPU to check how meshtron packs rows and documents into its call."""
    out = torch.empty_like(q)
    left, right = (-1, 0) if is_causal else window_size
    for start, end in zip(cu_q.tolist(), cu_q.tolist()[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))
        i = torch.arange(end - start)
        visible = torch.ones(end - start, end - start, dtype=torch.bool)
        if right >= 0:
            visible &= i[None, :] <= i[:, None] + right
        if left >= 0:
            visible &= i[None, :] >= i[:, None] - left
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=visible, scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("params", [("is_causal",), ("scale", "window_size"), ("scale", "window_size", "enable_gqa")],
                         ids=["torch2.9", "torch2.10", "torch2.12"])
@pytest.mark.parametrize("window", [None, 6])
def test_packed_varlen_call_equals_the_dense_mask(params, window):
    """Rows and their documents laid end to end for one variable-length call (the CUDA path), with a
    custom scale, grouped heads and a window, under each release's arguments, equal the dense mask."""
    from meshtron.models.common.masks import VarlenKernel, attend, packed_varlen

    if window is not None and "window_size" not in params:
        pytest.skip("without window_size a windowed layer keeps the per-document path")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 8, generator=gen)
    k, v = torch.randn(2, 2, 40, 8, generator=gen), torch.randn(2, 2, 40, 8, generator=gen)
    _, document_ids = _packed(16)
    mask = AttentionMask.for_batch(40, document_ids)
    kernel = VarlenKernel(_reference_varlen, frozenset(params))
    packed = packed_varlen(q, k, v, mask, window, 0.3, kernel)
    dense = attend(q, k, v, mask, window, "dense", scale=0.3)
    assert (packed - dense).abs().max().item() <= 1e-5
    assert mask.derived.built[("cu_seq", 2)][0].tolist() == [0, 9, 29, 40, 80]  # once per batch, shared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's variable-length kernel runs on CUDA")
def test_cuda_varlen_kernel_equals_the_dense_mask():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 64, generator=gen).cuda().bfloat16()
    k, v = (torch.randn(2, 2, 40, 64, generator=gen).cuda().bfloat16() for _ in range(2))
    from meshtron.models.common.masks import attend

    _, document_ids = _packed(16)
    mask = AttentionMask.for_batch(40, document_ids.cuda())
    for window in (None, 6):
        got = attend(q, k, v, mask, window, "varlen").float()
        expected = attend(q, k, v, mask, window, "dense").float()
        assert (got - expected).abs().max().item() <= 2e-2  # bfloat16 inputs, float32 accumulation in both
