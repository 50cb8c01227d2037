"""`meshtron convert` both ways: a training checkpoint becomes an HF directory that transformers
loads with the same logits, and an HF directory becomes a checkpoint that loads back unchanged."""

import os

import pytest
import torch

from meshtron.checkpoint import load_for_inference
from launch import run_meshtron

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
    result = run_meshtron(args, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
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
    result = run_meshtron(["convert", "--input", trained_run, "--output", tmp_path / "x", "--to", "native"])
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


@pytest.fixture(scope="module")
def tiny_starcoder2_dir(smollm2_dir, tmp_path_factory):
    """A tiny random StarCoder2 (LayerNorm, GELU MLP, biases, a window) with SmolLM2's tokenizer (the same
    49152-token vocabulary size as StarCoder2's own), as an HF directory. A large init std makes its logits
    peaked, so greedy choices are not near-ties."""
    import shutil

    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    out = tmp_path_factory.mktemp("tiny-starcoder2")
    config = Starcoder2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.2,
                              bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    Starcoder2ForCausalLM(config).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(smollm2_dir / name, out / name)
    return out


def test_starcoder2_converts_both_ways_and_generates(tiny_starcoder2_dir, tmp_path):
    """A family with its own tensor names (c_fc / c_proj, LayerNorm biases) through `meshtron convert` both
    ways: every tensor comes back identical, and `meshtron generate` on the exported directory writes
    transformers' greedy continuation from the original one."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meshtron("convert", "--input", tiny_starcoder2_dir, "--output", tmp_path / "native", "--to", "native")
    meshtron("convert", "--input", tmp_path / "native", "--output", tmp_path / "hf")
    original, back = (load_file(str(d / "model.safetensors")) for d in (tiny_starcoder2_dir, tmp_path / "hf"))
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "starcoder2"

    prompt = "def fibonacci(n):"  # longer than the window of 4 tokens
    got = meshtron("generate", "--model", tmp_path / "hf", "--prompt", prompt, "--max-new-tokens", "8",
                   "--dtype", "float32").stdout
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_starcoder2_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_starcoder2_dir), dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert got.strip() and got == tokenizer.decode(expected) + "\n"
