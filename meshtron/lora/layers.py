"""LoRA on the model's nn.Linear layers, optionally over an NF4-quantized frozen base (QLoRA).

`apply_lora` turns each targeted nn.Linear into a `LoRALinear` in place (the instance's class
is swapped and two small linears are attached), so the base weight keeps its name
(`layers.0.attn.q_proj.weight`) and Hugging Face key maps, checkpoints and parallel plans that
address the base layer keep working. The adapter adds `lora_B(lora_A(dropout(x))) * alpha / r`;
B starts at zero, so a fresh adapter leaves the model's outputs unchanged.
"""

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.config.job import LoRAConfig
from meshtron.errors import UserError

# The projections of attention (with DeepSeek's latent attention's: models/common/mla.py) and of the MLPs.
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
              "gate_proj", "up_proj", "down_proj")


def target_names(config: LoRAConfig) -> tuple[str, ...]:
    names = ALL_LINEAR if "all-linear" in config.targets else tuple(config.targets)
    unknown = [n for n in names if n not in ALL_LINEAR]
    if unknown:
        raise UserError(f"lora.targets: unknown module(s) {unknown}; choose from {list(ALL_LINEAR)} or all-linear")
    return names


def validate_lora(config: LoRAConfig) -> None:
    if config.rank <= 0:
        raise UserError(f"lora.rank must be positive to train adapters, got {config.rank}")
    if not 0 <= config.dropout < 1:
        raise UserError(f"lora.dropout must be in [0, 1), got {config.dropout}")
    if config.bias not in ("none", "all", "lora_only"):
        raise UserError(f"lora.bias must be none, all or lora_only, got {config.bias!r}")
    if config.quantize_base not in ("", "nf4"):
        raise UserError(f"lora.quantize_base must be '' or 'nf4', got {config.quantize_base!r}")
    target_names(config)


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter; created by `apply_lora`, never directly."""

    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    scaling: float
    lora_enabled: bool

    def init_weights(self, init) -> None:
        """The adapters (the base weight is its owner's): A Kaiming-uniform (as nn.Linear and PEFT), B zeros."""
        init.uniform_(self.lora_A.weight, "lora_A.weight", 1.0 / self.lora_A.weight.shape[1] ** 0.5)
        init.fill_(self.lora_B.weight, "lora_B.weight", 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.lora_enabled:
            return out
        adapter = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (adapter * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B @ A, computed in float32 (cast by the caller)."""
        base = dequantize(self.weight).float()
        return base + self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    get = getattr(weight, "get_original_weight", None)
    return get() if get is not None else weight


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Attach adapters to the targeted linears in place and freeze everything else.

    Returns the names of the adapted modules. Works on a model on the meta device (adapters are
    created there too and initialized with the model, `init_weights`) or on a materialized one.
    """
    validate_lora(config)
    targets = target_names(config)
    adapted = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in targets:
            _convert(module, config)
            adapted.append(name)
    if not adapted:
        raise UserError(f"lora.targets {list(config.targets)} matched no linear layer of the model")
    mark_trainable(model, config)
    # A model on the meta device has no weights to quantize yet: its builder quantizes after loading.
    if config.quantize_base == "nf4" and not next(model.parameters()).is_meta:
        quantize_base_nf4(model)
    return adapted


def mark_trainable(model: nn.Module, config: LoRAConfig) -> None:
    """Adapters (and the biases `config.bias` names) train; everything else is frozen.

    Call again after parallelizing: torch's SequenceParallel style re-creates norm parameters
    without their requires_grad flag."""
    adapted = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for pname, p in model.named_parameters():
        trainable = ".lora_A." in pname or ".lora_B." in pname
        if pname.endswith(".bias") and config.bias == "all":
            trainable = True
        if pname.endswith(".bias") and config.bias == "lora_only":
            trainable = trainable or pname.rsplit(".", 1)[0] in adapted
        p.requires_grad_(trainable)


def _convert(linear: nn.Linear, config: LoRAConfig) -> None:
    device, dtype = linear.weight.device, linear.weight.dtype
    linear.__class__ = LoRALinear
    linear.lora_A = nn.Linear(linear.in_features, config.rank, bias=False, device=device, dtype=dtype)
    linear.lora_B = nn.Linear(config.rank, linear.out_features, bias=False, device=device, dtype=dtype)
    linear.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
    linear.scaling = config.alpha / config.rank
    linear.lora_enabled = True
    if device.type != "meta":
        init_lora(linear)


@torch.no_grad()
def init_lora(model: nn.Module, seed: int | None = None) -> None:
    """(Re)initialize the adapters of `model` (seeded by their names; the base stays as it is)."""
    from meshtron.models.common.init import ParamInit

    named = [("", model)] if isinstance(model, LoRALinear) else model.named_modules()
    for name, module in named:
        if isinstance(module, LoRALinear):
            module.init_weights(ParamInit(seed).at(name))


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch adapters off (the base model, e.g. the DPO reference) or back on."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_enabled = enabled


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, block_size: int = 64, scaler_block_size: int = 256,
                      num_shards: int = 1) -> None:
    """Store every adapted base weight as a torchao NF4Tensor (frozen); adapters stay in float.

    `num_shards`: the FSDP degree the weights will be split over (each shard needs whole blocks)."""
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:
        raise UserError("QLoRA (lora.quantize_base = 'nf4') needs torchao: pip install torchao") from None
    for module in model.modules():
        if isinstance(module, LoRALinear):
            weight = module.weight
            if weight.numel() % block_size:
                raise UserError(
                    f"NF4 needs weights whose size is a multiple of {block_size}; a {tuple(weight.shape)} "
                    "weight is not (use a float base for this model)"
                )
            # The double-quantization block must divide the number of scales, and FSDP must be able to
            # split the blocks evenly; shrink the block for odd shapes.
            num_scales = weight.numel() // block_size
            fits = [b for b in (scaler_block_size, 128, 64, 32, 16, 8, 4, 2, 1)
                    if num_scales % b == 0 and (num_scales // b) % num_shards == 0]
            if not fits or weight.shape[0] % num_shards:
                raise UserError(f"a {tuple(weight.shape)} weight cannot be split in NF4 over {num_shards} FSDP shards; "
                                "change parallel.dp_shard or use a float base")
            scaler_block = fits[0]
            nf4 = NF4Tensor.from_tensor(weight.detach(), block_size, scaler_block)
            module.weight = nn.Parameter(nf4, requires_grad=False)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable (adapter) tensors."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list({id(p): p for p in model.parameters()}.values())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
