"""Run tasks against a model, data-parallel across ranks when launched with torchrun.

Items are dealt round-robin to ranks (item i to rank i % world), each rank scores its share,
and rank 0 gathers the per-item scores back into the original order, so the scores do not
depend on the number of ranks.
"""

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from meshtron.errors import UserError
from meshtron.eval.lm import EvalLM
from meshtron.eval.results import TaskResult, execution_result, make_report
from meshtron.eval.sandbox import Limits, choose_sandbox
from meshtron.eval.tasks import ChoiceItem, GenItem, Task, get_task
from meshtron.eval.tasks.humaneval import HumanEval

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    shots: int | None = None  # None: each task's default
    limit: int | None = None  # per subtask (MMLU subject, BBH task, ...)
    mode: str | None = None  # scoring mode; None: each task's default
    chat_template: bool = False
    batch_size: int = 8
    num_samples: int = 1  # HumanEval completions per problem (pass@k for k <= n)
    temperature: float = 0.0  # for HumanEval sampling when num_samples > 1
    max_new_tokens: int | None = None  # caps every task's generation budget
    seed: int = 1234
    tp: int = 1  # tensor-parallel degree under torchrun (the rest of the processes are data-parallel)
    timeout: float = 10.0  # seconds for each generated program (HumanEval)
    no_sandbox: bool = False  # run generated code unconfined (only for code the user trusts)


@dataclass
class Layout:
    """Where this process sits: its data-parallel rank among dp_size, and a TP mesh if any."""

    dp_rank: int = 0
    dp_size: int = 1
    tp_mesh: object = None
    device: torch.device | None = None
    dp_group: object = None  # None: the default group


def init_distributed(tp: int = 1) -> Layout:
    """Join the torchrun process group (if any) and split it into data-parallel x tensor-parallel."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp < 1 or world % tp:
        raise UserError(f"--tp {tp} does not divide the {world} launched processes; launch a multiple of {tp}")
    if world == 1:
        return Layout()
    from meshtron.infer.tp import join_process_group

    device = join_process_group()
    if tp == 1:
        return Layout(dist.get_rank(), world, None, device, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return Layout(mesh["dp"].get_local_rank(), world // tp, mesh["tp"], device, mesh["dp"].get_group())


def _gather(local: list, layout: Layout, total: int) -> list:
    if layout.dp_size == 1:
        return local
    parts: list = [None] * layout.dp_size
    dist.all_gather_object(parts, local, group=layout.dp_group)
    merged = [None] * total
    for r, part in enumerate(parts):
        for j, value in enumerate(part):
            merged[r + j * layout.dp_size] = value
    return merged


def resolve_mode(task: Task, mode: str | None) -> str:
    if mode is None or mode in task.modes:
        return mode or task.modes[0]
    if len(task.modes) == 1:
        log.warning("%s is scored only by %s; --scoring %s does not apply to it", task.name, task.modes[0], mode)
        return task.modes[0]
    raise UserError(f"{task.name} cannot be scored by {mode!r}; choose from {', '.join(task.modes)}")


@dataclass
class PreparedTask:
    task: Task
    mode: str
    shots: int
    items: list


def prepare_task(task: Task, data_dir: Path | None, settings: EvalSettings) -> PreparedTask:
    """Read and check a task's data (before any model is loaded, so data errors come first)."""
    mode = resolve_mode(task, settings.mode)
    shots = task.default_shots if settings.shots is None else settings.shots
    items = task.load(data_dir, shots, settings.limit, mode)
    if not items:
        raise UserError(f"{task.name}: the data holds no items to evaluate")
    return PreparedTask(task, mode, shots, items)


def run_task(lm: EvalLM, prepared: PreparedTask, settings: EvalSettings, layout: Layout | None = None) -> TaskResult:
    layout = layout or Layout()
    task, items = prepared.task, prepared.items
    repeats = settings.num_samples if prepared.mode == "execution" else 1
    work = [(i, r) for i in range(len(items)) for r in range(repeats)]
    mine = work[layout.dp_rank :: layout.dp_size]
    start = time.monotonic()
    local = _score(lm, task, [items[i] for i, _ in mine], settings)
    scored = _gather(local, layout, len(work))
    log.info("%s: %d items scored in %.1fs", task.name, len(work), time.monotonic() - start)
    if prepared.mode == "execution":
        records = [{"task_id": items[i].extra["problem"]["task_id"], "completion": task.completion(items[i], text),
                    "passed": score == 1.0} for (i, _), (score, text) in zip(work, scored)]
        return execution_result(task, records, task.sandbox)
    return _aggregate(task, items, [score for score, _ in scored], prepared.shots, prepared.mode)


