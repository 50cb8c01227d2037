"""`meshtron preprocess`: tokenize raw data into Megatron-compatible indexed datasets."""

import json
import sys

from meshtron.data.handlers import HANDLER_NAMES
from meshtron.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="input files or directories (.jsonl .json .txt .parquet .arrow)")
    parser.add_argument("--handler", required=True, metavar="NAME", help=f"one of: {', '.join(HANDLER_NAMES)}")
    parser.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face tokenizer or model directory")
    parser.add_argument("--output-prefix", required=True, metavar="PREFIX",
                        help="output path prefix; files are PREFIX_<name>_document.bin/.idx")
    parser.add_argument("--seq-length", type=int, default=None, metavar="N",
                        help="longest sample (SFT: longer ones follow --truncation) and pack size with --pack")
    parser.add_argument("--pack", action="store_true", help="pack SFT samples into sequences of at most N tokens")
    parser.add_argument("--append-eod", action="store_true", help="pretrain: end every document with the eos token")
    parser.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                        help="pretrain: text fields, one output dataset each (default: text)")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (default 1)")
    parser.add_argument("--map-keys", default=None, metavar="JSON",
                        help='rename fields, canonical -> yours, e.g. \'{"instruction": "question", '
                             '"output": "answer"}\'; sharegpt also role_tag, content_tag, user_tag, assistant_tag, '
                             '...; MindSpeed-LLM\'s names (prompt, query, response, messages, tags) work too')
    parser.add_argument("--chat-template", default=None, metavar="NAME_OR_FILE",
                        help="chatml, llama3, qwen, or a Jinja file (default: the tokenizer's own template)")
    parser.add_argument("--truncation", choices=("right", "drop"), default="right",
                        help="SFT samples longer than --seq-length: keep the first N tokens (right) or drop them")
    parser.add_argument("--step-separator", default="\n\n", metavar="TEXT",
                        help="prm: text that ends every solution step; its last token carries the step label")
    parser.add_argument("--force", action="store_true",
                        help="replace existing PREFIX_* outputs (kept until the new ones are complete)")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip (and count) malformed or incomplete records instead of stopping at the first")


def parse_map_keys(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--map-keys is not valid JSON ({e.msg}); example: '{{\"instruction\": \"question\"}}'")
    if not isinstance(mapping, dict):
        raise UserError("--map-keys must be a JSON object, canonical name -> your field name")
    return mapping


def check_output_prefix(prefix: str, inputs: list[str], force: bool) -> None:
    """The files of an earlier run with this prefix are replaced only with --force."""
    import glob
    from pathlib import Path

    from meshtron.checkpoint.atomic import check_output

    existing = sorted(Path(p) for p in glob.glob(f"{glob.escape(prefix)}_*") if p.endswith((".bin", ".idx", ".json")))
    check_output(prefix, inputs=inputs, force=force, existing=existing, flag="--output-prefix")


def run(args) -> int:
    from meshtron.data.handlers import HandlerOptions
    from meshtron.data.preprocess import PreprocessConfig, format_summary, preprocess

    check_output_prefix(args.output_prefix, args.input, args.force)
    options = HandlerOptions(
        json_keys=args.json_keys,
        append_eod=args.append_eod,
        map_keys=parse_map_keys(args.map_keys),
        chat_template=args.chat_template,
        seq_length=args.seq_length,
        truncation=args.truncation,
        step_separator=args.step_separator,
    )
    cfg = PreprocessConfig(
        inputs=args.input,
        handler=args.handler,
        tokenizer=args.tokenizer,
        output_prefix=args.output_prefix,
        options=options,
        pack=args.pack,
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
    )
    summary = preprocess(cfg)
    print(format_summary(summary, cfg), file=sys.stderr)
    return 0
