"""The Gemma 2 family (`model_type: gemma2`)."""

from meshtron.models.common.adapter import StateDictAdapter, renames
from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.gemma2.args import FLAVORS, Gemma2Args
from meshtron.models.gemma2.model import Gemma2
from meshtron.models.common.parallelize import SANDWICH_PLAN
from meshtron.models.spec import FamilySpec

GROUPS = renames([
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.post_attn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.pre_feedforward_layernorm.weight"),
    ("layers.{i}.post_mlp_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
    ("layers.{i}.attn.{rest}", "model.layers.{i}.self_attn.{rest}"),
    ("layers.{i}.mlp.{rest}", "model.layers.{i}.mlp.{rest}"),
])
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}  # Hugging Face name -> ours (Gemma 3 too)


def adapter(args: Gemma2Args) -> StateDictAdapter:
    return StateDictAdapter(args, GROUPS, "gemma2")


def args_from_hf(cfg) -> Gemma2Args:
    if cfg.hidden_activation not in HF_ACTIVATIONS:
        raise ValueError(f"gemma2 with hidden_activation {cfg.hidden_activation!r} is not supported "
                         f"(supported: {', '.join(HF_ACTIVATIONS)})")
    bias = bool(getattr(cfg, "attention_bias", False))
    dense = dense_args_from_hf(cfg, "gemma2", qkv_bias=bias, out_bias=bias, qk_norm=False)
    return Gemma2Args(**dense.to_dict(), query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
                      attn_softcap=cfg.attn_logit_softcapping, final_softcap=cfg.final_logit_softcapping,
                      activation=HF_ACTIVATIONS[cfg.hidden_activation])


def hf_config_from_args(args: Gemma2Args):
    from transformers import Gemma2Config

    if args.qkv_bias != args.out_bias or args.mlp_bias or args.qk_norm:
        raise ValueError("a gemma2 config has one attention_bias for q/k/v/o, no MLP bias and no q/k norm")
    sliding = set(args.sliding_layers or range(args.num_layers)) if args.sliding_window is not None else set()
    layer_types = ["sliding_attention" if i in sliding else "full_attention" for i in range(args.num_layers)]
    activation = {ours: hf for hf, ours in HF_ACTIVATIONS.items()}[args.activation]
    return Gemma2Config(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, hidden_activation=activation,
                        query_pre_attn_scalar=args.query_pre_attn_scalar, sliding_window=args.sliding_window,
                        layer_types=layer_types, attn_logit_softcapping=args.attn_softcap,
                        final_logit_softcapping=args.final_softcap)


SPEC = FamilySpec("gemma2", ("gemma2",), FLAVORS, args_from_hf, hf_config_from_args, build=Gemma2, adapter=adapter,
                  plan=SANDWICH_PLAN, args_cls=Gemma2Args)
