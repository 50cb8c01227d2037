"""`meshtron eval`: score a model on benchmarks and write a report (JSON, table, chart)."""

import sys
from pathlib import Path

from meshtron.errors import UserError


def add_arguments(parser) -> None:
    from meshtron.eval.tasks import TASKS

    parser.add_argument("--model", required=True, help="HF model directory or meshtron checkpoint/run directory")
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
    parser.add_argument("--max-new-tokens", type=int, default=None, help="cap on generated tokens per item")
    parser.add_argument("--seq-length", type=int, default=1024, help="perplexity window length")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel degree under torchrun; the remaining processes split the data")
    parser.add_argument("--output", default="eval_results/report.json", help="report JSON (a .png chart beside it)")
    parser.add_argument("--force", action="store_true", help="replace an existing report at --output")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")


def run(args) -> int:
    from meshtron.checkpoint.atomic import check_output
    from meshtron.eval.harness import EvalSettings, evaluate
    from meshtron.eval.report import format_table, write_report

    output = Path(args.output)
    reports = [p for p in (output, output.with_suffix(".png")) if p.exists()]
    check_output(output, inputs=[args.model] if args.model else [], force=args.force, existing=reports)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise UserError("--tasks names no task")
    if args.limit is not None and args.limit <= 0:
        raise UserError("--limit must be positive")
    if args.num_samples > 1 and args.temperature == 0:
        raise UserError("--num-samples > 1 needs --temperature > 0 (greedy samples are identical)")
    settings = EvalSettings(shots=args.shots, limit=args.limit, mode=args.scoring, chat_template=args.chat_template,
                            batch_size=args.batch_size, num_samples=args.num_samples, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, tp=args.tp)
    report = evaluate(args.model, names, args.data_dir, settings, dtype=args.dtype, seq_length=args.seq_length)
    if report is None:  # not rank 0
        return 0
    print(format_table(report))
    for path in write_report(report, Path(args.output)):
        print(f"wrote {path}", file=sys.stderr)
    return 0
