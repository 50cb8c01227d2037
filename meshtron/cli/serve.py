"""`meshtron serve`: serve a model over an OpenAI-compatible HTTP API (needs the `serve` extra).

Under `torchrun --nproc-per-node N` the model is split tensor-parallel over the N processes: rank 0
serves HTTP and decides each scheduler step, every rank runs it (`meshtron.infer.scheduler`).
"""

import ipaddress
import logging
import os
import signal
from pathlib import Path

from meshtron.errors import UserError

log = logging.getLogger("meshtron.serve")


def add_arguments(parser) -> None:
    from meshtron.cli.generate import add_compile_argument

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
    add_compile_argument(parser)
    parser.add_argument("--max-batch-size", type=int, default=8, help="requests generated together at most")
    parser.add_argument("--kv-cache-gb", type=float, default=None,
                        help="memory for the KV cache of the running requests; bounds the batch below "
                             "--max-batch-size when smaller (default: no bound but --max-batch-size)")
    parser.add_argument("--api-key", default=None,
                        help="clients must send it as 'Authorization: Bearer KEY' (default: $MESHTRON_API_KEY; "
                             "prefer the variable, a flag shows in the process list)")


def run(args) -> int:
    from meshtron.infer.tp import close_tp, init_tp_mesh

    try:  # the extra's packages, checked before any process group or model
        import uvicorn  # noqa: F401

        import meshtron.infer.server  # noqa: F401
    except ImportError as e:
        raise UserError(f"meshtron serve needs fastapi and uvicorn ({e}); install them with "
                        "pip install 'meshtron[serve]'") from None
    for flag, value in (("--max-tokens", args.max_tokens), ("--max-batch-size", args.max_batch_size),
                        ("--max-model-len", args.max_model_len or 1), ("--kv-cache-gb", args.kv_cache_gb or 1)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    tp_mesh, device = init_tp_mesh()
    try:
        if tp_mesh is not None and args.compile:
            raise UserError("--compile decodes on one process; run without torchrun (or drop --compile)")
        return _serve(args, tp_mesh, device)
    finally:
        close_tp(tp_mesh)


def _serve(args, tp_mesh, device) -> int:
    import uvicorn

    from meshtron.cli.generate import decode_mode
    from meshtron.infer.loading import load_for_generation
    from meshtron.infer.server import ServerLimits, build_app, make_scheduler
    from meshtron.infer.tp import is_main_process

    api_key = args.api_key or os.environ.get("MESHTRON_API_KEY") or None
    if api_key is None and not _is_loopback(args.host) and is_main_process():
        log.warning("serving on %s without an API key: anyone who can reach it can use the model; "
                    "set MESHTRON_API_KEY (or --api-key)", args.host)
    loaded = load_for_generation(args.model, dtype=args.dtype, device=device, tp_mesh=tp_mesh)
    model_len = loaded.model.args.max_seq_len
    if args.max_model_len is not None and args.max_model_len > model_len:
        raise UserError(f"--max-model-len {args.max_model_len} is above the model's context of {model_len}")
    limits = ServerLimits(max_model_len=args.max_model_len or model_len, max_tokens=args.max_tokens)
    kv_cache_bytes = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else None
    scheduler = make_scheduler(loaded, limits, args.max_batch_size, kv_cache_bytes, decode_mode(args),
                               collective=tp_mesh is not None)
    if not is_main_process():
        # torchrun's SIGTERM and a terminal's Ctrl-C reach every rank: only rank 0 acts on them, by
        # shutting the server down, which ends the others' follow().
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        scheduler.follow()
        log.info("rank %s: rank 0 shut the server down", os.environ.get("RANK"))
        return 0
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(loaded, name, limits, scheduler, api_key=api_key)
    log.info("serving %r at http://%s:%d/v1 (context %d tokens, max_tokens %d)",
             name, args.host, args.port, limits.max_model_len, limits.max_tokens)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:  # also when uvicorn stops before its lifespan ran: the other ranks must not wait on
        scheduler.close()  # (a second close, after the lifespan's, returns at once)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
