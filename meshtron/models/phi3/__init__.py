"""The Phi-3 family (`model_type: phi3`: Phi-3, Phi-3.5, Phi-4-mini): the dense decoder with fused
q/k/v and gate/up projections in its checkpoints, LongRoPE, and an optional partial rotary."""

from meshtron.models.common.adapter import StateDictAdapter, split_group
from meshtron.models.common.args import ModelArgs
from meshtron.models.common.hf_dense import DENSE_GROUPS, dense_args_from_hf, dense_hf_kwargs
from meshtron.models.phi3.args import FLAVORS
from meshtron.models.spec import FamilySpec


def adapter(args: ModelArgs) -> StateDictAdapter:
    """Phi-3 checkpoints hold q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`: split on import,
    concatenated on export; the rest maps as in the dense families."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attn, mlp = "layers.{i}.attn.", "layers.{i}.mlp."
    fused = [
        split_group((attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    "model.layers.{i}.self_attn.qkv_proj.weight", [q, kv, kv]),
        split_group((mlp + "gate_proj.weight", mlp + "up_proj.weight"), "model.layers.{i}.mlp.gate_up_proj.weight",
                    [args.ffn_dim, args.ffn_dim]),
    ]
    return StateDictAdapter(args, fused + DENSE_GROUPS, "phi3")


def args_from_hf(cfg) -> ModelArgs:
    if cfg.hidden_act != "silu":
        raise ValueError(f"phi3 with hidden_act {cfg.hidden_act!r} is not supported (supported: silu)")
    return dense_args_from_hf(cfg, "phi3", qkv_bias=False, out_bias=False, qk_norm=False)


def hf_config_from_args(args: ModelArgs):
    from transformers import Phi3Config

    if args.qkv_bias or args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_layers:
        raise ValueError("a phi3 config has no biases, no q/k norm and a window on all layers or none")
    kwargs = dense_hf_kwargs(args)
    kwargs.pop("head_dim")  # Phi-3 derives it from hidden_size / num_attention_heads
    original = (args.rope_scaling or {}).get("original_max_position_embeddings", args.max_seq_len)
    # Token ids come from the source (hf_config_extra); Phi-3's defaults (32000) fit only its own vocabulary.
    return Phi3Config(**kwargs, sliding_window=args.sliding_window, original_max_position_embeddings=original,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)


SPEC = FamilySpec("phi3", ("phi3",), FLAVORS, args_from_hf, hf_config_from_args, adapter=adapter)
