"""Context parallel trains like one process: per-step loss and gradient norm of ring, Ulysses and
hybrid layouts, alone and with FSDP, TP, PP and recompute, against one process on the same data and
init; a checkpoint saved at cp = 2 resumes in one process; configs/smollm2/sft_long.toml at cp = 2
against one process.

Tiny models on mock data with packed documents (two per sequence, positions restarting at each),
5 AdamW steps in float32; mistral:debug adds a sliding window (8 tokens, so the ring skips chunk
pairs beyond it), deepseek_v3:debug latent attention (value heads narrower than query/key heads)
and MoE layers. Layouts differ only in the order of float32 reductions.
"""

import pytest

RTOL = 2e-5


def losses(records):
    return [r["loss"] for r in records if "loss" in r]  # (evaluation records have none)


def grad_norms(records):
    return [r["grad_norm"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def references(run_train, tiny_config, tmp_path_factory):
    """One process per model, the whole global batch in one micro-batch."""
    cache = {}

    def reference(model: str):
        if model not in cache:
            _, cache[model] = run_train(tiny_config, tmp_path_factory.mktemp("ref"),
                                        overrides=["--train.micro_batch_size", "4", "--model.name_or_path", model])
            assert len(cache[model]) == 5
        return cache[model]

    return reference


LAYOUTS = [
    ("llama:debug", 2, ["--parallel.cp", "2"]),
    ("llama:debug", 2, ["--parallel.cp", "2", "--parallel.cp_algo", "ulysses"]),
    ("llama:debug", 4, ["--parallel.cp", "4", "--parallel.cp_algo", "hybrid", "--parallel.cp_ulysses", "2"]),
    ("llama:debug", 4, ["--parallel.cp", "2", "--parallel.dp_shard", "2"]),
    ("llama:debug", 4, ["--parallel.cp", "2", "--parallel.tp", "2", "--parallel.dp_shard", "1"]),
    pytest.param("llama:debug", 4, ["--parallel.cp", "2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"],
                 marks=pytest.mark.slow),
    # (full recompute under cp runs in the default suite: the sft_long test below)
    pytest.param("llama:debug", 2, ["--parallel.cp", "2", "--recompute.mode", "selective"], marks=pytest.mark.slow),
    pytest.param("llama:debug", 4, ["--parallel.cp", "2", "--parallel.pp", "2", "--parallel.dp_shard", "1"],
                 marks=pytest.mark.slow),
    ("mistral:debug", 2, ["--parallel.cp", "2"]),
    ("deepseek_v3:debug", 2, ["--parallel.cp", "2"]),
    pytest.param("llama:debug", 4, ["--parallel.cp", "4"], marks=pytest.mark.slow),
    pytest.param("mistral:debug", 4, ["--parallel.cp", "4", "--parallel.cp_algo", "ulysses"], marks=pytest.mark.slow),
]
IDS = ["ring2", "ulysses2", "hybrid2x2", "ring2-fsdp2", "ring2-tp2", "ring2-hsdp2", "ring2-recompute", "ring2-pp2", "window-ring2",
       "latent-ring2", "ring4", "window-ulysses4"]


@pytest.mark.parametrize("model, nproc, layout", LAYOUTS, ids=IDS)
def test_context_parallel_matches_single_process(run_train, references, tiny_config, tmp_path, model, nproc, layout):
    _, records = run_train(tiny_config, tmp_path, nproc=nproc, overrides=[*layout, "--model.name_or_path", model])
    reference = references(model)
    assert losses(records) == pytest.approx(losses(reference), rel=RTOL)
    assert grad_norms(records) == pytest.approx(grad_norms(reference), rel=1e-4)


def test_a_cp2_checkpoint_resumes_in_one_process(run_train, tiny_config, tmp_path):
    """Saved at step 4 of an 8-step run at cp = 2, continued at cp = 1: the uninterrupted losses."""
    eight_steps = ["--train.steps", "8", "--checkpoint.interval", "4", "--checkpoint.keep", "0"]
    out = tmp_path / "cp2"
    _, straight = run_train(tiny_config, out, nproc=2, overrides=[*eight_steps, "--parallel.cp", "2"])
    _, resumed = run_train(tiny_config, tmp_path / "cp1", overrides=[
        *eight_steps, "--checkpoint.resume", str(out / "checkpoints" / "step-4")])
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert losses(resumed) == pytest.approx(losses(straight[4:]), rel=RTOL)


def test_an_impossible_context_parallel_layout_is_one_clear_error(run_train, tiny_config, tmp_path):
    """34 tokens cannot be cut into 2 x cp = 4 equal chunks."""
    result, _ = run_train(tiny_config, tmp_path, nproc=2, check=False,
                          overrides=["--parallel.cp", "2", "--train.seq_length", "34"])
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "meshtron train: error:" in line]
    assert len(errors) == 1 and "train.seq_length (34) is not divisible by 2 x parallel.cp = 4" in errors[0]


@pytest.mark.smollm2
def test_sft_long_config_with_held_out_evaluation_at_cp2(run_train, smollm2_dir, tmp_path):
    """configs/smollm2/sft_long.toml (YaRN-scaled RoPE, cp = 2, full recompute) on a tiny model with
    SmolLM2's tokenizer, 64-token sequences: sft's response-only loss on packed samples and the held-out
    loss equal the one-process run of the same config."""
    import json
    from pathlib import Path

    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(40)]
    data, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    text = (Path(__file__).resolve().parents[2] / "configs" / "smollm2" / "sft_long.toml").read_text()
    assert 'name_or_path = "smollm2"' in text and "args = { max_seq_len" in text
    text = text.replace('name_or_path = "smollm2"', f'name_or_path = "llama:debug"\ntokenizer = "{smollm2_dir}"')
    config = tmp_path / "sft_long.toml"
    config.write_text(text.replace("args = { max_seq_len", "args = { vocab_size = 49152, max_seq_len"))
    tiny = ["--data.paths", f'["{data}"]', "--data.eval_paths", f'["{heldout}"]',
            "--train.steps", "3", "--train.seq_length", "64", "--train.global_batch_size", "4",
            "--train.micro_batch_size", "2", "--optim.lr", "0.01", "--lr.warmup_steps", "0",
            "--checkpoint.save_final", "false", "--log.plot", "false"]
    _, single = run_train(config, tmp_path / "single", overrides=[*tiny, "--parallel.cp", "1"])
    _, split = run_train(config, tmp_path / "cp2", nproc=2, overrides=tiny)
    assert losses(split) == pytest.approx(losses(single), rel=RTOL)
    assert grad_norms(split) == pytest.approx(grad_norms(single), rel=1e-4)
    evals = [r["eval_loss"] for r in single if "eval_loss" in r]
    assert len(evals) == 2
    assert [r["eval_loss"] for r in split if "eval_loss" in r] == pytest.approx(evals, rel=RTOL)
