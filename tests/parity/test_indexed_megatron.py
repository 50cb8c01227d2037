"""Parity with Megatron-LM's own reader (megatron-core's IndexedDataset) and writer."""

import json
import warnings

import numpy as np
import pytest

from meshtron.data import indexed
from meshtron.data.handlers import HandlerOptions
from meshtron.data.preprocess import PreprocessConfig, preprocess

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    megatron = pytest.importorskip("megatron.core.datasets.indexed_dataset")

pytestmark = [pytest.mark.smollm2, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ünïcødé text, emoji 🙂 and numbers 12345 survive tokenization.",
    "A longer document. " * 40,
    "x",
]


@pytest.mark.parametrize("workers", [1, 2])
def test_megatron_reads_preprocess_output(tmp_path, smollm2_dir, smollm2_tokenizer, workers):
    src = tmp_path / "corpus.jsonl"
    # Enough lines that two workers each get a share of the file.
    texts = [f"{TEXTS[i % len(TEXTS)]} (copy {i})" for i in range(4000)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prefix = str(tmp_path / "out")
    preprocess(PreprocessConfig([str(src)], "pretrain", str(smollm2_dir), prefix,
                                HandlerOptions(append_eod=True), workers=workers))
    ds = megatron.IndexedDataset(f"{prefix}_text_document")
    assert len(ds) == len(texts)
    assert ds.index.dtype == np.uint16
    expected = smollm2_tokenizer(texts)["input_ids"]
    for i in range(len(texts)):
        assert ds[i].tolist() == expected[i] + [smollm2_tokenizer.eos_token_id]
    assert ds.document_indices.tolist() == list(range(len(texts) + 1))


def test_megatron_reads_packed_sft(tmp_path, smollm2_dir):
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"Repeat {i}", "output": str(i) * (i % 7 + 1)}) + "\n"
                           for i in range(50)))
    prefix = str(tmp_path / "sft")
    preprocess(PreprocessConfig([str(src)], "alpaca", str(smollm2_dir), prefix,
                                HandlerOptions(seq_length=128), pack=True))
    ids = megatron.IndexedDataset(f"{prefix}_packed_input_ids_document")
    labels = megatron.IndexedDataset(f"{prefix}_packed_labels_document")
    mine = indexed.IndexedDataset(f"{prefix}_packed_input_ids_document")
    assert len(ids) == 50 and labels.index.dtype == np.int32
    np.testing.assert_array_equal(ids.document_indices, mine.document_indices)
    for i in range(50):
        np.testing.assert_array_equal(ids[i], mine[i])
        assert (labels[i] == -100).any() and len(labels[i]) == len(ids[i])


def test_meshtron_reads_megatron_builder_output(tmp_path):
    import torch

    prefix = str(tmp_path / "mg")
    builder = megatron.IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    docs = [[3, 1, 4], [1, 5], [9, 2, 6, 5]]
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.add_document(torch.tensor([7, 7, 8]), [2, 1])
    builder.finalize(f"{prefix}.idx")
    ds = indexed.IndexedDataset(prefix)
    assert [ds[i].tolist() for i in range(len(ds))] == docs + [[7, 7], [8]]
    assert ds.document(3).tolist() == [7, 7, 8]
    with indexed.IndexedWriter(str(tmp_path / "mine"), np.int32) as w:
        for doc in docs:
            w.add_document([doc])
        w.add_document([[7, 7], [8]])
    assert (tmp_path / "mine.idx").read_bytes() == (tmp_path / "mg.idx").read_bytes()
    assert (tmp_path / "mine.bin").read_bytes() == (tmp_path / "mg.bin").read_bytes()
