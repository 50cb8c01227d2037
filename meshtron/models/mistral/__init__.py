"""The Mistral family: Llama-shaped, with a sliding attention window on every layer when set."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.mistral.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg):
    return dense_args_from_hf(cfg, "mistral", qkv_bias=False, out_bias=False, qk_norm=False)


def hf_config_from_args(args):
    from transformers import MistralConfig

    if args.qkv_bias or args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_layers:
        raise ValueError("a mistral config has no biases, no q/k norm and a window on all layers or none")
    return MistralConfig(**dense_hf_kwargs(args), sliding_window=args.sliding_window)


SPEC = FamilySpec("mistral", ("mistral",), FLAVORS, args_from_hf, hf_config_from_args)
