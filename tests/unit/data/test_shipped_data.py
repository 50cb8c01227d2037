"""The datasets shipped in data/ preprocess cleanly with the handler each is meant for."""

import json
from pathlib import Path

import numpy as np
import pytest

from meshtron.data.handlers import HandlerOptions
from meshtron.data.loader import build_dataset
from meshtron.data.preprocess import PreprocessConfig, preprocess

DATA = Path(__file__).resolve().parents[3] / "data"
pytestmark = pytest.mark.smollm2


@pytest.mark.parametrize("name,handler,kind,num_samples", [
    ("tiny_corpus.jsonl", "pretrain", "pretrain", 4000),
    ("instructions.jsonl", "alpaca", "sft", 400),
    ("instructions_heldout.jsonl", "alpaca", "sft", 60),
    ("preferences.jsonl", "pairwise", "pairwise", 300),
    ("prm.jsonl", "prm", "sft", 300),
])
def test_shipped_data_preprocesses(tmp_path, smollm2_dir, name, handler, kind, num_samples):
    path = DATA / name
    assert path.stat().st_size < 2 << 20
    summary = preprocess(PreprocessConfig([str(path)], handler, str(smollm2_dir), str(tmp_path / "d"),
                                          HandlerOptions(append_eod=True, seq_length=256)))
    assert summary.stats.documents == num_samples and not summary.stats.skipped and not summary.stats.policy
    ds = build_dataset([str(tmp_path / "d")], None, 128, kind, seed=0)
    row = ds[0]
    labels = row["labels"] if kind != "pairwise" else row["chosen_labels"]
    assert (labels != -100).any()
    if handler == "prm":
        assert set(np.unique(labels)) <= {-100, 0, 1}
        meta = json.loads((tmp_path / "d_prm.json").read_text())
        assert meta["step_separator"] == "\n\n" and meta["step_separator_ids"]
