"""Expert parallel (`parallel.ep`): mixtral:debug's experts split over ranks train exactly like one process;
a checkpoint saved at ep=2 resumes in one process and at ep=2 x dp_shard=4, and exports to the same Hugging
Face weights; impossible layouts are one clear line (ep not dividing the data-parallel ranks:
tests/unit/parallel/test_dims.py).

One sequence per forward (micro_batch_size 1), as in test_family_layouts.py: the load-balancing loss is per
forward, so only then do data-parallel ranks run the same forwards as one process."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

RTOL = 2e-5  # layouts differ only in the order of float32 reductions
COMMON = ["--model.name_or_path", "mixtral:debug", "--train.micro_batch_size", "1"]
FOUR_STEPS = [*COMMON, "--train.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep", "0"]
EP2 = ["--parallel.dp_shard", "2", "--parallel.ep", "2"]


def losses(records):
    return [r["loss"] for r in records]


@pytest.fixture(scope="module")
def one_process(run_train, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _, records = run_train(tiny_config, out, overrides=FOUR_STEPS)
    return out, records


@pytest.fixture(scope="module")
def ep_run(run_train, tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2")
    _, records = run_train(tiny_config, out, nproc=2, overrides=[*FOUR_STEPS, *EP2])
    return out, records


def test_ep2_matches_one_process(one_process, ep_run):
    (_, expected), (_, records) = one_process, ep_run
    assert len(records) == len(expected) == 4
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
    assert [r["moe_load_max"] for r in records] == pytest.approx([r["moe_load_max"] for r in expected], rel=RTOL)


@pytest.mark.slow
def test_ep2_tp2_matches_one_process(run_train, tiny_config, one_process, tmp_path):
    _, expected = one_process
    _, records = run_train(tiny_config, tmp_path, nproc=4, overrides=[
        *COMMON, "--train.steps", "2", "--parallel.dp_shard", "2", "--parallel.tp", "2", "--parallel.ep", "2"])
    assert losses(records) == pytest.approx(losses(expected[:2]), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected[:2]], rel=1e-4)


@pytest.mark.slow  # inductor compiles the blocks on CPU: a minute or more
def test_ep2_compiled_matches_one_process(run_train, tiny_config, one_process, tmp_path):
    """Compiled blocks with the all-to-alls in them (their splits are read on the host: graph breaks). Under
    compile the float32 experts run the per-expert loop, as grouped_mm's meta function takes only bfloat16."""
    _, expected = one_process
    _, records = run_train(tiny_config, tmp_path, nproc=2, timeout=600, overrides=[
        *COMMON, "--train.steps", "2", *EP2, "--train.compile", "true"])
    assert losses(records) == pytest.approx(losses(expected[:2]), rel=1e-4)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected[:2]], rel=1e-4)


def test_checkpoint_at_ep2_resumes_at_ep2_dp_shard4(run_train, tiny_config, one_process, ep_run, tmp_path):
    """The ep=2 checkpoint resumed on 4 ranks, each half of the experts FSDP-sharded over 2 of them: steps 3
    and 4 train like one process's."""
    (_, expected), (ep_out, _) = one_process, ep_run
    _, records = run_train(tiny_config, tmp_path, nproc=4, overrides=[
        *COMMON, "--train.steps", "4", "--parallel.dp_shard", "4", "--parallel.ep", "2",
        "--checkpoint.resume", str(ep_out / "checkpoints" / "step-2")])
    assert [r["step"] for r in records] == [3, 4]
    assert losses(records) == pytest.approx(losses(expected[2:]), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected[2:]], rel=1e-4)


QWEN = ["--model.name_or_path", "qwen3_moe:debug", "--train.micro_batch_size", "1", "--train.steps", "2"]


# mixtral:debug with every balancing term: the load-balancing, z- and sequence-wise losses and the aux-free bias.
BALANCED = [*COMMON, "--train.steps", "3", "--model.args",
            "{z_loss_coef = 0.01, seq_aux_loss_coef = 0.01, bias_update_rate = 0.05}"]


