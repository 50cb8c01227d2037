"""The Qwen3 dense family: per-head RMSNorm on q and k, explicit head_dim."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs, sliding_hf_kwargs
from meshtron.models.qwen3.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg):
    bias = bool(getattr(cfg, "attention_bias", False))
    return dense_args_from_hf(cfg, "qwen3", qkv_bias=bias, out_bias=bias, qk_norm=True)


def hf_config_from_args(args):
    from transformers import Qwen3Config

    if args.qkv_bias != args.out_bias or args.mlp_bias or not args.qk_norm:
        raise ValueError("a qwen3 config has q/k norm and one attention_bias for q/k/v/o")
    return Qwen3Config(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, **sliding_hf_kwargs(args))


SPEC = FamilySpec("qwen3", ("qwen3",), FLAVORS, args_from_hf, hf_config_from_args)
