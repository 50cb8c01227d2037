"""`meshtron preprocess` end to end, as a user runs it: outputs, packing, workers, bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from meshtron.cli import main
from meshtron.data import indexed
from meshtron.data.loader import build_dataset
from meshtron.data.sources import plan_units

pytestmark = pytest.mark.smollm2


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["preprocess", *map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def alpaca_records(n):
    return [{"instruction": f"Spell the number {i}.", "output": " ".join(str(i)) * (1 + i % 5)} for i in range(n)]


GOOD = b'{"text": "A good line."}\n'
BAD_INPUTS = {
    "malformed": (GOOD + b'{"text": "oops"\n', "bad.jsonl:2: malformed JSON"),
    "missing": (GOOD + b'{"body": "no text field"}\n', "bad.jsonl:2: missing field 'text'"),
    "empty_text": (GOOD + b'{"text": "   "}\n', "bad.jsonl:2: empty text in field 'text'"),
    "utf8": (GOOD + b'{"text": "caf\xe9"}\n', "bad.jsonl:2: not valid UTF-8 (byte 0xe9"),
    "empty_file": (b"", "bad.jsonl:1: file is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_with_file_and_line(tmp_path, capsys, smollm2_dir, case):
    content, message = BAD_INPUTS[case]
    (tmp_path / "bad.jsonl").write_bytes(content)
    code, err = cli(capsys, "--input", tmp_path / "bad.jsonl", "--handler", "pretrain", "--tokenizer", smollm2_dir,
                    "--output-prefix", tmp_path / "out" / "x")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("meshtron preprocess: error: ") and message in last, err
    assert "Traceback" not in err
    # Nothing that looks finished, and no temporary files left behind.
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_unknown_handler(tmp_path, capsys, smollm2_dir):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    code, err = cli(capsys, "--input", tmp_path / "a.jsonl", "--handler", "nope", "--tokenizer", smollm2_dir,
                    "--output-prefix", tmp_path / "x")
    assert code == 2 and "unknown handler 'nope'; choose one of pretrain, alpaca" in err and "Traceback" not in err


def test_the_example_model_name_is_a_tokenizer(tmp_path, capsys, smollm2_dir, smollm2_tokenizer):
    """`--tokenizer smollm2`, as configs accept it: the same tokens as the directory."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": "Hello there, tokenizer."}])
    code, err = cli(capsys, "--input", tmp_path / "a.jsonl", "--handler", "pretrain", "--tokenizer", "smollm2",
                    "--output-prefix", tmp_path / "x")
    assert code == 0, err
    tokens = indexed.IndexedDataset(str(tmp_path / "x_text_document"))[0]
    assert tokens.tolist() == smollm2_tokenizer("Hello there, tokenizer.")["input_ids"]


def test_skip_bad_lines_counts_them(tmp_path, capsys, smollm2_dir):
    (tmp_path / "bad.jsonl").write_bytes(b"".join(content for content, _ in BAD_INPUTS.values()) + GOOD)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    code, err = cli(capsys, "--input", tmp_path / "bad.jsonl", tmp_path / "empty.jsonl", "--handler", "pretrain",
                    "--tokenizer", smollm2_dir, "--output-prefix", tmp_path / "x", "--skip-bad-lines")
    assert code == 0, err
    assert "skipped lines: 5" in err
    for kind in ("malformed JSON: 1", "missing field 'text': 1", "empty text in field 'text': 1",
                 "not valid UTF-8: 1", "file is empty: 1"):
        assert kind in err, err
    assert indexed.IndexedDataset(str(tmp_path / "x_text_document")).num_documents == 5


def test_packing_keeps_every_sample_once_with_boundaries(tmp_path, capsys, smollm2_dir):
    src = write_jsonl(tmp_path / "sft.jsonl", alpaca_records(80))
    common = ["--input", src, "--handler", "alpaca", "--tokenizer", smollm2_dir, "--seq-length", 96]
    assert cli(capsys, *common, "--output-prefix", tmp_path / "plain")[0] == 0
    code, err = cli(capsys, *common, "--pack", "--output-prefix", tmp_path / "packed")
    assert code == 0 and "packed into" in err and "pad ratio at --seq-length 96" in err
    plain = indexed.IndexedDataset(str(tmp_path / "plain_packed_input_ids_document"))
    packed = indexed.IndexedDataset(str(tmp_path / "packed_packed_input_ids_document"))
    mask = indexed.IndexedDataset(str(tmp_path / "packed_packed_attention_mask_document"))
    assert packed.num_documents < plain.num_documents == 80
    samples = sorted(tuple(plain[i].tolist()) for i in range(len(plain)))
    assert sorted(tuple(packed[i].tolist()) for i in range(len(packed))) == samples
    for doc in range(packed.num_documents):
        assert len(packed.document(doc)) <= 96
        seqs = packed.document_sequences(doc)
        expected = np.concatenate([np.full(packed.sequence_lengths[s], n) for n, s in enumerate(seqs, 1)])
        np.testing.assert_array_equal(mask.document(doc), expected)
    # The loader's document ids give back each sample of a pack.
    rows = build_dataset([str(tmp_path / "packed")], None, 96, "sft", seed=0)
    recovered = []
    for i in range(len(rows)):
        row = rows[i]
        for d in range(len(packed.document_sequences(i))):  # ids past these are padding
            recovered.append(tuple(row["input_ids"][row["document_ids"] == d].tolist()))
    assert sorted(recovered) == samples


