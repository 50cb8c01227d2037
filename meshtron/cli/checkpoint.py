"""`meshtron checkpoint verify PATH`: check a checkpoint's files against the checksums its manifest
recorded at save (see meshtron/checkpoint/integrity.py)."""

from pathlib import Path


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check every file's size and CRC-32 against the manifest")
    verify.add_argument("path", metavar="PATH", help="a checkpoints/step-N directory, or a run directory (its newest)")


def run(args) -> int:
    from meshtron.checkpoint.integrity import find_problems
    from meshtron.checkpoint.manager import read_manifest, resolve_checkpoint

    checkpoint_dir = resolve_checkpoint(Path(args.path))
    problems = find_problems(checkpoint_dir)
    for problem in problems:
        print(f"{checkpoint_dir}: {problem}")
    if problems:
        return 1
    print(f"{checkpoint_dir}: {len(read_manifest(checkpoint_dir)['files'])} files intact")
    return 0
