"""BIG-Bench Hard: one json per task, {"examples": [{"input", "target"}]}. Direct-answer
few-shot: the first `shots` examples of each task are the demonstrations and are not scored."""

import json
from pathlib import Path

from meshtron.errors import UserError
from meshtron.eval.tasks.base import GenItem, Task, require_files, task_dir


class BBH(Task):
    name = "bbh"
    modes = ("generate",)
    default_shots = 3
    method = {"generate": "exact match of the greedy answer (up to a blank line) with the target, direct answer"}

    def load(self, data_dir: Path, shots: int, limit: int | None, mode: str):
        root = task_dir(data_dir, self.name)
        items = []
        for path in require_files(root, "*.json", self.name, "one BBH task json per file"):
            try:
                examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
                pairs = [(e["input"], e["target"]) for e in examples]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}: not a BBH task file ({{'examples': [{{'input', 'target'}}]}}): {e}") from None
            demos = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in pairs[:shots])
            for question, target in pairs[shots:][:limit]:
                items.append(GenItem(path.stem, f"{demos}Q: {question}\nA:", target, stop=["\n\n", "\nQ:"],
                                     max_new_tokens=32))
        return items
