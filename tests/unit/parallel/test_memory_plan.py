"""`meshtron plan`'s memory per rank against torch's MemTracker on one process (bytes of live tensors by
kind), for each recompute mode, with the trainer's loss (the head and cross entropy chunked over
tokens, as the pretrain recipe runs them). The sharded case (dp_shard = 2) is checked in
tests/distributed/test_grad_accum_memory.py."""

import dataclasses
import functools

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from meshtron.config.loader import RECOMPUTE_MODES
from meshtron.models.registry import build_model, get_family, get_flavor
from meshtron.parallel.memory import Layout, memory_per_rank
from meshtron.parallel.recompute import apply_recompute
from meshtron.train import losses


def by_kind(snapshot: dict) -> dict:
    return {kind.value if hasattr(kind, "value") else kind: n for kind, n in snapshot[torch.device("cpu")].items()}


def measure(args, batch: int, seq_length: int, recompute: str) -> tuple[dict, dict]:
    """(snapshot at the end of forward, with "peak_activation" the forward's peak; snapshot after backward
    and an AdamW step), float32 on the CPU. The loss is the pretrain recipe's: the model's forward hands
    its final hidden states to `head_cross_entropy_sum`."""
    torch.manual_seed(0)
    model = build_model(args, device="cpu")
    model.init_weights(0)
    apply_recompute(model, get_family(args.family).plan, recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_length))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        loss = model(tokens, head=functools.partial(losses.head_cross_entropy_sum, labels_BS=tokens))
        forward = by_kind(tracker.get_tracker_snapshot())
        forward["peak_activation"] = by_kind(tracker.get_tracker_snapshot("peak"))["Activation"]
        loss.backward()
        optimizer.step()
        after = by_kind(tracker.get_tracker_snapshot())
    return forward, after


@pytest.mark.parametrize("shape", [{}, {"dim": 128, "ffn_dim": 512, "num_layers": 3},
                                   {"num_heads": 8, "num_kv_heads": 4, "ffn_dim": 256}])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
def test_plan_matches_a_measured_tiny_model(shape, recompute):
    args = dataclasses.replace(get_flavor("llama:debug"), **shape)
    forward, after = measure(args, batch=2, seq_length=64, recompute=recompute)
    plan = memory_per_rank(args, Layout(micro_batch_size=2, seq_length=64, recompute=recompute,
                                        compute_dtype="float32", master_dtype="float32"))
    assert plan["params"] == forward["Parameter"]
    assert plan["grads"] == after["Gradient"]
    assert plan["optimizer"] == pytest.approx(after["Optstate"], rel=1e-3)  # + AdamW's step counters
    # What backward keeps: the layers' saved tensors and the final hidden states; the chunked loss keeps no
    # logits (RoPE tables and masks are not counted).
    assert plan["activations"] == pytest.approx(forward["Activation"], rel=0.05)
    assert plan["gathered"] == 0  # no FSDP on one process


@pytest.mark.parametrize("vocab_size", [1024, 3000])
def test_the_planned_logits_are_the_measured_chunk_of_the_loss(vocab_size, monkeypatch):
    """With chunks of 48 of the 128 tokens, what the forward holds for the loss at its peak (one chunk's logits and
    log-softmax) is the plan's logits part, and none of it is left when the forward ends."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 48 * vocab_size)
    args = dataclasses.replace(get_flavor("llama:debug"), vocab_size=vocab_size)
    forward, _ = measure(args, batch=2, seq_length=64, recompute="none")
    plan = memory_per_rank(args, Layout(micro_batch_size=2, seq_length=64, compute_dtype="float32",
                                        master_dtype="float32"))
    assert forward["peak_activation"] - forward["Activation"] == pytest.approx(plan["logits"], rel=0.02)
    assert plan["activations"] == pytest.approx(forward["Activation"], rel=0.05)


def test_the_command_prints_the_plan_as_a_table_row_and_a_bad_choice_as_one_line(capsys):
    from meshtron.cli import main

    with pytest.raises(SystemExit) as done:
        main(["plan", "llama:llama3-8b", "--dp-shard", "8", "--seq-length", "8192", "--recompute", "full"])
    assert done.value.code == 0
    total = memory_per_rank(get_flavor("llama:llama3-8b"), Layout(dp_shard=8, seq_length=8192, recompute="full"))["total"]
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"| {total / 2**30:.1f} GiB |")
    with pytest.raises(SystemExit) as done:
        main(["plan", "llama:debug", "--recompute", "some"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip() == "meshtron plan: error: recompute 'some': choose one of none, selective, op, full"
