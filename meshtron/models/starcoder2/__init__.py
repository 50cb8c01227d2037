"""The StarCoder2 family (`model_type: starcoder2`)."""

from meshtron.models.common.adapter import StateDictAdapter, renames
from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.spec import FamilySpec
from meshtron.models.starcoder2.args import FLAVORS, Starcoder2Args
from meshtron.models.starcoder2.model import Starcoder2
from meshtron.models.starcoder2.parallelize import PLAN

GROUPS = renames([
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.{rest}", "model.norm.{rest}"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.{rest}", "model.layers.{i}.input_layernorm.{rest}"),
    ("layers.{i}.mlp_norm.{rest}", "model.layers.{i}.post_attention_layernorm.{rest}"),
    ("layers.{i}.attn.{rest}", "model.layers.{i}.self_attn.{rest}"),
    ("layers.{i}.mlp.up_proj.{rest}", "model.layers.{i}.mlp.c_fc.{rest}"),
    ("layers.{i}.mlp.down_proj.{rest}", "model.layers.{i}.mlp.c_proj.{rest}"),
])


def adapter(args: Starcoder2Args) -> StateDictAdapter:
    return StateDictAdapter(args, GROUPS, "starcoder2")


def args_from_hf(cfg) -> Starcoder2Args:
    if cfg.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"starcoder2 with hidden_act {cfg.hidden_act!r} is not supported "
                         "(supported: gelu_pytorch_tanh)")
    bias = bool(cfg.use_bias)
    dense = dense_args_from_hf(cfg, "starcoder2", qkv_bias=bias, out_bias=bias, qk_norm=False,
                               norm_eps=cfg.norm_epsilon)
    return Starcoder2Args(**{**dense.to_dict(), "mlp_bias": bias})


def hf_config_from_args(args: Starcoder2Args):
    from transformers import Starcoder2Config

    if not args.qkv_bias == args.out_bias == args.mlp_bias or args.qk_norm or args.sliding_layers:
        raise ValueError("a starcoder2 config has one use_bias for attention and the MLP, no q/k norm and a "
                         "window on all layers or none")
    kwargs = dense_hf_kwargs(args)
    kwargs["norm_epsilon"] = kwargs.pop("rms_norm_eps")
    # Token ids come from the source (hf_config_extra); StarCoder2's defaults fit only its own vocabulary.
    return Starcoder2Config(**kwargs, use_bias=args.qkv_bias, sliding_window=args.sliding_window,
                            hidden_act="gelu_pytorch_tanh", bos_token_id=None, eos_token_id=None, pad_token_id=None)


SPEC = FamilySpec("starcoder2", ("starcoder2",), FLAVORS, args_from_hf, hf_config_from_args, build=Starcoder2,
                  adapter=adapter, plan=PLAN, args_cls=Starcoder2Args)
