"""The Llama family (Llama 2, Llama 3.x, SmolLM2 and other `model_type: llama` checkpoints)."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.llama.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg):
    bias = bool(getattr(cfg, "attention_bias", False))
    return dense_args_from_hf(cfg, "llama", qkv_bias=bias, out_bias=bias, qk_norm=False)


def hf_config_from_args(args):
    from transformers import LlamaConfig

    if args.qkv_bias != args.out_bias or args.qk_norm or args.sliding_window is not None:
        raise ValueError("a llama config has one attention_bias for q/k/v/o and no q/k norm or sliding window")
    return LlamaConfig(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias)


SPEC = FamilySpec("llama", ("llama",), FLAVORS, args_from_hf, hf_config_from_args)
