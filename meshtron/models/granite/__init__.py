"""The Granite family (`model_type: granite`: IBM Granite 3.x dense models)."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.granite.args import FLAVORS, GraniteArgs
from meshtron.models.granite.model import Granite
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg) -> GraniteArgs:
    if cfg.hidden_act != "silu":
        raise ValueError(f"granite with hidden_act {cfg.hidden_act!r} is not supported (supported: silu)")
    bias = bool(cfg.attention_bias)
    dense = dense_args_from_hf(cfg, "granite", qkv_bias=bias, out_bias=bias, qk_norm=False)
    return GraniteArgs(**dense.to_dict(), embedding_multiplier=float(cfg.embedding_multiplier),
                       residual_multiplier=float(cfg.residual_multiplier),
                       attention_multiplier=float(cfg.attention_multiplier), logits_scaling=float(cfg.logits_scaling))


def hf_config_from_args(args: GraniteArgs):
    from transformers import GraniteConfig

    if args.qkv_bias != args.out_bias or args.qk_norm or args.sliding_window is not None:
        raise ValueError("a granite config has one attention_bias for q/k/v/o and no q/k norm or sliding window")
    return GraniteConfig(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias,
                         embedding_multiplier=args.embedding_multiplier, residual_multiplier=args.residual_multiplier,
                         attention_multiplier=args.attention_multiplier, logits_scaling=args.logits_scaling)


SPEC = FamilySpec("granite", ("granite",), FLAVORS, args_from_hf, hf_config_from_args, build=Granite,
                  args_cls=GraniteArgs)
