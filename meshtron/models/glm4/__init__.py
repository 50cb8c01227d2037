"""The GLM-4 family (`model_type: glm4`: GLM-4-0414). Its checkpoints hold gate/up as one
`gate_up_proj` (split on import, concatenated on export) and name the four norms of a layer
input / post_self_attn / post_attention / post_mlp."""

from meshtron.models.common.adapter import StateDictAdapter, renames, split_group
from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.common.parallelize import SANDWICH_PLAN
from meshtron.models.glm4.args import FLAVORS, Glm4Args
from meshtron.models.glm4.model import Glm4
from meshtron.models.spec import FamilySpec

_RENAMES = renames([
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.post_attn_norm.weight", "model.layers.{i}.post_self_attn_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.post_mlp_norm.weight", "model.layers.{i}.post_mlp_layernorm.weight"),
    ("layers.{i}.attn.{rest}", "model.layers.{i}.self_attn.{rest}"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
])


def adapter(args: Glm4Args) -> StateDictAdapter:
    mlp = "layers.{i}.mlp."
    gate_up = split_group((mlp + "gate_proj.weight", mlp + "up_proj.weight"), "model.layers.{i}.mlp.gate_up_proj.weight",
                          [args.ffn_dim, args.ffn_dim])
    return StateDictAdapter(args, [gate_up, *_RENAMES], "glm4")


def args_from_hf(cfg) -> Glm4Args:
    if cfg.hidden_act != "silu":
        raise ValueError(f"glm4 with hidden_act {cfg.hidden_act!r} is not supported (supported: silu)")
    dense = dense_args_from_hf(cfg, "glm4", qkv_bias=bool(cfg.attention_bias), out_bias=False, qk_norm=False)
    return Glm4Args(**dense.to_dict())


def hf_config_from_args(args: Glm4Args):
    from transformers import Glm4Config

    if args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_window is not None:
        raise ValueError("a glm4 config has bias on q/k/v only (or none), no q/k norm and no sliding window")
    kwargs = dense_hf_kwargs(args)
    # Always written: Glm4Config reads a missing factor as 0.5, not 1.
    kwargs["rope_parameters"]["partial_rotary_factor"] = args.partial_rotary
    # Token ids come from the source (hf_config_extra); GLM's defaults fit only its own vocabulary.
    return Glm4Config(**kwargs, attention_bias=args.qkv_bias, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)


SPEC = FamilySpec("glm4", ("glm4",), FLAVORS, args_from_hf, hf_config_from_args, build=Glm4, adapter=adapter,
                  plan=SANDWICH_PLAN, args_cls=Glm4Args)
