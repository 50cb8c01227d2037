"""Benchmark tasks by name."""

from meshtron.errors import UserError
from meshtron.eval.tasks.agieval import AGIEval
from meshtron.eval.tasks.base import ChoiceItem, GenItem, Task
from meshtron.eval.tasks.bbh import BBH
from meshtron.eval.tasks.boolq import BoolQ
from meshtron.eval.tasks.ceval import CEval
from meshtron.eval.tasks.humaneval import HumanEval
from meshtron.eval.tasks.mmlu import MMLU

TASKS: dict[str, type[Task]] = {t.name: t for t in (MMLU, CEval, BoolQ, BBH, AGIEval, HumanEval)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "ChoiceItem", "GenItem", "Task", "get_task"]
