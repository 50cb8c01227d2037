"""The Gemma 3 family, text only (`model_type: gemma3_text`, transformers' Gemma3ForCausalLM). Its
checkpoints name tensors as Gemma 2's do (plus q_norm / k_norm under self_attn)."""

from meshtron.models.common.adapter import StateDictAdapter
from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs, rope_to_hf
from meshtron.models.common.parallelize import SANDWICH_PLAN
from meshtron.models.gemma2 import HF_ACTIVATIONS, GROUPS
from meshtron.models.gemma3.args import FLAVORS, Gemma3Args
from meshtron.models.gemma3.model import Gemma3
from meshtron.models.spec import FamilySpec


def adapter(args: Gemma3Args) -> StateDictAdapter:
    return StateDictAdapter(args, GROUPS, "gemma3")


def args_from_hf(cfg) -> Gemma3Args:
    if cfg.hidden_activation not in HF_ACTIVATIONS:
        raise ValueError(f"gemma3 with hidden_activation {cfg.hidden_activation!r} is not supported "
                         f"(supported: {', '.join(HF_ACTIVATIONS)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ValueError("gemma3 with use_bidirectional_attention (an encoder, EmbeddingGemma) is not supported")
    bias = bool(cfg.attention_bias)
    # One RoPE per kind of layer: the args hold the full layers', the local base beside it.
    dense = dense_args_from_hf(cfg, "gemma3", qkv_bias=bias, out_bias=bias, qk_norm=True,
                               rope_parameters=cfg.rope_parameters["full_attention"])
    local = cfg.rope_parameters["sliding_attention"]
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3 with a {local['rope_type']!r} RoPE on its sliding layers is not supported")
    return Gemma3Args(**dense.to_dict(), query_pre_attn_scalar=int(cfg.query_pre_attn_scalar),
                      attn_softcap=cfg.attn_logit_softcapping, final_softcap=cfg.final_logit_softcapping,
                      activation=HF_ACTIVATIONS[cfg.hidden_activation], rope_local_theta=float(local["rope_theta"]))


def hf_config_from_args(args: Gemma3Args):
    from transformers import Gemma3TextConfig

    if args.qkv_bias != args.out_bias or args.mlp_bias or not args.qk_norm or args.partial_rotary != 1.0:
        raise ValueError("a gemma3 config has one attention_bias for q/k/v/o, no MLP bias, q/k norms and a "
                         "full rotary")
    sliding = set(args.sliding_layers or range(args.num_layers)) if args.sliding_window is not None else set()
    layer_types = ["sliding_attention" if i in sliding else "full_attention" for i in range(args.num_layers)]
    activation = {ours: hf for hf, ours in HF_ACTIVATIONS.items()}[args.activation]
    rope = {"full_attention": rope_to_hf(args),
            "sliding_attention": {"rope_type": "default", "rope_theta": args.rope_local_theta}}
    # Token ids come from the source (hf_config_extra); Gemma's defaults fit only its own vocabulary.
    return Gemma3TextConfig(**{**dense_hf_kwargs(args), "rope_parameters": rope}, attention_bias=args.qkv_bias,
                            hidden_activation=activation, query_pre_attn_scalar=args.query_pre_attn_scalar,
                            sliding_window=args.sliding_window, layer_types=layer_types,
                            attn_logit_softcapping=args.attn_softcap, final_logit_softcapping=args.final_softcap,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)


SPEC = FamilySpec("gemma3", ("gemma3_text",), FLAVORS, args_from_hf, hf_config_from_args, build=Gemma3,
                  adapter=adapter, plan=SANDWICH_PLAN, args_cls=Gemma3Args)
