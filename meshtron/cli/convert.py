"""`meshtron convert --input PATH --output PATH [--to hf|native] [--merge-lora] [--dtype D] [--force]`.

For a LoRA run, `--to hf` writes a PEFT adapter directory (adapter_config.json +
adapter_model.safetensors) for the base model its manifest names; `--merge-lora` writes the
base with the adapters merged (in float32, then cast) as an ordinary HF model directory.
"""

from pathlib import Path

from meshtron.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="a meshtron checkpoint (run directory or checkpoints/step-N) or a Hugging Face directory")
    parser.add_argument("--output", required=True, metavar="PATH", help="the directory to write")
    parser.add_argument("--to", choices=("hf", "native"), default=None,
                        help="target format (default: native for an HF input, hf for a checkpoint)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype of the written weights (default: as stored; native defaults to float32)")
    parser.add_argument("--merge-lora", action="store_true",
                        help="for a LoRA run: write base + adapters merged as an HF model instead of a PEFT adapter")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing non-empty --output (kept until the new one is complete)")


def run(args) -> int:
    import torch

    from meshtron.checkpoint.atomic import check_output
    from meshtron.checkpoint.convert import checkpoint_to_hf, hf_to_checkpoint

    src = Path(args.input)
    if not src.exists():
        raise UserError(f"--input {src} does not exist")
    check_output(args.output, inputs=[src], force=args.force)
    is_hf = (src / "config.json").is_file()
    to = args.to or ("native" if is_hf else "hf")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if to == "native":
        if not is_hf:
            raise UserError(f"--to native needs a Hugging Face directory (with config.json) as --input; {src} is not one")
        out = hf_to_checkpoint(src, args.output, dtype=dtype or torch.float32)
    else:
        if is_hf:
            raise UserError(f"{src} is already a Hugging Face directory; use --to native to make a checkpoint of it")
        out = checkpoint_to_hf(src, args.output, dtype=dtype, merge_lora=args.merge_lora)
    print(out)
    return 0
