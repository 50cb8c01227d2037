"""What `data.paths` of a train config accepts: preprocessed prefixes of every data kind, and raw files
preprocessed once into the run directory with a handler per file (`data.handlers`) and
`data.skip_bad_lines`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshtron.config import load_config
from meshtron.errors import UserError
from meshtron.train.data import build_training_dataset

pytestmark = pytest.mark.smollm2

REPO = Path(__file__).resolve().parents[2]
ALPACA = [{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)]
SHAREGPT = [{"conversations": [{"from": "human", "value": f"Count to {i}."},
                               {"from": "gpt", "value": " ".join(map(str, range(1, i + 1)))}]} for i in range(1, 5)]


def write_jsonl(path: Path, records, extra: bytes = b"") -> Path:
    path.write_bytes("".join(json.dumps(r) + "\n" for r in records).encode() + extra)
    return path


def dataset(tmp_path, smollm2_dir, paths, recipe="sft", data_kind="sft", **data):
    table = "".join(f"{key} = {json.dumps(value) if not isinstance(value, dict) else _inline(value)}\n"
                    for key, value in {"paths": [str(p) for p in paths], **data}.items())
    config_file = tmp_path / "job.toml"
    config_file.write_text(f"[data]\n{table}[train]\nrecipe = \"{recipe}\"\nseq_length = 256\n"
                           f"output_dir = \"{tmp_path / 'run'}\"\n")
    config = load_config(config_file)
    handler = {"sft": "alpaca", "pairwise": "pairwise"}[data_kind]
    return build_training_dataset(config, config.data.paths, [], data_kind=data_kind, default_handler=handler,
                                  tokenizer_dir=smollm2_dir, config_dir=None)


def _inline(table: dict) -> str:
    return "{" + ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items()) + "}"


def test_alpaca_and_sharegpt_files_in_one_run(tmp_path, smollm2_dir):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    sharegpt = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    mixed = dataset(tmp_path, smollm2_dir, [alpaca, sharegpt], handlers={str(sharegpt): "sharegpt"})
    # Packed into 256-token rows: the blend holds one dataset per file, each with its samples.
    assert [d.ids.sequence_lengths.size for d in mixed.datasets] == [len(ALPACA), len(SHAREGPT)]
    # The cached sft prefix, given to a pairwise recipe, is named for what it is.
    sft_prefix = str(next((tmp_path / "run" / "data").glob("chats-sharegpt-*_packed_labels_document.bin")))
    with pytest.raises(UserError, match="holds sft data, but the dpo recipe trains on pairwise data"):
        dataset(tmp_path, smollm2_dir, [sft_prefix.removesuffix(".bin")], recipe="dpo", data_kind="pairwise")


def test_a_handler_keyed_by_a_path_that_is_not_used_is_refused(tmp_path, smollm2_dir):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA)
    with pytest.raises(UserError, match="data.handlers names 'typo.jsonl', which is in neither"):
        dataset(tmp_path, smollm2_dir, [alpaca], handlers={"typo.jsonl": "sharegpt"})


def test_skip_bad_lines_from_the_config(tmp_path, smollm2_dir):
    raw = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA, extra=b'{"instruction": "oops"\n')
    with pytest.raises(UserError, match="alpaca.jsonl:7: malformed JSON.*set data.skip_bad_lines = true"):
        dataset(tmp_path, smollm2_dir, [raw])
    assert dataset(tmp_path, smollm2_dir, [raw], skip_bad_lines=True).ids.sequence_lengths.size == len(ALPACA)


def test_pairwise_prefixes_and_raw_files_are_accepted_and_raw_files_preprocessed_once(tmp_path, smollm2_dir):
    raw = REPO / "data" / "preferences_heldout.jsonl"
    prefix = tmp_path / "prefs"
    subprocess.run([sys.executable, "-m", "meshtron", "preprocess", "--input", str(raw), "--handler", "pairwise",
                    "--tokenizer", str(smollm2_dir), "--output-prefix", str(prefix), "--seq-length", "256"],
                   check=True, capture_output=True)
    num_pairs = sum(1 for line in raw.read_text().splitlines() if line.strip())
    for given in (prefix, f"{prefix}_packed_chosen_input_ids_document"):
        assert len(dataset(tmp_path, smollm2_dir, [given], recipe="dpo", data_kind="pairwise")) == num_pairs

    assert len(dataset(tmp_path, smollm2_dir, [raw], recipe="dpo", data_kind="pairwise")) == num_pairs
    cached = sorted((tmp_path / "run" / "data").glob("*.bin"))
    assert cached
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert len(dataset(tmp_path, smollm2_dir, [raw], recipe="dpo", data_kind="pairwise")) == num_pairs
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "run" / "data").glob("*.bin"))] == stamps