def _score(lm: EvalLM, task: Task, items: list, settings: EvalSettings) -> list[tuple[float, str | None]]:
    """(score, generated text or None) per item."""
    scores: list[tuple[float, str | None] | None] = [None] * len(items)
    choice_idx = [i for i, it in enumerate(items) if isinstance(it, ChoiceItem)]
    gen_idx = [i for i, it in enumerate(items) if isinstance(it, GenItem)]
    if choice_idx:
        requests = [(items[i].context, c) for i in choice_idx for c in items[i].choices]
        loglik = [ll for ll, _ in lm.loglikelihood(requests)]
        pos = 0
        for i in choice_idx:
            n = len(items[i].choices)
            chosen = max(range(n), key=lambda j: loglik[pos + j])
            scores[i] = (float(chosen == items[i].gold), None)
            pos += n
    # Generation items are grouped by their stop strings and budget so that they batch together.
    groups: dict[tuple, list[int]] = {}
    for i in gen_idx:
        budget = min(items[i].max_new_tokens, settings.max_new_tokens or items[i].max_new_tokens)
        groups.setdefault((tuple(items[i].stop), budget), []).append(i)
    for (stop, max_new), idx in groups.items():
        texts = lm.generate_until([items[i].prompt for i in idx], list(stop), max_new,
                                  temperature=settings.temperature, seed=settings.seed)
        for i, text in zip(idx, texts):
            scores[i] = (task.score_generation(items[i], text), text)
    return scores


def _aggregate(task, items, scores, shots, mode) -> TaskResult:
    by_subtask: dict[str, list[float]] = {}
    for item, score in zip(items, scores):
        by_subtask.setdefault(item.subtask, []).append(score)
    subtasks = {name: {"score": sum(rows) / len(rows), "n": len(rows)} for name, rows in by_subtask.items()}
    return TaskResult(task.name, "acc", sum(scores) / len(scores), len(items), shots, mode, task.method[mode], subtasks)


def check_window(seq_length: int, context: int) -> None:
    """A perplexity window is one forward: beyond the model's context its attention grows with the
    square of a length the model never saw, so it is refused before anything is allocated."""
    if not 1 <= seq_length <= context:
        raise UserError(f"--seq-length {seq_length} must be between 1 and the model's context length {context} "
                        "(max_position_embeddings); lower --seq-length")


def evaluate(model_path: str, task_names: list[str], data_dir: str | None, settings: EvalSettings,
             dtype: str = "auto", seq_length: int = 1024) -> dict | None:
    """Evaluate; returns the report on rank 0 (None on other ranks)."""
    from meshtron.eval.perplexity import perplexity, resolve_prefix
    from meshtron.infer.loading import load_for_generation

    # Everything a user can get wrong is checked before the model loads.
    tasks = [None if name == "perplexity" else get_task(name) for name in task_names]
    if data_dir is None and any(t is None or t.name != "humaneval" for t in tasks):
        raise UserError("--data-dir is required for every task but humaneval")
    if None in tasks:
        if len(tasks) > 1:
            raise UserError("perplexity reads --data-dir as a dataset prefix; evaluate it in a run of its own")
        resolve_prefix(data_dir)
    elif data_dir is not None and not Path(data_dir).is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    root = Path(data_dir) if data_dir else None
    prepared = [None if task is None else prepare_task(task, root, settings) for task in tasks]
    for task in tasks:
        if isinstance(task, HumanEval):
            task.limits = Limits(timeout=settings.timeout)
            task.sandbox = choose_sandbox(settings.no_sandbox)
    layout = init_distributed(settings.tp)
    loaded = load_for_generation(model_path, dtype=dtype, device=layout.device, tp_mesh=layout.tp_mesh)
    if None in tasks:
        check_window(seq_length, loaded.model.args.max_seq_len)
    lm = EvalLM(loaded, settings.batch_size, settings.chat_template)
    results = [
        perplexity(lm, data_dir, seq_length, settings.limit, layout) if p is None
        else run_task(lm, p, settings, layout)
        for p in prepared
    ]
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    world_size = layout.dp_size * (layout.tp_mesh.size() if layout.tp_mesh is not None else 1)
    return make_report(results, model=str(model_path), world_size=world_size, tp=settings.tp,
                       chat_template=settings.chat_template, limit=settings.limit)


