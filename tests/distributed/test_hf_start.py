"""Training from a Hugging Face directory: the first loss is the HF model's own loss on that batch
(the pretrained weights were loaded, exactly), and the weights stream tensor by tensor into FSDP and
TP shards, so the first losses at every layout equal the single-process ones. Each rank reads only
what it keeps: half the bytes at dp_shard=2 or tp=2, only its own layers in a pipeline stage."""

import re

import pytest
from safetensors import safe_open
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from meshtron.train.data import MockDataLoader


def hf_loss_of_first_step(hf_dir, vocab_size: int, seq_length: int, micro_batch_size: int, micro_batches: int):
    """Loss of the HF model itself on the first step's mock batch: every packed document on its own
    (meshtron resets positions and attention at document boundaries), summed over the label tokens."""
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    loader = iter(MockDataLoader(vocab_size, seq_length, micro_batch_size, dp_rank=0, dp_size=1, seed=0))
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in (next(loader) for _ in range(micro_batches)):
            for ids, labels, docs in zip(batch["input_ids"], batch["labels"], batch["document_ids"]):
                for doc in docs.unique():
                    keep = docs == doc
                    logits = model(ids[keep][None]).logits[0]
                    loss_sum += F.cross_entropy(logits, labels[keep], ignore_index=-100, reduction="sum").item()
                    tokens += int((labels[keep] != -100).sum())
    return loss_sum / tokens


def bytes_read(stderr: str) -> dict[int, int]:
    """Rank -> bytes of weights it read, from the loader's log lines."""
    return {int(rank): int(n) for rank, n in re.findall(r"rank (\d+) read (\d+) bytes of weights", stderr)}


def file_bytes(hf_dir, keep=lambda name: True) -> int:
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return sum(t.numel() * t.element_size() for t in (f.get_tensor(k) for k in f.keys() if keep(k)))


@pytest.mark.parametrize("nproc, layout", [(2, ["--parallel.dp_shard", "2"]),
                                           (2, ["--parallel.tp", "2", "--parallel.dp_shard", "1"])],
                         ids=["fsdp2", "tp2"])
def test_hf_weights_stream_into_shards(run_train, tiny_config, hf_dir, tmp_path, nproc, layout):
    start = ["--model.name_or_path", str(hf_dir), "--train.steps", "2"]
    single_run, single = run_train(tiny_config, tmp_path / "single", overrides=start)
    sharded_run, sharded = run_train(tiny_config, tmp_path / "sharded", nproc=nproc, overrides=[*start, *layout])
    assert [r["loss"] for r in sharded] == pytest.approx([r["loss"] for r in single], rel=2e-5)
    # One process reads the whole file once; each of two ranks reads about half (tp replicates the norms).
    assert bytes_read(single_run.stderr) == {0: file_bytes(hf_dir)}
    per_rank = bytes_read(sharded_run.stderr)
    assert sorted(per_rank) == [0, 1]
    assert all(n <= 0.51 * file_bytes(hf_dir) for n in per_rank.values()), per_rank
    assert sum(per_rank.values()) >= file_bytes(hf_dir)
    # tiny_config: global batch 4 = 2 micro-batches of 2 sequences of 32 tokens; the HF model has 1024 tokens.
    assert single[0]["loss"] == pytest.approx(hf_loss_of_first_step(hf_dir, 1024, 32, 2, 2), rel=1e-5)


def test_pipeline_stages_read_only_their_layers(run_train, tiny_config, hf_dir, tmp_path):
    run, records = run_train(tiny_config, tmp_path / "piped", nproc=2, overrides=[
        "--model.name_or_path", str(hf_dir), "--train.steps", "1", "--parallel.pp", "2",
        "--train.micro_batch_size", "1"])
    first = file_bytes(hf_dir, lambda k: k.startswith(("model.embed_tokens.", "model.layers.0.")))
    last = file_bytes(hf_dir, lambda k: k.startswith(("model.layers.1.", "model.norm.", "lm_head.")))
    assert first + last == file_bytes(hf_dir)
    assert bytes_read(run.stderr) == {0: first, 1: last}
    assert records[0]["loss"] == pytest.approx(hf_loss_of_first_step(hf_dir, 1024, 32, 1, 4), rel=1e-5)


def test_seq_length_beyond_the_context_names_rope_scaling(run_train, tiny_config, hf_dir, tmp_path):
    result, _ = run_train(tiny_config, tmp_path / "run", check=False, overrides=[
        "--model.name_or_path", str(hf_dir), "--train.seq_length", "512"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert "train.seq_length 512 is above the model's context length 256" in last
    # The fix it names works on a pretrained model (model.args takes the context and its RoPE scaling).
    assert 'model.args = {max_seq_len = N, rope_scaling = {rope_type = "yarn", factor = N / 256, ' in last
    assert "original_max_position_embeddings = 256}}" in last
