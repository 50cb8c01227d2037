"""Perplexity on an indexed dataset written by `meshtron preprocess` equals a direct transformers
computation over the same windows."""

import json
import math
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.smollm2


def test_perplexity_matches_transformers(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from meshtron.data.indexed import IndexedDataset

    docs = ["The cat sat on the mat. It was a sunny day and the cat was happy to be outside.",
            "Paris is the capital of France. Berlin is the capital of Germany.",
            "One two three four five six seven eight nine ten eleven twelve."]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prefix = tmp_path / "val"
    subprocess.run([sys.executable, "-m", "meshtron", "preprocess", "--input", str(tmp_path / "c.jsonl"),
                    "--handler", "pretrain", "--tokenizer", str(smollm2_dir), "--output-prefix", str(prefix),
                    "--append-eod"], check=True, capture_output=True)
    out = tmp_path / "ppl.json"
    seq = 8  # several windows per document
    subprocess.run([sys.executable, "-m", "meshtron", "eval", "--model", str(smollm2_dir), "--tasks", "perplexity",
                    "--data-dir", str(prefix), "--seq-length", str(seq), "--output", str(out), "--dtype", "float32"],
                   check=True, capture_output=True)
    result = json.loads(out.read_text())["results"]["perplexity"]

    hf = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    ds = IndexedDataset(f"{prefix}_text_document")
    nll, count = 0.0, 0
    for d in range(ds.num_documents):
        tokens = torch.tensor(ds.document(d).astype("int64"))
        for start in range(0, len(tokens) - 1, seq):
            window = tokens[start : start + seq + 1]
            with torch.no_grad():
                logprobs = hf(window[None, :-1]).logits[0].log_softmax(-1)
            nll -= logprobs.gather(1, window[1:, None]).sum().item()
            count += len(window) - 1
    assert result["extra"]["tokens"] == count
    assert result["score"] == pytest.approx(math.exp(nll / count), rel=1e-4)
