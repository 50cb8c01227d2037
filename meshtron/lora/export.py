"""LoRA exports: a PEFT adapter directory, or a merged Hugging Face model.

The PEFT layout is what `peft.PeftModel.from_pretrained(base, dir)` reads (and vLLM serves):
`adapter_config.json` plus `adapter_model.safetensors` with keys
`base_model.model.<HF module path>.lora_{A,B}.weight`.
"""

import json
import os
from pathlib import Path

import torch
from torch import nn

from meshtron.checkpoint.atomic import atomic_directory
from meshtron.lora.layers import LoRAConfig, LoRALinear, dequantize
from meshtron.models.common.args import ModelArgs
from meshtron.models.registry import get_family


def _hf_module(adapter, name: str) -> str:
    return adapter.hf_name(f"{name}.weight")[: -len(".weight")]


def save_peft_adapter(model: nn.Module, args: ModelArgs, config: LoRAConfig, output_dir: str | os.PathLike,
                      base_model: str = "") -> Path:
    """Write the adapters of `model` (unsharded) as a PEFT LoRA adapter directory, atomically."""
    from safetensors.torch import save_file

    adapter = get_family(args.family).adapter(args)
    tensors, modules = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            hf = _hf_module(adapter, name)
            modules.add(hf.rsplit(".", 1)[-1])
            tensors[f"base_model.model.{hf}.lora_A.weight"] = module.lora_A.weight.detach().cpu().contiguous()
            tensors[f"base_model.model.{hf}.lora_B.weight"] = module.lora_B.weight.detach().cpu().contiguous()
        if config.bias != "none" and isinstance(module, nn.Linear) and module.bias is not None:
            if module.bias.requires_grad:
                tensors[f"base_model.model.{_hf_module(adapter, name)}.bias"] = module.bias.detach().cpu().contiguous()
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(modules),
        "bias": config.bias,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return output_dir


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in (in float32, then cast to `dtype`,
    by default the base weight's dtype); adapter tensors are dropped."""
    merged = {}
    lora_modules = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, tensor in model.state_dict().items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        owner = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and owner in lora_modules:
            module = lora_modules[owner]
            target = dtype or (torch.float32 if hasattr(module.weight, "get_original_weight") else module.weight.dtype)
            merged[key] = module.merged_weight().to(target)
        else:
            t = dequantize(tensor)
            merged[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return merged
