"""The `meshtron` command: one entry point, one module per subcommand.

Each subcommand module defines `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Modules are imported lazily so that `meshtron --help` and
light commands start without importing torch.
"""

import argparse
import errno
import hashlib
import importlib
import logging
import os
import sys
import traceback
from pathlib import Path

from meshtron import __version__
from meshtron.errors import UserError

SUBCOMMANDS = {
    "assets": "prepare the example model (SmolLM2-135M-Instruct) as a Hugging Face directory",
    "preprocess": "tokenize raw data into Megatron-compatible indexed datasets (.bin/.idx)",
    "train": "train with a TOML config (pretrain, sft, dpo, simpo, rm, prm, ...)",
    "convert": "convert between meshtron checkpoints and Hugging Face directories",
    "generate": "generate text from a prompt",
    "chat": "chat with a model in the terminal",
    "serve": "serve a model over an OpenAI-compatible HTTP API",
    "eval": "evaluate a model on benchmarks (MMLU, C-Eval, BoolQ, BBH, AGIEval, HumanEval)",
    "score": "score responses in a JSONL file with a trained reward model",
    "checkpoint": "check a training checkpoint's files against the checksums in its manifest",
    "plan": "memory per rank of a model flavor at a parallel layout (params, grads, optimizer, activations)",
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends an option's help with its default value, unless the help already states it or there is
    none to state (a required option, a switch that is off, an option that is unset by default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if unset or "(default" in text or not action.option_strings:
            return text
        shown = repr(default) if isinstance(default, str) and (not default or default != default.strip()
                                                               or "\n" in default) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshtron",
        description="meshtron: train, fine-tune, align, convert, serve and evaluate LLMs on PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"meshtron {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Only the chosen subcommand's module is imported (keeps --help fast).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter)
        if name == chosen:
            module = importlib.import_module(f"meshtron.cli.{name}")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Only subcommands that take `--section.key VALUE` overrides accept extra arguments.
        if not getattr(args._module, "ACCEPTS_OVERRIDES", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    try:
        code = args._module.run(args)
    except UserError as e:
        # Every rank reports (the first rank to fail may be any of them: torchrun stops the others
        # as soon as one leaves); _report_once prints a line once per job.
        _report_once(f"meshtron {args.command}: error: {e}")
        code = 2
    except KeyboardInterrupt:
        print(f"meshtron {args.command}: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _FILE_SYSTEM_ERRORS:
            # A folder that cannot be written (read-only, full, not ours) is the user's to fix.
            _report_once(f"meshtron {args.command}: error: {e.strerror.lower()}: {e.filename}; choose a writable "
                         "folder with free space")
            code = 2
        elif not under_torchrun:
            raise
        else:
            # A failed rank (a dead peer, a bug) leaves like a finished one, so that torchrun sees its
            # exit status and restarts the job rather than waiting on a teardown that hangs.
            traceback.print_exc()
            code = 1
    if under_torchrun:
        _leave_distributed(code or 0)
    sys.exit(code or 0)


_FILE_SYSTEM_ERRORS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def _report_once(line: str) -> None:
    """Print an error line once per torchrun job, by the first rank that raises it (every rank
    usually raises the same one): the ranks of a node share torchrun's attempt directory, where
    the first to create a marker for the line prints it."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        digest = hashlib.sha256(line.encode()).hexdigest()[:16]
        try:
            marker = Path(error_file).parents[1] / f"meshtron-error-{digest}"
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        except OSError:
            pass  # no shared directory: every rank prints
    print(line, file=sys.stderr)


def _leave_distributed(code: int) -> None:
    """End a torchrun rank without interpreter teardown.

    Under torchrun with gloo (torch 2.13) a rank sometimes aborts while the interpreter tears down,
    after all Python code has finished ("terminate called without an active exception"), and
    torchrun then reports the whole job as failed. The command's work is done and its output is
    flushed here, so the rank leaves without running native destructors.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
