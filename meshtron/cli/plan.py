"""`meshtron plan FLAVOR [--dp-shard N --tp N --pp N ...]`: memory per rank of a training layout, from shapes alone."""


def add_arguments(parser) -> None:
    parser.add_argument("flavor", help="a model flavor, e.g. llama:llama3-8b (see docs/models.md)")
    parser.add_argument("--dp-shard", type=int, default=1, help="FSDP degree (parallel.dp_shard)")
    parser.add_argument("--dp-replicate", type=int, default=1, help="replicas (parallel.dp_replicate)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (with sequence parallel)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (1F1B)")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="sequences per micro-batch")
    parser.add_argument("--seq-length", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--recompute", default="none",
                        help="activation recompute, as recompute.mode: none | selective | op | full")
    parser.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 | float16 | float32")
    parser.add_argument("--master-dtype", default="float32", help="dtype of parameters, gradients, optimizer")


def run(args) -> int:
    from meshtron.errors import UserError
    from meshtron.models.registry import get_flavor
    from meshtron.parallel.memory import PARTS, Layout, memory_per_rank

    try:
        layout = Layout(dp_shard=args.dp_shard, dp_replicate=args.dp_replicate, tp=args.tp, pp=args.pp,
                        micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
                        recompute=args.recompute, compute_dtype=args.dtype, master_dtype=args.master_dtype)
    except ValueError as e:
        raise UserError(str(e)) from None
    model_args = get_flavor(args.flavor)
    memory = memory_per_rank(model_args, layout)
    ranks = args.dp_shard * args.dp_replicate * args.tp * args.pp
    layout_text = (f"dp_shard {args.dp_shard}, dp_replicate {args.dp_replicate}, tp {args.tp}, pp {args.pp} "
                   f"({ranks} ranks); micro-batch {args.micro_batch_size} x {args.seq_length}; recompute {args.recompute}")
    print(f"{args.flavor}: {model_args.num_params() / 1e9:.2f}B parameters; {layout_text}")
    print("| " + " | ".join([*PARTS, "total"]) + " |")
    print("|" + " ---: |" * (len(PARTS) + 1))
    print("| " + " | ".join(f"{memory[part] / 2**30:.1f} GiB" for part in [*PARTS, "total"]) + " |")
    return 0