@pytest.mark.parametrize("handler,records,extra", [
    ("pretrain", [{"text": f"Document number {i}. " * (i % 9 + 1)} for i in range(3000)], ["--append-eod"]),
    ("alpaca", alpaca_records(1500), ["--seq-length", "64", "--pack"]),
])
def test_two_workers_write_the_same_bytes(tmp_path, capsys, smollm2_dir, handler, records, extra):
    src = write_jsonl(tmp_path / "in.jsonl", records)
    assert len(plan_units([str(src)], 2)[0]) == 2  # the file is really split between the workers
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        code, err = cli(capsys, "--input", src, "--handler", handler, "--tokenizer", smollm2_dir,
                        "--output-prefix", prefix, "--workers", workers, *extra)
        assert code == 0, err
        outputs[workers] = {p.name.removeprefix(f"w{workers}"): p.read_bytes()
                            for p in sorted(tmp_path.glob(f"w{workers}_*"))}
    assert outputs[1] and outputs[1] == outputs[2]


def test_console_script_progress_and_summary(tmp_path, smollm2_dir):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "corpus.txt").write_text("".join(f"Line {i} of a plain text corpus.\n" for i in range(200)))
    result = subprocess.run(
        [sys.executable, "-m", "meshtron", "preprocess", "--input", str(tmp_path / "in"), "--handler", "pretrain",
         "--tokenizer", str(smollm2_dir), "--output-prefix", str(tmp_path / "out" / "c"), "--append-eod",
         "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr and "tokens/s" in result.stderr
    assert "200 samples" in result.stderr and "skipped lines: 0" in result.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["c_text_document.bin", "c_text_document.idx"]


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path, capsys, smollm2_dir, monkeypatch):
    from meshtron.data.handlers.pretrain import PretrainHandler

    calls = []
    original = PretrainHandler.encode_batch

    def interrupt_on_second_batch(self, records):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, records)

    monkeypatch.setattr(PretrainHandler, "encode_batch", interrupt_on_second_batch)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"doc {i}"} for i in range(1000)])
    code, err = cli(capsys, "--input", src, "--handler", "pretrain", "--tokenizer", smollm2_dir,
                    "--output-prefix", tmp_path / "out" / "x")
    assert code == 130 and "interrupted" in err
    assert os.listdir(tmp_path / "out") == []


def test_several_json_keys_write_one_dataset_each(tmp_path, capsys, smollm2_dir, smollm2_tokenizer):
    src = write_jsonl(tmp_path / "in.jsonl", [{"title": f"Title {i}", "body": f"Body text {i}."} for i in range(5)])
    code, err = cli(capsys, "--input", src, "--handler", "pretrain", "--tokenizer", smollm2_dir,
                    "--output-prefix", tmp_path / "x", "--json-keys", "title", "body")
    assert code == 0, err
    for key, text in (("title", "Title 3"), ("body", "Body text 3.")):
        ds = indexed.IndexedDataset(str(tmp_path / f"x_{key}_document"))
        assert len(ds) == 5 and ds[3].tolist() == smollm2_tokenizer(text)["input_ids"]


def test_pack_is_refused_for_pretrain_and_ignored_for_pairwise(tmp_path, capsys, caplog, smollm2_dir):
    src = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "2+2?", "chosen": "4", "rejected": "5", "text": "x"}])
    common = ["--input", src, "--tokenizer", smollm2_dir, "--seq-length", 64, "--pack"]
    code, err = cli(capsys, *common, "--handler", "pretrain", "--output-prefix", tmp_path / "a")
    assert code == 2 and "--pack applies to SFT data" in err
    code, err = cli(capsys, *common, "--handler", "pairwise", "--output-prefix", tmp_path / "b")
    assert code == 0 and "--pack is ignored for pairwise" in caplog.text
    assert indexed.exists(str(tmp_path / "b_packed_rejected_labels_document"))


def test_existing_outputs_are_replaced_only_with_force(tmp_path, capsys, smollm2_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "first corpus"}])
    common = ["--input", src, "--handler", "pretrain", "--tokenizer", smollm2_dir, "--output-prefix", tmp_path / "x"]
    assert cli(capsys, *common)[0] == 0
    before = (tmp_path / "x_text_document.bin").read_bytes()
    write_jsonl(src, [{"text": "a second, longer corpus"}])
    code, err = cli(capsys, *common)
    assert code == 2 and "x_text_document.bin" in err and "--force" in err and "Traceback" not in err
    assert (tmp_path / "x_text_document.bin").read_bytes() == before
    assert cli(capsys, *common, "--force")[0] == 0
    assert (tmp_path / "x_text_document.bin").read_bytes() != before
