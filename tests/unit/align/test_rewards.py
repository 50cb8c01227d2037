"""The RL reward functions: math answer extraction, the format regex, the code reward in the
evaluation sandbox, user functions by import path, and errors that name the function and sample."""

import sys

import pytest
import torch

from meshtron.align.rewards import Rewards, boxed_or_last_number, format_reward, math_reward
from meshtron.config.job import RLConfig
from meshtron.errors import UserError


@pytest.mark.parametrize("text,expected", [
    ("The answer is 42.", "42"),
    ("3 + 4 = 7, so 7 apples and then 12", "12"),
    ("We get \\boxed{1,234} (not 99)", "1,234"),
    ("nested \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("-5 is it", "-5"),
    ("no number here", None),
])
def test_boxed_or_last_number(text, expected):
    assert boxed_or_last_number(text) == expected


def test_math_reward():
    completions = ["It is 13.", "13.0", "\\boxed{1,234}", "12", "none"]
    answers = ["13", "13", "1234", "13", "13"]
    assert math_reward(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_format_reward_matches_whole_completion():
    reward = format_reward(r"<think>.*</think>\s*\d+")
    assert reward(None, ["<think>a\nb</think> 12", "<think>a</think> 12 extra", " <think></think>7 "]) == [1.0, 0.0, 1.0]


def write_module(tmp_path, monkeypatch, source: str) -> str:
    (tmp_path / "my_rewards.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


def test_weighted_user_function_gets_fields(tmp_path, monkeypatch):
    module = write_module(tmp_path, monkeypatch, (
        "def length(prompts, completions, answer, level, **_):\n"
        "    return [len(c) + level_value for c, level_value in zip(completions, level)]\n"))
    rewards = Rewards(RLConfig(rewards={"math": 2.0, f"{module}:length": 0.5}), torch.device("cpu"))
    per_function = rewards.score(["q1", "q2"], ["7", "no"], {"answer": ["7", "3"], "level": [1, 2]})
    assert per_function.tolist() == [[1.0, 2.0], [0.0, 4.0]]
    assert rewards.total(per_function).tolist() == [3.0, 2.0]


def test_failing_reward_names_function_and_sample(tmp_path, monkeypatch):
    module = write_module(tmp_path, monkeypatch, (
        "def picky(prompts, completions, **_):\n"
        "    return [1.0 / (len(c) - 3) for c in completions]\n"))
    rewards = Rewards(RLConfig(rewards={f"{module}:picky": 1.0}), torch.device("cpu"))
    with pytest.raises(UserError, match=r"reward 'my_rewards:picky' failed on sample 1 \(prompt 'b', completion "
                                        r"'abc'\): ZeroDivisionError"):
        rewards.score(["a", "b"], ["abcdef", "abc"], {})
    with pytest.raises(UserError, match="reward 'math' failed on sample 0.*no 'answer' field"):
        Rewards(RLConfig(rewards={"math": 1.0}), torch.device("cpu")).score(["a"], ["1"], {"other": [1]})


def test_bad_reward_names_are_one_line_errors(tmp_path, monkeypatch):
    module = write_module(tmp_path, monkeypatch, "x = 1\n")
    for name, message in [("nonsense", "neither a built-in"), (f"{module}:missing", "cannot import"),
                          (f"{module}:x", "is not a function"), ("model", "set rl.reward_model")]:
        with pytest.raises(UserError, match=message):
            Rewards(RLConfig(rewards={name: 1.0}), torch.device("cpu"))


def test_code_reward_runs_tests_in_the_sandbox():
    from meshtron.eval.sandbox import confinement_problem

    if confinement_problem() is not None:
        pytest.skip(f"the kernel cannot confine programs here: {confinement_problem()}")
    rewards = Rewards(RLConfig(rewards={"code": 1.0}, code_timeout_s=5.0), torch.device("cpu"))
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a - b\n",
                   "def add(a, b):\n    import os; open('/etc/x', 'w')\n"]
    tests = ["assert add(2, 3) == 5"] * 3
    assert rewards.score(["p"] * 3, completions, {"tests": tests}).flatten().tolist() == [1.0, 0.0, 0.0]
