"""`meshtron generate`: generate text from a prompt; only the generated text goes to stdout."""

import sys

from meshtron.errors import UserError


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory or meshtron checkpoint/run directory")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--system", default=None, help="system prompt (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stream", action="store_true", help="print text as it is produced")
    parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (auto: float32 on CPU)")


def run(args) -> int:
    from meshtron.infer.generation import SamplingParams, generate
    from meshtron.infer.loading import encode_prompt, load_for_generation
    from meshtron.infer.streaming import TextStreamer

    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    loaded = load_for_generation(args.model, dtype=args.dtype)
    params.stop_token_ids = loaded.stop_token_ids
    prompt_ids = encode_prompt(loaded.tokenizer, args.prompt, args.chat, args.system)
    streamer = TextStreamer(loaded.tokenizer, params.stop_token_ids, sys.stdout) if args.stream else None
    on_tokens = (lambda step, active: streamer.push(int(step[0]))) if streamer else None
    pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    (new_ids,) = generate(loaded.model, [prompt_ids], params, pad_id=pad_id, on_tokens=on_tokens)
    if streamer:
        streamer.finish()
    else:
        sys.stdout.write(loaded.tokenizer.decode(new_ids, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    return 0
