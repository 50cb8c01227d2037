"""`meshtron eval` end to end: a full report on the real HumanEval, data-parallel equality,
and one clear line for bad data."""

import json
import os

import pytest
from launch import run_meshtron


def run_eval(*args, nproc=1):
    return run_meshtron(["eval", *args], nproc=nproc, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)


@pytest.mark.smollm2
def test_smollm2_humaneval_report_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "report.json"
    result = run_eval("--model", str(smollm2_dir), "--tasks", "humaneval", "--limit", "2",
                      "--max-new-tokens", "96", "--output", str(out), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    r = report["results"]["humaneval"]
    assert r["n"] == 2 and r["metric"] == "pass@1" and r["mode"] == "execution" and r["shots"] == 0
    samples = r["extra"]["samples"]
    assert [s["task_id"] for s in samples] == ["HumanEval/0", "HumanEval/1"]
    assert r["score"] == r["extra"]["pass@1"] == sum(s["passed"] for s in samples) / 2
    assert r["extra"]["sandbox"] == "linux-namespaces"
    assert report["model"] == str(smollm2_dir) and report["date"]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "humaneval" in result.stdout and "pass@1" in result.stdout and "sandbox: linux-namespaces" in result.stdout
    # The model's completions, scored again as a samples file, get the same verdicts (the samples
    # path itself is checked against known-correct and known-wrong completions in test_eval_sandbox.py).
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": s["task_id"], "completion": s["completion"]}) + "\n"
                            for s in samples))
    rescored = run_eval("--tasks", "humaneval", "--samples", str(path), "--output", str(tmp_path / "again.json"))
    assert rescored.returncode == 0, rescored.stderr
    again = json.loads((tmp_path / "again.json").read_text())["results"]["humaneval"]["extra"]["samples"]
    assert [s["passed"] for s in again] == [s["passed"] for s in samples]


def _scores(model_dir, eval_data_dir, out, nproc=1, extra=()):
    result = run_eval("--model", str(model_dir), "--tasks", "mmlu,boolq,bbh", "--data-dir", str(eval_data_dir),
                      "--shots", "1", "--max-new-tokens", "8", "--output", str(out), *extra, nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == nproc
    return {k: (v["score"], v["n"], v["subtasks"]) for k, v in report["results"].items()}


@pytest.fixture(scope="module")
def one_process_scores(tiny_llama_dir, eval_data_dir, tmp_path_factory):
    """The scores of one process: a tiny random model with SmolLM2's tokenizer (what is compared is how
    the work is split, not the model, and its peaked logits leave no near-ties)."""
    return _scores(tiny_llama_dir, eval_data_dir, tmp_path_factory.mktemp("eval-one") / "r1.json")


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_parallel_evaluation_gives_the_same_scores_as_one_process(tiny_llama_dir, eval_data_dir, one_process_scores,
                                                                  tmp_path, tp):
    scores = _scores(tiny_llama_dir, eval_data_dir, tmp_path / "r2.json", nproc=2, extra=["--tp", str(tp)])
    assert scores == one_process_scores


def _assert_one_line_error(result, fragment):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_missing_data_directory(tmp_path):
    _assert_one_line_error(run_eval("--model", str(tmp_path), "--tasks", "mmlu", "--data-dir", str(tmp_path / "no")),
                           "does not exist")


def test_file_in_the_wrong_format(tmp_path):
    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    (tmp_path / "mmlu" / "test" / "anatomy_test.csv").write_text("question,A,B\n")
    model = tmp_path / "model"  # never loaded: data is checked first
    model.mkdir()
    result = run_eval("--model", str(model), "--tasks", "mmlu", "--data-dir", str(tmp_path))
    _assert_one_line_error(result, "anatomy_test.csv:1: expected 6 columns, found 3")


def test_unknown_task(tmp_path):
    _assert_one_line_error(run_eval("--model", str(tmp_path), "--tasks", "mmlu,nope", "--data-dir", str(tmp_path)),
                           "unknown task 'nope'")


@pytest.mark.parametrize("extra, line, fragment", [
    (["--model", "m"], '{"task_id": "HumanEval/0", "completion": ""}', "not both"),
    (["--limit", "3"], '{"task_id": "HumanEval/0", "completion": ""}', "--limit applies to evaluating a model"),
    ([], '{"task_id": "HumanEval/999", "completion": ""}', "samples.jsonl:1: task_id 'HumanEval/999' is not a problem"),
    ([], '{"task_id": "HumanEval/0"}', "samples.jsonl:1: missing field(s) completion"),
], ids=["with-model", "model-only-option", "unknown-task", "no-completion"])
def test_bad_samples_usage(tmp_path, extra, line, fragment):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(line + "\n")
    result = run_eval("--tasks", "humaneval", "--samples", str(samples), "--output", str(tmp_path / "r.json"), *extra)
    _assert_one_line_error(result, fragment)
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("seq_length", ["100000", "0"])
def test_a_perplexity_window_beyond_the_context_is_refused(tiny_llama_dir, tmp_path, seq_length):
    """One window is one forward: 100000 tokens on a 4096-position model would grow attention with the
    square of the length before failing; it is refused, naming the limit."""
    import numpy as np

    from meshtron.data.indexed import IndexedWriter

    with IndexedWriter(str(tmp_path / "val_text_document"), np.uint16) as writer:
        writer.add_document([np.arange(1, 50)])
    result = run_eval("--model", str(tiny_llama_dir), "--tasks", "perplexity", "--data-dir", str(tmp_path / "val"),
                      "--seq-length", seq_length)
    _assert_one_line_error(result, f"--seq-length {seq_length} must be between 1 and the model's context length "
                                   "4096")
