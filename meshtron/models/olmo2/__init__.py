"""The OLMo 2 family (`model_type: olmo2`)."""

from meshtron.models.common.adapter import StateDictAdapter, renames
from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.olmo2.args import FLAVORS, Olmo2Args
from meshtron.models.olmo2.model import Olmo2
from meshtron.models.olmo2.parallelize import PLAN
from meshtron.models.spec import FamilySpec

GROUPS = renames([
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.post_attn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.post_mlp_norm.weight", "model.layers.{i}.post_feedforward_layernorm.weight"),
    ("layers.{i}.attn.{rest}", "model.layers.{i}.self_attn.{rest}"),
    ("layers.{i}.mlp.{rest}", "model.layers.{i}.mlp.{rest}"),
])


def adapter(args: Olmo2Args) -> StateDictAdapter:
    return StateDictAdapter(args, GROUPS, "olmo2")


def args_from_hf(cfg) -> Olmo2Args:
    if cfg.hidden_act != "silu":
        raise ValueError(f"olmo2 with hidden_act {cfg.hidden_act!r} is not supported (supported: silu)")
    bias = bool(cfg.attention_bias)
    dense = dense_args_from_hf(cfg, "olmo2", qkv_bias=bias, out_bias=bias, qk_norm=False)
    return Olmo2Args(**dense.to_dict())


def hf_config_from_args(args: Olmo2Args):
    from transformers import Olmo2Config

    if args.qkv_bias != args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_window is not None:
        raise ValueError("an olmo2 config has one attention_bias for q/k/v/o, no MLP bias, its own q/k norms "
                         "(not per head) and no sliding window")
    # Token ids come from the source (hf_config_extra); OLMo 2's defaults fit only its own vocabulary.
    return Olmo2Config(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, bos_token_id=None, eos_token_id=None,
                       pad_token_id=None)


SPEC = FamilySpec("olmo2", ("olmo2",), FLAVORS, args_from_hf, hf_config_from_args, build=Olmo2, adapter=adapter,
                  plan=PLAN, args_cls=Olmo2Args)
