"""Bad inputs to generate end in one line naming the problem, never a traceback."""

import os
import shutil

import pytest
from launch import run_meshtron


def generate(model, prompt="Hello"):
    return run_meshtron(["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "2"], timeout=300,
                        env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line_error(result, *words):
    last = result.stderr.strip().splitlines()[-1]
    return result.returncode == 2 and "Traceback" not in result.stderr and all(w in last for w in words)


def test_an_empty_prompt(tiny_llama_dir):
    assert one_line_error(generate(tiny_llama_dir, prompt=""), "--prompt '' encodes to no tokens")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_safetensors_file_is_named(tiny_llama_dir, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = model / "model.safetensors"
    weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[: weights.stat().st_size // 2])
    assert one_line_error(generate(model), f"{weights} is not a complete safetensors file")
