"""The CLI as a user runs it: --help, and one clear line (no traceback) for bad model directories."""

import json
import subprocess
import sys

import pytest
import torch

from meshtron.cli import SUBCOMMANDS


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "meshtron", *args], capture_output=True, text=True)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ["assets", "preprocess", "train", "convert", "generate", "chat", "serve", "eval"]:
        assert name in SUBCOMMANDS
        assert name in result.stdout


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
                      "'gpt2'", "llama, mistral, qwen2, qwen3")


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
