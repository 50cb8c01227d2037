"""`meshtron plan`'s memory per rank against torch's MemTracker on one process (bytes of live tensors by
kind), for each recompute mode. The sharded case (dp_shard = 2) is checked in
tests/distributed/test_grad_accum_memory.py."""

import dataclasses

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker

from meshtron.models.registry import build_model, get_family, get_flavor
from meshtron.parallel.memory import Layout, memory_per_rank
from meshtron.parallel.recompute import apply_recompute


def measure(args, batch: int, seq_length: int, recompute: str) -> tuple[dict, dict]:
    """(snapshot at the end of forward, snapshot after backward and an AdamW step), float32 on the CPU."""
    torch.manual_seed(0)
    model = build_model(args, device="cpu")
    model.init_weights(0)
    apply_recompute(model, get_family(args.family).plan, recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_length))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    cpu = torch.device("cpu")
    with tracker:
        logits = model(tokens)
        forward = tracker.get_tracker_snapshot()[cpu]
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        optimizer.step()
        after = tracker.get_tracker_snapshot()[cpu]
    return ({kind.value if hasattr(kind, "value") else kind: n for kind, n in forward.items()},
            {kind.value if hasattr(kind, "value") else kind: n for kind, n in after.items()})


@pytest.mark.parametrize("shape", [{}, {"dim": 128, "ffn_dim": 512, "num_layers": 3},
                                   {"num_heads": 8, "num_kv_heads": 4, "ffn_dim": 256}])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_plan_matches_a_measured_tiny_model(shape, recompute):
    args = dataclasses.replace(get_flavor("llama:debug"), **shape)
    forward, after = measure(args, batch=2, seq_length=64, recompute=recompute)
    plan = memory_per_rank(args, Layout(micro_batch_size=2, seq_length=64, recompute=recompute,
                                        compute_dtype="float32", master_dtype="float32"))
    assert plan["params"] == forward["Parameter"]
    assert plan["grads"] == after["Gradient"]
    assert plan["optimizer"] == pytest.approx(after["Optstate"], rel=1e-3)  # + AdamW's step counters
    # What backward keeps: the layers' saved tensors and the logits (RoPE tables and masks are not counted).
    assert plan["activations"] + plan["logits"] == pytest.approx(forward["Activation"], rel=0.05)
    assert plan["gathered"] == 0  # no FSDP on one process


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
    assert capsys.readouterr().err.strip() == "meshtron plan: error: recompute 'some': choose one of none, selective, full"
