"""AGIEval: one jsonl per task with passage, question, options, label (multiple choice) or
answer (cloze, options null). The first `shots` examples of a file are demonstrations."""

from pathlib import Path

from meshtron.errors import UserError
from meshtron.eval.tasks.base import LETTERS, ChoiceItem, GenItem, Task, read_jsonl, require_files, task_dir


def _question(row: dict) -> str:
    passage = (row.get("passage") or "").strip()
    text = (passage + "\n" if passage else "") + row["question"].strip() + "\n"
    for option in row.get("options") or []:
        text += option.strip() + "\n"
    return text + "Answer:"


def _answer(row: dict) -> str:
    return row["label"] if row.get("options") else str(row.get("answer", "")).strip()


class AGIEval(Task):
    name = "agieval"
    modes = ("loglikelihood",)
    default_shots = 0
    method = {
        "loglikelihood": "acc: multiple choice by log-likelihood of ' A'.. after 'Answer:'; cloze tasks by exact "
        "match of the greedy answer (first line)",
    }

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str):
        root = task_dir(data_dir, self.name)
        items = []
        for path in require_files(root, "*.jsonl", self.name, "one AGIEval task jsonl per file"):
            rows = read_jsonl(path)
            for lineno, row in enumerate(rows, 1):
                if "question" not in row or ("label" not in row and "answer" not in row):
                    raise UserError(f"{path}:{lineno}: missing field(s): needs question and label or answer")
            demos = "".join(f"{_question(r)} {_answer(r)}\n\n" for r in rows[:shots])
            for lineno, row in enumerate(rows[shots:][:limit], shots + 1):
                options = row.get("options")
                if options:
                    label = row.get("label")
                    if not isinstance(label, str) or label not in LETTERS[: len(options)]:
                        raise UserError(f"{path}:{lineno}: label {label!r} does not name one of the options")
                    choices = [f" {c}" for c in LETTERS[: len(options)]]
                    items.append(ChoiceItem(path.stem, demos + _question(row), choices, LETTERS.index(label)))
                else:
                    items.append(GenItem(path.stem, demos + _question(row), _answer(row), stop=["\n"],
                                         max_new_tokens=24))
        return items

    def score_generation(self, item, text):
        def clean(s):
            return s.strip().strip("$").replace(" ", "")

        return float(clean(text) == clean(item.target))
