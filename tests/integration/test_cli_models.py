"""The CLI as a user runs it: --help, --version, and one clear line (no traceback) for bad model directories."""

import json
import re
from importlib import metadata
from pathlib import Path

import pytest
import torch

import meshtron.cli
from meshtron.cli import SUBCOMMANDS
from launch import run_meshtron


def run_cli(*args):
    return run_meshtron(args)


def test_help_lists_every_subcommand_module():
    """Every module of meshtron/cli is a subcommand, and `--help` lists each with its one-line help."""
    modules = {p.stem for p in Path(meshtron.cli.__file__).parent.glob("*.py") if p.stem != "__init__"}
    assert modules >= {"assets", "preprocess", "train", "convert", "generate", "chat", "serve", "eval", "score"}
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    listed = dict(re.findall(r"^    (\w+)\s+(\S.*)$", result.stdout, re.MULTILINE))
    assert set(listed) == modules
    for name in modules:
        assert SUBCOMMANDS[name].startswith(listed[name]), (name, listed[name])


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"meshtron {metadata.version('meshtron')}"


@pytest.mark.parametrize("command, flag, default", [
    ("generate", "--max-new-tokens", "256"), ("chat", "--max-new-tokens", "256"), ("serve", "--port", "8000"),
    ("serve", "--max-tokens", "1024"), ("eval", "--batch-size", "8"), ("eval", "--output", "eval_results/report.json"),
    ("score", "--batch-size", "8"), ("preprocess", "--step-separator", "'\\n\\n'"),
])
def test_help_states_defaults(command, flag, default):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    # argparse wraps the help text; the option's entry runs up to the next option.
    entry = re.search(rf"^  {flag}\b(.*?)(?=^  -)", result.stdout + "  -", re.MULTILINE | re.DOTALL).group(1)
    assert f"(default: {default})" in " ".join(entry.split()), entry


@pytest.fixture
def tiny_hf_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "m"))
    return tmp_path / "m"


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_directory_without_config(tmp_path):
    assert_user_error(run_cli("generate", "--model", str(tmp_path), "--prompt", "x"), "no config.json")


def test_missing_directory(tmp_path):
    assert_user_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "does not exist")


def test_unsupported_model_type(tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_hf_dir / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "x"),
                      "'gpt2'", "deepseek_v2, deepseek_v3, gemma2, gemma3_text, glm4, granite, internlm3, llama, "
                      "mistral, mixtral, olmo2, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe, smollm3, starcoder2")


def _rewrite_weights(path, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tiny_hf_dir):
    _rewrite_weights(tiny_hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_user_error(run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "x"),
                      "missing tensors", "model.layers.1.mlp.up_proj.weight")


def test_misshaped_tensor(tiny_hf_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)

    _rewrite_weights(tiny_hf_dir, shrink)
    assert_user_error(run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "x"),
                      "model.layers.0.self_attn.k_proj.weight", "(8, 32)", "(16, 32)")


def test_bad_sampling_flag(tiny_hf_dir):
    assert_user_error(run_cli("generate", "--model", str(tiny_hf_dir), "--prompt", "x", "--top-p", "0"), "top_p")


@pytest.mark.slow
def test_deepseek_v3_through_every_cli(tiny_deepseek_dir, eval_data_dir, tmp_path):
    """A tiny random DeepseekV3ForCausalLM (with SmolLM2's tokenizer) through the commands a user runs on it:
    convert to a checkpoint and back (the same tensors), sft and dpo for 2 steps, eval on a tiny benchmark, and
    generate (the greedy text of transformers' model)."""
    import os

    from safetensors.torch import load_file
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    repo = Path(__file__).resolve().parents[2]
    hf = tiny_deepseek_dir
    model = DeepseekV3ForCausalLM.from_pretrained(str(hf)).eval()

    env = dict(os.environ, OMP_NUM_THREADS="1")

    def meshtron(*args):
        result = run_meshtron(args, env=env, timeout=900, cwd=repo)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    meshtron("convert", "--input", hf, "--output", tmp_path / "native", "--to", "native")
    meshtron("convert", "--input", tmp_path / "native", "--output", tmp_path / "back")
    original, back = load_file(str(hf / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[k], t) for k, t in original.items())

    short = ["--model.name_or_path", hf, "--train.steps", "2", "--train.seq_length", "96", "--lr.warmup_steps", "0"]
    for recipe, config_file, metric in (("sft", "sft_full.toml", "loss"), ("dpo", "dpo.toml", "rewards/accuracy")):
        out = tmp_path / recipe
        meshtron("train", repo / "configs" / "smollm2" / config_file, "--train.output_dir", out, *short,
                 "--train.eval_interval", "0", "--checkpoint.save_final", "false")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if metric in r] == [1, 2], recipe

    meshtron("eval", "--model", hf, "--tasks", "boolq", "--data-dir", eval_data_dir, "--shots", "0",
             "--max-new-tokens", "4", "--output", tmp_path / "eval.json")
    assert json.loads((tmp_path / "eval.json").read_text())["results"]["boolq"]["n"] > 0

    prompt = "The capital of France is"
    text = meshtron("generate", "--model", hf, "--prompt", prompt, "--max-new-tokens", "6").stdout
    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert text.strip() == tokenizer.decode(expected[0, ids.shape[1]:]).strip()
