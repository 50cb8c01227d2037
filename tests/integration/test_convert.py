"""`meshtron convert` both ways: a training checkpoint becomes an HF directory that transformers
loads with the same logits, and an HF directory becomes a checkpoint that loads back unchanged."""

import os
import subprocess
import sys

import pytest
import torch

from meshtron.checkpoint import load_for_inference

CONFIG = """
[model]
name_or_path = "llama:debug"
args = { num_layers = 1 }
[data]
mock = true
[train]
steps = 2
global_batch_size = 2
micro_batch_size = 2
seq_length = 16
[log]
tensorboard = false
plot = false
"""


def meshtron(*args):
    result = subprocess.run([sys.executable, "-m", "meshtron", *map(str, args)], capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    (root / "c.toml").write_text(CONFIG)
    meshtron("train", root / "c.toml", "--train.output_dir", root / "run")
    return root / "run"


def test_checkpoint_to_hf_and_back(trained_run, tmp_path):
    from transformers import AutoModelForCausalLM

    meshtron("convert", "--input", trained_run, "--output", tmp_path / "hf")
    ours, _, _ = load_for_inference(trained_run)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)

    meshtron("convert", "--input", tmp_path / "hf", "--output", tmp_path / "native")  # --to native by default
    again, args, _ = load_for_inference(tmp_path / "native")
    assert args == ours.args
    for (name, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_convert_refuses_a_wrong_direction(trained_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "meshtron", "convert", "--input", str(trained_run), "--output",
                             str(tmp_path / "x"), "--to", "native"], capture_output=True, text=True)
    assert result.returncode == 2 and "--to native needs a Hugging Face directory" in result.stderr


@pytest.mark.smollm2
@pytest.mark.acceptance
def test_smollm2_round_trip_keeps_every_tensor_and_the_tokenizer(smollm2_dir, tmp_path):
    from safetensors.torch import load_file

    meshtron("convert", "--input", smollm2_dir, "--output", tmp_path / "native")
    meshtron("convert", "--input", tmp_path / "native", "--output", tmp_path / "hf")
    original, back = load_file(str(smollm2_dir / "model.safetensors")), load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(back) == set(original) - {"lm_head.weight"} or set(back) == set(original)
    for key, tensor in back.items():
        assert torch.equal(tensor, original[key]), key
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (smollm2_dir / "tokenizer.json").read_bytes()
