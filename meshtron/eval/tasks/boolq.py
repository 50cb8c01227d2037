"""BoolQ (SuperGLUE): jsonl with question, passage, answer (true/false). Evaluated on
`dev.jsonl` (or `val.jsonl`); few-shot examples from `train.jsonl` when shots > 0."""

from pathlib import Path

from meshtron.errors import UserError
from meshtron.eval.tasks.base import ChoiceItem, Task, read_jsonl, require_keys, task_dir


def _prompt(row: dict) -> str:
    return f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"


class BoolQ(Task):
    name = "boolq"
    default_shots = 0
    method = {"loglikelihood": "acc: log-likelihood of ' no' vs ' yes' after 'Answer:' (lm-evaluation-harness)"}

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str):
        root = task_dir(data_dir, self.name)
        path = next((root / n for n in ("dev.jsonl", "val.jsonl", "validation.jsonl") if (root / n).is_file()), None)
        if path is None:
            raise UserError(f"boolq: no dev.jsonl or val.jsonl in {root} (the official BoolQ jsonl files)")
        rows = read_jsonl(path)
        for lineno, row in enumerate(rows, 1):
            require_keys(row, ("question", "passage", "answer"), path, lineno)
            if not isinstance(row["answer"], bool):
                raise UserError(f"{path}:{lineno}: 'answer' must be true or false")
        train = root / "train.jsonl"
        prefix = ""
        if shots and train.is_file():
            prefix = "".join(f"{_prompt(r)} {'yes' if r['answer'] else 'no'}\n\n" for r in read_jsonl(train)[:shots])
        return [ChoiceItem("boolq", prefix + _prompt(r), [" no", " yes"], int(r["answer"])) for r in rows[:limit]]
