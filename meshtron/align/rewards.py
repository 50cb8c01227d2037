"""Reward functions of the online RL recipes.

A reward function takes `(prompts, completions, **fields)` (lists, one entry per completion; the
fields are the prompt record's other fields, e.g. `answer`) and returns one float per completion.
Built-ins: `math`, `format`, `code` and `model`; any other name is a user function given by its
import path `module:function`. `rl.rewards` maps names to weights; the reward of a completion is
the weighted sum.
"""

import importlib
import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from meshtron.errors import UserError

BUILTIN_REWARDS = ("math", "format", "code", "model")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def boxed_or_last_number(text: str) -> str | None:
    """The final answer of a solution: the content of its last \\boxed{...}, else its last number."""
    start = text.rfind("\\boxed{")
    if start >= 0:
        depth, i = 1, start + len("\\boxed{")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text) -> float | None:
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def same_answer(given: str | None, expected) -> bool:
    """Numerically equal when both read as numbers, else equal as stripped text."""
    if given is None:
        return False
    a, b = _as_number(given), _as_number(expected)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    return given.strip() == str(expected).strip()


def _field(values: list | None, name: str) -> list:
    if values is None or any(v is None for v in values):
        raise ValueError(f"the prompt record has no {name!r} field")
    return values


def math_reward(prompts, completions, answer=None, **_) -> list[float]:
    """1.0 when the completion's final answer (\\boxed{} or last number) equals the `answer` field."""
    answer = _field(answer, "answer")
    return [float(same_answer(boxed_or_last_number(c), a)) for c, a in zip(completions, answer)]


def format_reward(pattern: str) -> Callable:
    """1.0 when the regular expression `pattern` matches the whole completion (re.DOTALL: `.` also
    matches newlines)."""
    regex = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, **_) -> list[float]:
        return [float(regex.fullmatch(c.strip()) is not None) for c in completions]

    return reward


def code_reward(sandbox: str, timeout: float) -> Callable:
    """1.0 when the completion's code (its markdown code block, if any) followed by the `tests` field
    (Python statements, e.g. asserts) exits 0 in the evaluation sandbox within `timeout` seconds."""
    from meshtron.eval.sandbox import Limits, run_program
    from meshtron.eval.tasks.humaneval import extract_code

    limits = Limits(timeout=timeout)

    def reward(prompts, completions, tests=None, **_) -> list[float]:
        tests = _field(tests, "tests")

        def one(pair):
            completion, test = pair
            return float(run_program(f"{extract_code(completion)}\n\n{test}\n", sandbox, limits).passed)

        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(one, zip(completions, tests)))

    return reward


def model_reward(run_dir: str, device: torch.device) -> Callable:
    """The score of a reward model (a run of the rm recipe) for the conversation prompt + completion."""
    from meshtron.align.score import score_conversations
    from meshtron.infer.loading import load_for_generation

    loaded = load_for_generation(run_dir, dtype="float32", device=device)
    if not getattr(loaded.model.args, "num_labels", 0):
        raise UserError(f"rl.reward_model = {run_dir!r} has no score head; give a run of the rm recipe")

    def reward(prompts, completions, **_) -> list[float]:
        conversations = [_messages(p) + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        return score_conversations(loaded.model, loaded.tokenizer, conversations)

    return reward


def _messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def import_reward(path: str) -> Callable:
    """A user function named by `module:function`."""
    module_name, _, name = path.partition(":")
    if not module_name or not name:
        raise UserError(f"rl.rewards: {path!r} is neither a built-in ({', '.join(BUILTIN_REWARDS)}) nor an import "
                        "path module:function")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"rl.rewards: cannot import {path!r}: {e}") from None
    if not callable(function):
        raise UserError(f"rl.rewards: {path!r} is not a function")
    return function


class Rewards:
    """The run's reward functions and weights; `score` gives every function's reward per completion."""

    def __init__(self, rl, device: torch.device):
        self.names, self.weights, self.functions = [], [], []
        for name, weight in rl.rewards.items():
            self.names.append(name)
            self.weights.append(float(weight))
            self.functions.append(self._build(name, rl, device))

    @staticmethod
    def _build(name: str, rl, device) -> Callable:
        if name == "math":
            return math_reward
        if name == "format":
            return format_reward(rl.format_pattern)
        if name == "code":
            from meshtron.eval.sandbox import choose_sandbox

            return code_reward(choose_sandbox(no_sandbox=not rl.code_sandbox), rl.code_timeout_s)
        if name == "model":
            if not rl.reward_model:
                raise UserError("rl.rewards names 'model': set rl.reward_model to the run directory of an rm run")
            return model_reward(rl.reward_model, device)
        return import_reward(name)

    def score(self, prompts: Sequence, completions: Sequence[str], fields: dict[str, list]) -> torch.Tensor:
        """(completions, functions) rewards, unweighted."""
        return torch.tensor([self._call(name, fn, prompts, completions, fields)
                             for name, fn in zip(self.names, self.functions)], dtype=torch.float32).T.contiguous()

    def total(self, per_function: torch.Tensor) -> torch.Tensor:
        return per_function @ torch.tensor(self.weights, dtype=per_function.dtype)

    @staticmethod
    def _call(name: str, fn: Callable, prompts, completions, fields) -> list[float]:
        try:
            values = [float(v) for v in fn(list(prompts), list(completions), **fields)]
        except Exception as e:
            raise UserError(f"reward {name!r} failed on sample {_failing_sample(fn, prompts, completions, fields)}: "
                            f"{type(e).__name__}: {e}") from None
        if len(values) != len(completions):
            raise UserError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(f"reward {name!r} returned {values[bad]} for sample {_describe(prompts, completions, bad)}")
        return values


def _failing_sample(fn, prompts, completions, fields) -> str:
    """The first completion on which `fn` alone raises (a batch call failed)."""
    for i in range(len(completions)):
        try:
            fn([prompts[i]], [completions[i]], **{k: [v[i]] for k, v in fields.items()})
        except Exception:
            return _describe(prompts, completions, i)
    return "(none alone: only the whole batch fails)"


def _describe(prompts, completions, i: int) -> str:
    return f"{i} (prompt {str(prompts[i])[:80]!r}, completion {completions[i][:80]!r})"
