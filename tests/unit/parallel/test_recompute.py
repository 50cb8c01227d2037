"""recompute.mode = "op": each block keeps its matmul and attention outputs and recomputes the cheap ops
in backward. Same loss and gradients as no recompute (float32); the backward runs no matmul or attention
forward again (full recompute does, which shows the count would see it); the cheap ops do run again;
and under torch.compile the blocks trace without a graph break of their own."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meshtron.models.registry import build_model, get_family, get_flavor
from meshtron.parallel.recompute import SAVED_OPS, apply_recompute



class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def model_with(mode: str, flavor: str = "llama:debug"):
    torch.manual_seed(0)
    args = get_flavor(flavor)
    model = build_model(args, device="cpu")
    model.init_weights(0)
    apply_recompute(model, get_family(args.family).plan, mode)
    return model


def backward_ops(mode: str, tokens, flavor: str) -> tuple[torch.Tensor, list[torch.Tensor], Counter]:
    """(loss, gradients, the ops the backward ran)."""
    model = model_with(mode, flavor)
    loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    counter = OpCounter()
    with counter:
        loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], counter.counts


# mixtral:debug: its experts' grouped GEMM is kept too.
@pytest.mark.parametrize("flavor", ["llama:debug", "mixtral:debug"])
def test_op_recompute_keeps_matmuls_and_recomputes_the_rest(flavor):
    tokens = torch.randint(0, get_flavor(flavor).vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, grads, plain = backward_ops("none", tokens, flavor)
    op_loss, op_grads, op = backward_ops("op", tokens, flavor)
    _, _, full = backward_ops("full", tokens, flavor)
    assert op_loss == loss
    for grad, op_grad in zip(grads, op_grads):
        torch.testing.assert_close(op_grad, grad, rtol=1e-6, atol=0)
    # The backward's own matmuls (the gradients) are the same; a recomputed forward would add its own.
    assert {func: op[func] for func in SAVED_OPS} == {func: plain[func] for func in SAVED_OPS}
    mm, attention = torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert op[mm] < full[mm] and op[attention] == 0 < full[attention]
    assert sum(op.values()) > sum(plain.values())  # norms, activations, RoPE ran again
    if "mixtral" in flavor:  # the experts ran grouped GEMMs, and op recompute runs none of their forwards again
        grouped_mm = torch.ops.aten._grouped_mm.default
        assert op[grouped_mm] == plain[grouped_mm] < full[grouped_mm]


def test_op_recompute_adds_no_graph_break():
    tokens = torch.randint(0, get_flavor("llama:debug").vocab_size, (2, 16))
    torch._dynamo.reset()
    plain = torch._dynamo.explain(model_with("none"))(tokens).graph_break_count
    torch._dynamo.reset()
    assert torch._dynamo.explain(model_with("op"))(tokens).graph_break_count == plain
