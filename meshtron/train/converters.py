"""Model converters: steps that change a built model's structure (LoRA adapters, an NF4 base for
QLoRA, float8 linears), applied at fixed points of the build order in `build_parallel_model`:

1. `convert(model)` on the meta device, after the pipeline cut and before parallelizing, so that
   the parallel plan shards the converted modules (LoRA adapters follow their base layer);
2. `after_load(model)` on the materialized model, once the weights are loaded and the rest
   initialized (QLoRA quantizes the loaded base here);
3. `after_parallelize(model)`, to restore what parallelizing resets (trainable flags).

A converter whose `after_load` needs the whole weights (`needs_full_weights`, QLoRA: NF4 blocks
are cut from unsharded tensors) moves parallelizing after step 2.
"""

import dataclasses
import logging

import torch
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
        experts = sum(type(m).__name__ == "GroupedExperts" for m in model.modules())
        if experts:
            # Adapters wrap nn.Linear; the routed experts are stacked weights computed by grouped GEMM.
            log.warning("LoRA does not adapt routed experts: the stacked expert weights of %d MoE layers stay frozen "
                        "(attention, shared experts and dense MLPs are adapted)", experts)

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


class Float8Converter(ModelConverter):
    """The blocks' linear layers become torchao's `Float8Linear` (`recipe`: tensorwise or rowwise
    scaling): inputs, weights and gradients are cast to float8 with dynamic scales around each matmul.
    Parameters keep their names, shapes and dtype, so loading, checkpoints and HF export see the
    same model. The head stays as it is (its logits feed the loss in full precision), and so do
    linears whose sizes are not multiples of 16 (float8 matmuls need them). Where the device has no
    float8 matmul (a CPU, a GPU below compute capability 8.9) torchao emulates it: the same casts and
    scales, the product in the compute dtype."""

    def __init__(self, recipe: str, device_type: str):
        try:
            from torchao.float8 import Float8LinearConfig
        except ImportError:
            raise UserError("train.float8 needs torchao: pip install torchao") from None
        emulate = not (device_type == "cuda" and torch.cuda.get_device_capability() >= (8, 9))
        self.recipe = recipe
        self.config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)

    def convert(self, model: nn.Module) -> None:
        from torchao.float8 import convert_to_float8_training

        def takes_float8(module: nn.Module, fqn: str) -> bool:
            return (isinstance(module, nn.Linear) and fqn.split(".")[-1] != "lm_head"
                    and module.in_features % 16 == 0 and module.out_features % 16 == 0)

        convert_to_float8_training(model, config=self.config, module_filter_fn=takes_float8)
        converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
        log.info("float8 (%s scaling%s): %d linear layers converted", self.recipe,
                 ", emulated" if self.config.emulate else "", converted)


def build_converters(config: JobConfig, source_kind: str, dp_shard: int, device_type: str = "cpu") -> list[ModelConverter]:
    lora = config.lora
    if config.train.float8:
        return [Float8Converter(config.train.float8, device_type)]
    if lora.rank <= 0:
        return []
    if source_kind == "flavor":
        raise UserError("LoRA fine-tunes a pretrained model: set model.name_or_path to a Hugging Face directory or a "
                        "meshtron checkpoint (or lora.rank = 0 for full training)")
    return [QLoRAConverter(lora, dp_shard) if lora.quantize_base else LoRAConverter(lora)]
