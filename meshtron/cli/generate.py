"""`meshtron generate`: generate text from one or more prompts; only the generated text goes to stdout.

Several `--prompt`s are generated as one left-padded batch and printed one completion per line
group, in order. Under `torchrun --nproc-per-node N` the model is split tensor-parallel over
the N processes and rank 0 prints.
"""

import sys

from meshtron.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or meshtron checkpoint/run directory")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text; repeat for a batch (each completion is printed on its own)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system prompt (with --chat)")
    add_sampling_arguments(parser)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (greedy only)")
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")
    add_compile_argument(parser)


def add_compile_argument(parser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="decode with static shapes, compiled once (CUDA graphs on GPU); the first reply "
                             "waits for the compilation")


def decode_mode(args) -> str:
    return "compiled" if args.compile else "dynamic"


def add_sampling_arguments(parser) -> None:
    """Flags shared with `meshtron chat`."""
    parser.add_argument("--max-new-tokens", type=int, default=256, help="the most tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="lower the scores of tokens already in the text (1 = off)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when the text contains TEXT (not printed); repeatable")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_params(args, **extra):
    from meshtron.infer.generation import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            stop_strings=tuple(args.stop),
            seed=args.seed,
            **extra,
        )
    except ValueError as e:
        raise UserError(str(e)) from None


def check_context(model, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.args.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise UserError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens {max_new_tokens} exceeds the "
                        f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens")


def run(args) -> int:
    from meshtron.infer.tp import close_tp, init_tp_mesh

    params = sampling_params(args, num_beams=args.num_beams)
    if args.stream and len(args.prompt) > 1:
        raise UserError("--stream prints one completion; give a single --prompt")
    tp_mesh, device = init_tp_mesh()
    if tp_mesh is not None and args.compile:
        close_tp(tp_mesh)
        raise UserError("--compile decodes on one process; run without torchrun (or drop --compile)")
    try:
        return _generate(args, params, tp_mesh, device)
    finally:
        close_tp(tp_mesh)


def _generate(args, params, tp_mesh, device) -> int:
    from meshtron.infer.generation import generate_text
    from meshtron.infer.loading import encode_prompt, load_for_generation, pad_token_id
    from meshtron.infer.tp import is_main_process, shared_seed

    params.seed = shared_seed(params.seed)
    loaded = load_for_generation(args.model, dtype=args.dtype, device=device, tp_mesh=tp_mesh)
    params.stop_token_ids = loaded.stop_token_ids
    prompts = [encode_prompt(loaded.tokenizer, p, args.chat, args.system) for p in args.prompt]
    for text, p in zip(args.prompt, prompts):
        if not p:
            raise UserError(f"--prompt {text!r} encodes to no tokens; give some text for the model to continue")
        check_context(loaded.model, len(p), params.max_new_tokens)
    out = sys.stdout if is_main_process() else None
    on_text = (lambda row, chunk: (out.write(chunk), out.flush())) if args.stream and out else None
    completions = generate_text(loaded.model, loaded.tokenizer, prompts, params,
                                pad_id=pad_token_id(loaded.tokenizer), on_text=on_text, decode=decode_mode(args))
    if out:
        for completion in completions:
            out.write(("" if args.stream else completion.text) + "\n")
        out.flush()
    return 0
