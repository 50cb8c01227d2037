"""`meshtron train` end to end as a user runs it: raw data preprocessed on the fly, pretrain and
SFT recipes, run-directory outputs, recompute and precision modes, and one clear message per
bad input."""

import json
import os
import re
from pathlib import Path

import pytest
from launch import run_meshtron

TINY = """
[model]
name_or_path = "llama:debug"
[data]
mock = true
[train]
steps = 3
global_batch_size = 2
micro_batch_size = 2
seq_length = 32
[log]
tensorboard = false
plot = false
[checkpoint]
save_final = false
"""


def meshtron_train(config: Path, output_dir: Path, *overrides: str, timeout: int = 600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return run_meshtron(["train", config, "--train.output_dir", output_dir, *overrides], env=env, timeout=timeout)


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--parallel.dp_shard", "2"], "do not match the world size 1"),
        (["--data.mock", "false", "--data.paths", "no/such/corpus"], "data path 'no/such/corpus' not found"),
        (["--optim.weight_decy", "1"], "unknown key optim.weight_decy; did you mean 'weight_decay'?"),
        (["--train.micro_batch_size", "two"], "--train.micro_batch_size: expected an integer, got 'two'"),
        (["--train.global_batch_size", "3"], "global_batch_size (3) must be a multiple of micro_batch_size"),
        (["--model.args", "{num_layer = 1}"], "model.args: unknown field 'num_layer'; did you mean 'num_layers'?"),
        (["--optim.betas", "0.9,1.5"], "optim.betas must be two values in [0, 1)"),
        (["--model.mtp_loss_weight", "0.5"], "model.mtp_loss_weight trains multi-token prediction modules, which "
                                             "this model has none of"),
        (["--optim.lr", "inf"], "--optim.lr: expected a finite number, got inf"),
        # Refused before the model exists (it used to warn, then grow to 19.5 GB of attention masks).
        (["--train.seq_length", "100000"], "train.seq_length 100000 is above the model's context length 2048 "
                                           "(max_seq_len / max_position_embeddings); lower train.seq_length or "
                                           "raise the flavor's context with model.args = {max_seq_len = N}"),
        (["--train.sample_prompt", "Hi", "--train.sample_max_new_tokens", "2048"],
         "train.sample_max_new_tokens 2048 leaves no room for the prompt in the model's context of 2048 tokens"),
    ],
)
def test_bad_input_gives_one_line(tiny, tmp_path, overrides, message):
    result = meshtron_train(tiny, tmp_path / "run", *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("meshtron train: error: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_recompute_modes_do_not_change_the_losses(tiny, tmp_path):
    runs = {mode: meshtron_train(tiny, tmp_path / mode, "--recompute.mode", mode) for mode in ("none", "selective", "op", "full")}
    for mode, result in runs.items():
        assert result.returncode == 0, result.stderr[-2000:]
    base = [r["loss"] for r in records(tmp_path / "none")]
    assert [r["loss"] for r in records(tmp_path / "selective")] == pytest.approx(base, rel=1e-6)
    assert [r["loss"] for r in records(tmp_path / "full")] == pytest.approx(base, rel=1e-6)
    assert [r["loss"] for r in records(tmp_path / "op")] == pytest.approx(base, rel=1e-6)


def test_bfloat16_mixed_and_pure_precision_track_float32(tiny, tmp_path):
    results = {
        "fp32": meshtron_train(tiny, tmp_path / "fp32"),
        "bf16": meshtron_train(tiny, tmp_path / "bf16", "--model.dtype", "bfloat16"),
        "pure": meshtron_train(tiny, tmp_path / "pure", "--model.dtype", "bfloat16", "--model.master_dtype", "bfloat16"),
        "fp16": meshtron_train(tiny, tmp_path / "fp16", "--model.dtype", "float16"),  # with dynamic loss scaling
    }
    for name, result in results.items():
        assert result.returncode == 0, result.stderr[-2000:]
    base = [r["loss"] for r in records(tmp_path / "fp32")]
    for name in ("bf16", "pure", "fp16"):
        got = [r["loss"] for r in records(tmp_path / name)]
        assert got != base, name  # it really computed in 16 bits
        assert got == pytest.approx(base, abs=0.05), name


def test_async_checkpoints_and_a_resumed_run_with_more_steps(tiny, tmp_path):
    common = ["--optim.name", "sgd", "--optim.lr", "0.1", "--checkpoint.async", "true"]
    first = meshtron_train(tiny, tmp_path / "run", *common, "--train.steps", "5", "--checkpoint.interval", "2",
                           "--checkpoint.save_final", "true")
    assert first.returncode == 0, first.stderr[-2000:]
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step-4", "step-5"]  # keep = 2; each committed after its background write
    assert all((tmp_path / "run" / "checkpoints" / s / "COMMITTED").is_file() for s in steps)
    # Resuming with train.steps raised follows the new schedule, as a fresh 7-step run would.
    resumed = meshtron_train(tiny, tmp_path / "run", *common, "--train.steps", "7")
    fresh = meshtron_train(tiny, tmp_path / "fresh", *common, "--train.steps", "7")
    assert resumed.returncode == 0 and fresh.returncode == 0, resumed.stderr[-2000:] + fresh.stderr[-2000:]
    assert [r["lr"] for r in records(tmp_path / "run")][5:] == [r["lr"] for r in records(tmp_path / "fresh")][5:]
    other = meshtron_train(tiny, tmp_path / "run", "--train.steps", "9")  # adamw now
    assert other.returncode == 2 and "was trained with optim.name = sgd" in other.stderr


@pytest.mark.smollm2
def test_pretrain_from_raw_text_writes_the_whole_run_directory(tmp_path, smollm2_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: the quick brown fox jumps over the lazy dog. " * 8})
                              + "\n" for i in range(40)))
    config = tmp_path / "pretrain.toml"
    config.write_text(f"""
[model]
name_or_path = "llama:debug"
args = {{ vocab_size = 49152, tie_embeddings = true }}
tokenizer = "{smollm2_dir}"
[data]
paths = ["{corpus}"]
[train]
steps = 4
global_batch_size = 4
micro_batch_size = 2
seq_length = 64
sample_prompt = "Document"
sample_max_new_tokens = 5
[optim]
lr = 0.01
""")
    out = tmp_path / "run"
    result = meshtron_train(config, out)
    assert result.returncode == 0, result.stderr[-3000:]
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"]
    for name in ("config.toml", "loss.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert (out / "sample.txt").read_text().startswith("Document")
    assert list((out / "tensorboard").iterdir())
    checkpoint = out / "checkpoints" / "step-4"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["recipe"] == "pretrain"
    assert (checkpoint / "COMMITTED").is_file() and (checkpoint / manifest["tokenizer"] / "tokenizer.json").is_file()
    assert list((out / "data").glob("corpus-pretrain-*_text_document.bin"))


@pytest.mark.smollm2
def test_sft_recipe_on_instruction_data(tmp_path, smollm2_dir):
    data = tmp_path / "instructions.jsonl"
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"The sum is {2 * i}."} for i in range(30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    config = tmp_path / "sft.toml"
    config.write_text(f"""
[model]
name_or_path = "llama:debug"
args = {{ vocab_size = 49152 }}
tokenizer = "{smollm2_dir}"
[data]
paths = ["{data}"]
eval_paths = ["{heldout}"]
[train]
recipe = "sft"
steps = 3
global_batch_size = 2
micro_batch_size = 1
seq_length = 64
[optim]
lr = 0.01
[log]
tensorboard = false
plot = false
""")
    out = tmp_path / "run"
    result = meshtron_train(config, out)
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [r for r in records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 3]
    recs = [r for r in records(out) if "loss" in r]
    assert len(recs) == 3 and all(r["loss"] > 0 for r in recs)
    # Only response tokens take loss: far fewer than the 2 x 64 input tokens of a step.
    assert all(0 < r["loss_tokens"] < 2 * 64 for r in recs)
    assert list((out / "data").glob("instructions-alpaca-*_packed_labels_document.bin"))
    manifest = json.loads((out / "checkpoints" / "step-3" / "manifest.json").read_text())
    assert manifest["recipe"] == "sft"


QUICKSTART_PROMPT = "On Monday, Ada went to the"


def run_quickstart(out: Path, *overrides: str, timeout: int = 600) -> list[dict]:
    result = meshtron_train(Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml", out, *overrides,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return records(out)


def loops(sample: str, tokenizer_dir: Path) -> bool:
    """Whether the sample's continuation repeats one token 4 times in a row ("to to to to")."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(sample[len(QUICKSTART_PROMPT):])["input_ids"]
    return any(len(set(ids[i:i + 4])) == 1 for i in range(len(ids) - 3))


@pytest.mark.smollm2
def test_quickstart_config_runs_as_shipped(tmp_path, smollm2_dir):
    """The main job shortened to 12 steps (its 10 warmup steps, then the decay): raw corpus from data/,
    tokenizer prepared on first use. The loss falls from ln(49152) = 10.8 (a uniform guess over the
    vocabulary) to below 6 (4.18 measured with 4-sequence steps at lr 6e-3; 4.35 with the earlier 8-sequence steps)."""
    out = tmp_path / "quickstart"
    recs = run_quickstart(out, "--train.steps", "12", "--train.sample_max_new_tokens", "8")
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert recs[0]["loss"] > 10.5 and recs[-1]["loss"] < 6.0, [r["loss"] for r in recs]
    assert (out / "checkpoints" / "step-12" / "COMMITTED").is_file() and (out / "loss.png").is_file()
    sample = (out / "sample.txt").read_text()
    assert sample.startswith(QUICKSTART_PROMPT) and sample.strip() != QUICKSTART_PROMPT


def words_outside_the_corpus(words: list[str]) -> list[str]:
    """The words that do not occur in the shipped corpus: a sample that reads like the corpus uses its words
    ("Milo gave 16 keys to Sami"), an undertrained one makes up its own ("Cle Cle Noranaanaana", "La meto ...
    Nowo has 12 marbles ando": 5 of 19 and 5 of 21 words)."""
    corpus = Path(__file__).resolve().parents[2] / "data" / "tiny_corpus.jsonl"
    known = {word for line in corpus.read_text().splitlines() for word in re.findall(r"[A-Za-z]+", json.loads(line)["text"])}
    return [word for word in words if word not in known]


@pytest.mark.slow
@pytest.mark.smollm2
def test_quickstart_as_shipped_ends_with_a_sample_that_reads_like_the_corpus(tmp_path, smollm2_dir):
    """The whole main job (200 steps, about 10 minutes on 2 idle cores): the loss ends below 1.5 (1.16 measured
    on one thread; the margin is for another thread count's float32 rounding over 200 steps), and the seeded
    sample is a dozen words or more, all of them the corpus's but at most one, none repeated 4 times in a row
    as greedy decoding of an earlier shape did ("... and said to to to to to")."""
    out = tmp_path / "quickstart"
    recs = run_quickstart(out, timeout=3600)  # one thread here: about twice a user's 2-core time
    assert recs[-1]["step"] == 200 and recs[-1]["loss"] < 1.5, [r["loss"] for r in recs][-10:]
    sample = (out / "sample.txt").read_text()
    assert sample.startswith(QUICKSTART_PROMPT) and not loops(sample, smollm2_dir), sample
    words = re.findall(r"[A-Za-z]+", sample[len(QUICKSTART_PROMPT):])
    assert len(words) >= 12 and len(words_outside_the_corpus(words)) <= 1, sample


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tiny, tmp_path):
    eager = meshtron_train(tiny, tmp_path / "eager")
    compiled = meshtron_train(tiny, tmp_path / "compiled", "--train.compile", "true")  # ~40 s of inductor on CPU
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert [r["loss"] for r in records(tmp_path / "compiled")] == pytest.approx(
        [r["loss"] for r in records(tmp_path / "eager")], rel=1e-4)


def test_moe_flavor_trains_with_its_load_balancing_loss(tmp_path):
    """configs/moe_debug.toml (mixtral:debug, load-balancing loss weighted 0.01) lowers the loss and logs the
    router metrics; with the weight at 0 the first step's gradient differs (the loss reaches the router)."""
    config = Path(__file__).resolve().parents[2] / "configs" / "moe_debug.toml"
    result = meshtron_train(config, tmp_path / "aux")
    assert result.returncode == 0, result.stderr
    recs = records(tmp_path / "aux")
    assert recs[-1]["loss"] < recs[0]["loss"]
    # At perfect balance the loss is num_experts_per_token (2); it cannot be below that.
    assert all(2.0 <= r["moe_aux_loss"] < 2.5 and r["moe_load_max"] >= 1.0 >= r["moe_load_min"] for r in recs)
    assert all(r["moe_dropped"] == 0 for r in recs)  # dropless
    # Each expert's share over the mean: 4 experts, mean 1, bounded by the busiest and idlest.
    assert all(len(r["moe_expert_load"]) == 4 and sum(r["moe_expert_load"]) == pytest.approx(4.0, abs=1e-3)
               and max(r["moe_expert_load"]) == pytest.approx(r["moe_load_max"], abs=1e-4) for r in recs)
    assert all(r["moe_z_loss"] > 0 for r in recs)  # logged, though its weight is 0 here
    assert (tmp_path / "aux" / "expert_load.png").stat().st_size > 0
    result = meshtron_train(config, tmp_path / "no_aux", "--train.steps", "1", "--moe.aux_loss_coef", "0")
    assert result.returncode == 0, result.stderr
    first = records(tmp_path / "no_aux")[0]
    assert first["loss"] == recs[0]["loss"] and first["grad_norm"] != recs[0]["grad_norm"]
