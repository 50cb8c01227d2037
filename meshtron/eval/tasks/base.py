"""What a benchmark task is: items to score, how they are scored, and careful file reading."""

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from meshtron.errors import UserError

LETTERS = "ABCDEFGHIJ"


@dataclass
class ChoiceItem:
    """Scored by log-likelihood: the choice with the highest summed log-prob is the answer."""

    subtask: str
    context: str
    choices: list[str]  # continuations, e.g. [" A", " B", " C", " D"]
    gold: int


@dataclass
class GenItem:
    """Scored by generating after `prompt` (greedy) and comparing with `target` (or executing)."""

    subtask: str
    prompt: str
    target: str
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 32
    extra: dict = field(default_factory=dict)


class Task:
    name: str = ""
    modes: tuple[str, ...] = ("loglikelihood",)  # the first is the default
    default_shots: int = 0
    # One line per mode for the report: how the score is made.
    method: dict[str, str] = {}

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str) -> list:
        raise NotImplementedError

    def score_generation(self, item: GenItem, text: str) -> float:
        return float(normalize(text) == normalize(item.target))


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def require_files(data_dir: Path, pattern: str, task: str, hint: str) -> list[Path]:
    if not data_dir.is_dir():
        raise UserError(f"{task}: data directory {data_dir} does not exist ({hint})")
    files = sorted(p for p in data_dir.glob(pattern) if p.is_file())
    if not files:
        raise UserError(f"{task}: no files matching {pattern} in {data_dir} ({hint})")
    return files


def read_csv(path: Path, num_columns: int, header: bool) -> list[list[str]]:
    """Rows of a CSV file with exactly `num_columns` columns (extra trailing columns are kept)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e})") from None
    start = 1 if header else 0
    for lineno, row in enumerate(rows[start:], start + 1):
        if len(row) < num_columns:
            raise UserError(f"{path}:{lineno}: expected {num_columns} columns, found {len(row)}")
    return rows[start:]


def read_jsonl(path: Path) -> list[dict]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object")
                rows.append(row)
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    return rows


def require_keys(row: dict, keys: tuple[str, ...], path: Path, lineno: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise UserError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")


def task_dir(data_dir: Path, name: str) -> Path:
    """A task reads DIR/<task>/ when it exists, else DIR itself (so one task can point straight at its files)."""
    sub = data_dir / name
    return sub if sub.is_dir() else data_dir