@pytest.mark.parametrize("nproc, common, layout, metrics", [
    # qwen3_moe:debug with the aux-free bias: its counts are summed over the context-parallel ranks too, so
    # that both apply one process's update. No load-balancing loss: under cp each rank's would be over its
    # part of the sequences (the z-loss and the loads add up). ep borrows the context-parallel ranks.
    (2, [*QWEN, "--model.args", "{bias_update_rate = 0.05}"], ["--parallel.cp", "2", "--parallel.dp_shard", "1"],
     ("moe_z_loss", "moe_load_max")),
    # The router losses span the layers of both stages; each stage's bias moves by its layers' counts.
    pytest.param(4, BALANCED, ["--parallel.pp", "2", "--parallel.dp_shard", "2"],
                 ("moe_aux_loss", "moe_z_loss", "moe_seq_aux_loss", "moe_load_max"), marks=pytest.mark.slow),
], ids=["ep2-cp2", "ep2-pp2"])
def test_ep2_with_cp_or_pp_matches_one_process(run_train, tiny_config, tmp_path, nproc, common, layout, metrics):
    _, expected = run_train(tiny_config, tmp_path / "one", overrides=common)
    _, records = run_train(tiny_config, tmp_path / "ep", nproc=nproc,
                           overrides=[*common, *layout, "--parallel.ep", "2"])
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["grad_norm"] for r in records] == pytest.approx([r["grad_norm"] for r in expected], rel=1e-4)
    for key in metrics:
        assert [r[key] for r in records] == pytest.approx([r[key] for r in expected], rel=1e-4), key


def test_checkpoint_at_ep2_resumes_in_one_process(run_train, tiny_config, one_process, ep_run, tmp_path):
    (_, expected), (ep_out, _) = one_process, ep_run
    _, records = run_train(tiny_config, tmp_path, overrides=[
        *FOUR_STEPS, "--checkpoint.resume", str(ep_out / "checkpoints" / "step-2")])
    assert [r["step"] for r in records] == [3, 4]
    assert losses(records) == pytest.approx(losses(expected[2:]), rel=RTOL)


def test_ep2_checkpoint_exports_the_one_process_weights(one_process, ep_run, tmp_path):
    """Each rank saved its experts; the export stacks them back in expert order, under the same names."""
    exported = {}
    for name, (out, _) in (("one", one_process), ("ep", ep_run)):
        subprocess.run([sys.executable, "-m", "meshtron", "convert", "--input", str(out / "checkpoints" / "step-2"),
                        "--output", str(tmp_path / name)], check=True, capture_output=True)
        exported[name] = load_file(tmp_path / name / "model.safetensors")
    assert exported["ep"].keys() == exported["one"].keys()
    assert any(".experts.3.w2" in key for key in exported["ep"])
    for key, value in exported["one"].items():
        torch.testing.assert_close(exported["ep"][key], value, rtol=0, atol=1e-4, msg=key)  # weights ~0.02: a misplaced expert fails


@pytest.mark.parametrize("layout, message", [
    (["--model.args", "{num_experts = 3}", "--parallel.dp_shard", "2", "--parallel.ep", "2"],
     "num_experts (3) is not divisible by parallel.ep = 2"),
    (["--model.name_or_path", "llama:debug", "--parallel.dp_shard", "2", "--parallel.ep", "2"],
     "llama has none; set parallel.ep = 1"),
], ids=["experts-not-divisible", "dense-model"])
def test_impossible_layouts_are_one_line(run_train, tiny_config, tmp_path, layout, message):
    result, _ = run_train(tiny_config, tmp_path, nproc=2, check=False,
                          overrides=[*COMMON, "--train.steps", "1", *layout])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "meshtron train: error:" in line]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


@pytest.mark.parametrize("layout", [["--parallel.dp_shard", "2"], EP2], ids=["dp_shard2", "ep2"])
def test_aux_free_bias_matches_one_process(run_train, tiny_config, one_process, tmp_path, layout):
    """Each rank's bias moves by the step's expert counts summed over all data-parallel ranks: with a rank's
    own counts the biases, and so the routing, would differ from one process's."""
    balancing = [*COMMON, "--train.steps", "3", "--model.args", "{bias_update_rate = 0.05}"]
    _, expected = run_train(tiny_config, tmp_path / "one", overrides=balancing)
    _, records = run_train(tiny_config, tmp_path / "two", nproc=2, overrides=[*balancing, *layout])
    assert losses(records) == pytest.approx(losses(expected), rel=RTOL)
    assert [r["moe_load_max"] for r in records] == pytest.approx([r["moe_load_max"] for r in expected], rel=RTOL)
    # The bias changed the routing (step 1 runs before any update).
    without = one_process[1][:3]
    assert losses(expected)[0] == pytest.approx(losses(without)[0], rel=RTOL)
    assert [r["moe_expert_load"] for r in expected[1:]] != [r["moe_expert_load"] for r in without[1:]]
