"""`meshtron score`: add a reward to every response of a JSONL file with a trained reward model."""

import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a reward model: an rm run/checkpoint or an HF "
                        "*ForSequenceClassification directory")
    parser.add_argument("--input", required=True, help="JSONL: prompt+response, instruction+output, or messages")
    parser.add_argument("--output", default="-", help="JSONL with a 'reward' field added (default: stdout)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output file")
    parser.add_argument("--batch-size", type=int, default=8, help="responses scored together")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")


def run(args) -> int:
    from meshtron.align.score import score_file
    from meshtron.checkpoint.atomic import check_output
    from meshtron.infer.loading import load_for_generation

    if args.output != "-":
        # Opening --output for writing would empty an --input given as both.
        check_output(args.output, inputs=[args.input, args.model], force=args.force)
    loaded = load_for_generation(args.model, dtype=args.dtype)
    if args.output == "-":
        count = score_file(loaded.model, loaded.tokenizer, Path(args.input), sys.stdout, args.batch_size)
    else:
        with open(args.output, "w", encoding="utf-8") as out:
            count = score_file(loaded.model, loaded.tokenizer, Path(args.input), out, args.batch_size)
    print(f"scored {count} responses", file=sys.stderr)
    return 0
