"""Checkpoints: DCP training checkpoints (manager.py), Hugging Face io (hf.py), conversion
between the two (convert.py), and loading a checkpoint for inference.

`load_for_inference(path, device, dtype)` is what `meshtron generate/chat/serve/eval` call for a
meshtron checkpoint: `path` is a run directory (its newest complete checkpoint) or a
`checkpoints/step-N` directory (or a directory written by `meshtron convert --to native`).
"""

import logging
from pathlib import Path

import torch
from torch import nn

from meshtron.checkpoint.manager import CheckpointManager, read_manifest, resolve_checkpoint
from meshtron.checkpoint.reader import load_checkpoint
from meshtron.errors import UserError
from meshtron.models.common.args import ModelArgs
from meshtron.models.registry import build_model, model_args_from_dict

log = logging.getLogger(__name__)

def local_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (its shards of distributed ones)."""
    from torch.distributed.tensor import DTensor

    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.to_local().nbytes if isinstance(t, DTensor) else t.nbytes for t in tensors)


def _load_lora_base(model: nn.Module, manifest: dict, checkpoint_dir: Path, no_dist: bool) -> None:
    base = manifest.get("base_model") or {}
    path = Path(base.get("path", ""))
    if not path.is_dir():
        raise UserError(f"{checkpoint_dir} holds LoRA adapters for the base model {str(path)!r}, which is not "
                        "there any more; restore it or point the manifest's base_model.path at a copy")
    if base.get("kind") == "hf":
        from meshtron.checkpoint.hf import load_hf_weights
        from meshtron.models.registry import get_family

        load_hf_weights(model, path, get_family(model.args.family))
    else:
        base_state = {k: v for k, v in model.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}
        load_checkpoint({"model": base_state}, resolve_checkpoint(path), no_dist=no_dist)


__all__ = ["CheckpointManager", "load_for_inference", "load_model_weights", "read_manifest", "resolve_checkpoint"]


def load_model_weights(model: nn.Module, checkpoint_dir: Path, base_only: bool = False) -> set[str]:
    """Load only the model weights of a checkpoint into a materialized (possibly parallelized) model;
    `base_only` leaves the model's LoRA adapters alone. Returns the names of the parameters loaded."""
    from meshtron.checkpoint.manager import ModelState

    if read_manifest(checkpoint_dir).get("lora"):
        raise UserError(f"{checkpoint_dir} is a LoRA checkpoint (adapters only); start from its base model, or "
                        "merge it first: meshtron convert --input RUN --output DIR --to hf --merge-lora")
    state = ModelState(model, part="base" if base_only else "all")
    load_checkpoint({"model": state}, checkpoint_dir)
    return set(state.state_dict())


def load_for_inference(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, tp_mesh=None
) -> tuple[nn.Module, ModelArgs, Path | None]:
    """(model in eval mode, its ModelArgs, the checkpoint's tokenizer directory or None).

    With `tp_mesh` the model is sharded for tensor-parallel inference before it is materialized, and
    each rank reads only the parts of the checkpoint its shards need (DCP reshards on load). Logs
    the bytes of weights this rank holds."""
    checkpoint_dir = resolve_checkpoint(path)
    manifest = read_manifest(checkpoint_dir)
    args = model_args_from_dict(manifest["model_args"], f"{checkpoint_dir}/manifest.json model_args")
    model = build_model(args, device="meta")
    lora = manifest.get("lora")
    if lora:
        from meshtron.config.job import LoRAConfig
        from meshtron.lora.layers import apply_lora

        # Inference runs on a float base even for QLoRA runs (their adapters were trained on it, dequantized).
        apply_lora(model, LoRAConfig(**{**lora, "quantize_base": ""}))
    if tp_mesh is not None:
        from meshtron.infer.tp import parallelize_for_inference

        parallelize_for_inference(model, tp_mesh)
    model.to_empty(device=device)
    model.to(dtype)
    model.init_buffers()
    state = model.state_dict()
    # One process reads the whole model itself, even inside a distributed job; tensor-parallel ranks
    # load together, each its shards.
    no_dist = tp_mesh is None
    if lora:
        _load_lora_base(model, manifest, checkpoint_dir, no_dist)
        state = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    # DCP reads each tensor into the one given here, casting from the stored dtype.
    load_checkpoint({"model": state}, checkpoint_dir, no_dist=no_dist)
    log.info("rank %d holds %d bytes of weights from %s", torch.distributed.get_rank() if not no_dist else 0,
             local_bytes(model), checkpoint_dir)
    model.eval()
    tokenizer = manifest.get("tokenizer")
    return model, args, (checkpoint_dir / tokenizer) if tokenizer else None
