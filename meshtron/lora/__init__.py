"""Parameter-efficient fine-tuning: LoRA and QLoRA adapters, PEFT export and merging."""

from meshtron.lora.layers import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    init_lora,
    lora_state_dict,
    set_lora_enabled,
)

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "count_parameters", "init_lora", "lora_state_dict",
           "set_lora_enabled"]
