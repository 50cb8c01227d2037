"""The Qwen2 / Qwen2.5 family: bias on q/k/v, optional sliding window on the upper layers."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs, sliding_hf_kwargs
from meshtron.models.qwen2.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg):
    return dense_args_from_hf(cfg, "qwen2", qkv_bias=True, out_bias=False, qk_norm=False)


def hf_config_from_args(args):
    from transformers import Qwen2Config

    if not args.qkv_bias or args.out_bias or args.mlp_bias or args.qk_norm:
        raise ValueError("a qwen2 config has bias on q/k/v only and no q/k norm")
    return Qwen2Config(**dense_hf_kwargs(args), **sliding_hf_kwargs(args))


SPEC = FamilySpec("qwen2", ("qwen2",), FLAVORS, args_from_hf, hf_config_from_args)
