"""`meshtron chat`: talk to a model in the terminal.

Each line is a user message; the reply streams as it is produced. `/clear` starts a new
conversation, `/exit` (or end of input, Ctrl-D) quits. Ctrl-C while a reply is being written
stops that reply (the exchange is dropped) and returns to the prompt; at the prompt it only
says how to quit.
"""

import sys

from meshtron.errors import UserError

COMMANDS = "/clear starts a new conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def add_arguments(parser) -> None:
    from meshtron.cli.generate import add_compile_argument, add_sampling_arguments

    parser.add_argument("--model", required=True, help="HF model directory or meshtron checkpoint/run directory")
    parser.add_argument("--system", default=None, help="system prompt")
    parser.add_argument("--max-turns", type=int, default=16,
                        help="exchanges of history kept (older ones are dropped; fewer if the context is full)")
    add_sampling_arguments(parser)
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
    add_compile_argument(parser)


def run(args) -> int:
    from meshtron.cli.generate import decode_mode, sampling_params
    from meshtron.infer.chat import ChatSession
    from meshtron.infer.loading import load_for_generation

    params = sampling_params(args)
    loaded = load_for_generation(args.model, dtype=args.dtype)
    session = ChatSession(loaded, params, system=args.system, max_turns=args.max_turns,
                          decode=decode_mode(args))
    print(f"meshtron chat: {COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print(f"\n({COMMANDS})", file=sys.stderr)
            continue
        except UnicodeDecodeError:
            line = None
        if line is None or not _is_utf8(line):
            print("error: that line is not valid UTF-8 (check the terminal's encoding); type it again", file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/clear":
            session.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; {COMMANDS}", file=sys.stderr)
            continue
        _reply(session, line)


def _is_utf8(line: str) -> bool:
    """False for a line whose undecodable bytes Python kept as lone surrogates (stdin's surrogateescape)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _reply(session, line: str) -> None:
    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    try:
        session.reply(line, on_text=write)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return
    write("\n")
