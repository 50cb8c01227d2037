"""Model converters: steps that change a built model's structure (LoRA adapters, an NF4 base for
QLoRA; float8 later), applied at fixed points of the build order in `build_parallel_model`:

1. `convert(model)` on the meta device, after the pipeline cut and before parallelizing, so that
   the parallel plan shards the converted modules (LoRA adapters follow their base layer);
2. `after_load(model)` on the materialized model, once the weights are loaded and the rest
   initialized (QLoRA quantizes the loaded base here);
3. `after_parallelize(model)`, to restore what parallelizing resets (trainable flags).

A converter whose `after_load` needs the whole weights (`needs_full_weights`, QLoRA: NF4 blocks
are cut from unsharded tensors) moves parallelizing after step 2.
"""

import logging

from torch import nn

from meshtron.config.job import JobConfig, LoRAConfig
from meshtron.errors import UserError
from meshtron.lora.layers import apply_lora, count_parameters, mark_trainable, quantize_base_nf4

log = logging.getLogger(__name__)


class ModelConverter:
    needs_full_weights = False

    def convert(self, model: nn.Module) -> None:
        pass

    def after_load(self, model: nn.Module) -> None:
        pass

    def after_parallelize(self, model: nn.Module) -> None:
        pass


class LoRAConverter(ModelConverter):
    """Adapters on the targeted linears (created on meta, initialized with the model); the base frozen."""

    def __init__(self, config: LoRAConfig):
        self.config = config

    def convert(self, model: nn.Module) -> None:
        apply_lora(model, self.config)
        trainable, total = count_parameters(model)
        log.info("LoRA rank %d on %s: %s trainable parameters of %s (%.2f%%)", self.config.rank,
                 ",".join(self.config.targets), f"{trainable:,}", f"{total:,}", 100 * trainable / total)

    def after_parallelize(self, model: nn.Module) -> None:
        mark_trainable(model, self.config)


class QLoRAConverter(LoRAConverter):
    """LoRA over a base stored in NF4, quantized from the loaded weights."""

    needs_full_weights = True

    def __init__(self, config: LoRAConfig, num_shards: int):
        super().__init__(config)
        self.num_shards = num_shards

    def after_load(self, model: nn.Module) -> None:
        quantize_base_nf4(model, num_shards=self.num_shards)


def build_converters(config: JobConfig, source_kind: str, dp_shard: int) -> list[ModelConverter]:
    lora = config.lora
    if lora.rank <= 0:
        return []
    if source_kind == "flavor":
        raise UserError("LoRA fine-tunes a pretrained model: set model.name_or_path to a Hugging Face directory or a "
                        "meshtron checkpoint (or lora.rank = 0 for full training)")
    return [QLoRAConverter(lora, dp_shard) if lora.quantize_base else LoRAConverter(lora)]
