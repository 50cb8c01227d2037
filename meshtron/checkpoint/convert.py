"""Conversion between meshtron checkpoints and Hugging Face directories, both ways.

checkpoint -> HF: the model weights of a checkpoint (any layout it was trained at) become a
safetensors directory with config.json and the tokenizer and chat template the checkpoint
carries. HF -> native: the weights are written as a single-process DCP checkpoint with a
manifest, loadable by `meshtron train` (model.name_or_path), generate, eval and convert.
Both write to a temporary directory and rename it into place when complete.
"""

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from meshtron.checkpoint.atomic import atomic_directory
from meshtron.checkpoint.hf import SIDE_FILES, hf_token_config, load_hf_model, read_hf_config, save_hf_model
from meshtron.checkpoint.integrity import record_checksums
from meshtron.checkpoint.reader import single_process
from meshtron.checkpoint.manager import COMMIT_MARKER, FORMAT, MANIFEST, TOKENIZER_DIR, read_chat_template
from meshtron.checkpoint import load_for_inference, read_manifest, resolve_checkpoint
from meshtron.errors import UserError


def checkpoint_to_hf(checkpoint: str | Path, output_dir: str | Path, dtype: torch.dtype | None = None,
                     merge_lora: bool = False) -> Path:
    model, args, tokenizer_dir = load_for_inference(checkpoint, device="cpu", dtype=torch.float32)
    manifest = read_manifest(resolve_checkpoint(checkpoint))
    if manifest.get("lora"):
        from meshtron.config.job import LoRAConfig
        from meshtron.lora.export import merged_state_dict, save_peft_adapter

        if not merge_lora:
            config = LoRAConfig(**manifest["lora"])
            return save_peft_adapter(model, args, config, output_dir, base_model=manifest["base_model"]["path"])
        state_dict = merged_state_dict(model)
    else:
        if merge_lora:
            raise UserError(f"{checkpoint} is not a LoRA checkpoint; drop --merge-lora")
        state_dict = dict(model.state_dict())
    return save_hf_model(state_dict, args, output_dir, source_dir=tokenizer_dir, dtype=dtype,
                         hf_config_extra=manifest.get("hf_config_extra") or None)


def hf_to_checkpoint(hf_dir: str | Path, output_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    hf_dir, output_dir = Path(hf_dir), Path(output_dir)
    _, hf_cfg, _ = read_hf_config(hf_dir)
    model, args = load_hf_model(hf_dir, device="cpu", dtype=dtype)
    with atomic_directory(output_dir) as tmp:
        with single_process():
            dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp), no_dist=True)
        (tmp / TOKENIZER_DIR).mkdir()
        for name in SIDE_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, tmp / TOKENIZER_DIR / name)
        manifest = {
            "format": FORMAT, "version": 1, "step": 0, "recipe": None, "model_args": args.to_dict(),
            "dtype": str(dtype).removeprefix("torch."), "world_size": 1, "tokenizer": TOKENIZER_DIR,
            "chat_template": read_chat_template(hf_dir), "hf_config_extra": hf_token_config(hf_cfg),
            "source": str(hf_dir),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        record_checksums(tmp)
        (tmp / COMMIT_MARKER).write_text("ok\n")
    return output_dir
