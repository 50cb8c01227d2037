"""The SmolLM3 family (`model_type: smollm3`): the dense decoder with NoPE layers."""

from dataclasses import replace

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.smollm3.args import FLAVORS, SmolLM3Args
from meshtron.models.smollm3.model import SmolLM3
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg) -> SmolLM3Args:
    if cfg.hidden_act != "silu":
        raise ValueError(f"smollm3 with hidden_act {cfg.hidden_act!r} is not supported (supported: silu)")
    bias = bool(cfg.attention_bias)
    dense = dense_args_from_hf(cfg, "smollm3", qkv_bias=bias, out_bias=bias, qk_norm=False)
    if not cfg.use_sliding_window:  # the window applies only when switched on
        dense = replace(dense, sliding_window=None, sliding_layers=())
    # Hugging Face lists a flag per layer: 1 uses RoPE, 0 does not.
    no_rope = tuple(i for i, uses_rope in enumerate(cfg.no_rope_layers) if not uses_rope)
    return SmolLM3Args(**dense.to_dict(), no_rope_layers=no_rope)


def hf_config_from_args(args: SmolLM3Args):
    from transformers import SmolLM3Config

    if args.qkv_bias != args.out_bias or args.qk_norm:
        raise ValueError("a smollm3 config has one attention_bias for q/k/v/o and no q/k norm")
    sliding = set(args.sliding_layers or range(args.num_layers)) if args.sliding_window is not None else set()
    layer_types = ["sliding_attention" if i in sliding else "full_attention" for i in range(args.num_layers)]
    # Token ids come from the source (hf_config_extra); SmolLM3's defaults fit only its own vocabulary.
    return SmolLM3Config(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias,
                         use_sliding_window=bool(sliding), sliding_window=args.sliding_window,
                         layer_types=layer_types,
                         no_rope_layers=[int(i not in args.no_rope_layers) for i in range(args.num_layers)],
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)


SPEC = FamilySpec("smollm3", ("smollm3",), FLAVORS, args_from_hf, hf_config_from_args, build=SmolLM3,
                  args_cls=SmolLM3Args)
