"""Checkpoints: DCP training checkpoints (manager.py), Hugging Face io (hf.py), conversion
between the two (convert.py), and loading a checkpoint for inference.

`load_for_inference(path, device, dtype)` is what `meshtron generate/chat/serve/eval` call for a
meshtron checkpoint: `path` is a run directory (its newest complete checkpoint) or a
`checkpoints/step-N` directory (or a directory written by `meshtron convert --to native`).
"""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from meshtron.checkpoint.manager import CheckpointManager, read_manifest, resolve_checkpoint
from meshtron.models.common.args import ModelArgs
from meshtron.models.registry import build_model

__all__ = ["CheckpointManager", "load_for_inference", "load_model_weights", "read_manifest", "resolve_checkpoint"]


def load_model_weights(model: nn.Module, checkpoint_dir: Path) -> None:
    """Load only the model weights of a checkpoint into a materialized (possibly parallelized) model."""
    from meshtron.checkpoint.manager import ModelState

    dcp.load({"model": ModelState(model)}, checkpoint_id=str(checkpoint_dir))


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, ModelArgs, Path | None]:
    """(model in eval mode, its ModelArgs, the checkpoint's tokenizer directory or None)."""
    checkpoint_dir = resolve_checkpoint(path)
    manifest = read_manifest(checkpoint_dir)
    args = ModelArgs.from_dict(manifest["model_args"])
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    model.init_buffers()
    # DCP reads each tensor into the one given here, casting from the stored dtype.
    # no_dist: this process reads the whole model itself, even inside a distributed job.
    dcp.load({"model": model.state_dict()}, checkpoint_id=str(checkpoint_dir), no_dist=True)
    model.eval()
    tokenizer = manifest.get("tokenizer")
    return model, args, (checkpoint_dir / tokenizer) if tokenizer else None
