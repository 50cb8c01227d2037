"""`meshtron serve`: serve a model over an OpenAI-compatible HTTP API (needs the `serve` extra)."""

import logging
from pathlib import Path

from meshtron.errors import UserError

log = logging.getLogger("meshtron.serve")


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or meshtron checkpoint/run directory")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients pass as `model` (default: the model directory's name)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context limit, prompt plus generated tokens (default: the model's)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="the most tokens a request may ask for, and the default when it asks for none")
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests generated together at most")


def run(args) -> int:
    try:
        import uvicorn

        from meshtron.infer.server import ServerLimits, build_app
    except ImportError as e:
        raise UserError(f"meshtron serve needs fastapi and uvicorn ({e}); install them with "
                        "pip install 'meshtron[serve]'") from None
    from meshtron.infer.loading import load_for_generation

    for flag, value in (("--max-tokens", args.max_tokens), ("--max-batch-size", args.max_batch_size),
                        ("--max-model-len", args.max_model_len or 1)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    loaded = load_for_generation(args.model, dtype=args.dtype)
    model_len = loaded.model.args.max_seq_len
    if args.max_model_len is not None and args.max_model_len > model_len:
        raise UserError(f"--max-model-len {args.max_model_len} is above the model's context of {model_len}")
    limits = ServerLimits(max_model_len=args.max_model_len or model_len, max_tokens=args.max_tokens)
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(loaded, name, limits, max_batch_size=args.max_batch_size)
    log.info("serving %r at http://%s:%d/v1 (context %d tokens, max_tokens %d)",
             name, args.host, args.port, limits.max_model_len, limits.max_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
