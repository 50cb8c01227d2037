"""`meshtron train CONFIG.toml [--section.key VALUE ...]`: one process, or one per GPU/CPU slot under torchrun."""

from pathlib import Path

ACCEPTS_OVERRIDES = True  # unknown --section.key VALUE arguments arrive as args.overrides


def add_arguments(parser) -> None:
    parser.add_argument("config", metavar="CONFIG.toml", help="training configuration (see configs/ and docs/training.md)")
    parser.epilog = "Any config key can be overridden: --train.steps 100 --parallel.tp 2 --optim.lr 1e-3"


def run(args) -> int:
    import torch.distributed as dist

    from meshtron.config import load_config
    from meshtron.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    try:
        Trainer(config, config_dir=Path(args.config).resolve().parent).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
