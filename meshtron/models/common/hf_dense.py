"""Hugging Face adapter pieces shared by the dense families: their tensor groups and the
translation between a transformers config and `ModelArgs`.

Our RoPE uses the same rotate-half layout as Hugging Face checkpoints, so the dense families'
tensors map one to one by name; no permutation is needed.
"""

from meshtron.models.common.adapter import StateDictAdapter, renames
from meshtron.models.common.args import ModelArgs

# (ours, hf) name templates; {i} is a layer index, {rest} any suffix.
DENSE_GROUPS = renames([
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.{rest}", "model.layers.{i}.self_attn.{rest}"),
    ("layers.{i}.mlp.{rest}", "model.layers.{i}.mlp.{rest}"),
])


def dense_adapter(args: ModelArgs) -> StateDictAdapter:
    return StateDictAdapter(args, DENSE_GROUPS, args.family)


def rope_from_hf(cfg, rope_parameters: dict | None = None) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial rotary factor) from a transformers config (v5
    `rope_parameters` or legacy fields), or from `rope_parameters` given apart (one kind of layer's)."""
    params = dict(rope_parameters or getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(cfg, "rope_theta", None) or 10000.0
    partial = float(params.pop("partial_rotary_factor", None) or getattr(cfg, "partial_rotary_factor", None) or 1.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None, partial
    params["rope_type"] = rope_type
    params.pop("type", None)
    if rope_type == "longrope":  # Phi-3 keeps the original context beside the rope parameters
        params.setdefault("original_max_position_embeddings", cfg.original_max_position_embeddings)
    return float(theta), params, partial


def rope_to_hf(args: ModelArgs) -> dict:
    params = {"rope_theta": args.rope_theta, "rope_type": "default"}
    if args.partial_rotary != 1.0:
        params["partial_rotary_factor"] = args.partial_rotary
    params.update(args.rope_scaling or {})
    return params


def dense_args_from_hf(cfg, family: str, *, qkv_bias: bool, out_bias: bool, qk_norm: bool,
                       rope_parameters: dict | None = None, norm_eps: float | None = None) -> ModelArgs:
    """`rope_parameters`: the RoPE of the args when the config holds several (one per kind of layer).
    `norm_eps`: for a config without `rms_norm_eps` (a LayerNorm family names its epsilon otherwise)."""
    theta, scaling, partial = rope_from_hf(cfg, rope_parameters)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    sliding_layers: tuple[int, ...] = ()
    if window is not None and layer_types:
        sliding_layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
        if not sliding_layers:
            window = None
    num_heads = cfg.num_attention_heads
    return ModelArgs(
        family=family,
        vocab_size=cfg.vocab_size,
        dim=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
        ffn_dim=cfg.intermediate_size,
        norm_eps=cfg.rms_norm_eps if norm_eps is None else norm_eps,
        max_seq_len=cfg.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary=partial,
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=qk_norm,
        sliding_window=window,
        sliding_layers=sliding_layers,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        init_std=getattr(cfg, "initializer_range", 0.02),
    )


def dense_hf_kwargs(args: ModelArgs) -> dict:
    """Config keywords common to the dense families' transformers config classes."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_parameters=rope_to_hf(args),
        tie_word_embeddings=args.tie_embeddings,
        initializer_range=args.init_std,
    )


def sliding_hf_kwargs(args: ModelArgs) -> dict:
    """Qwen-style sliding window fields: a window on the layers listed in `layer_types`."""
    if args.sliding_window is None:
        return dict(use_sliding_window=False)
    layers = set(args.sliding_layers or range(args.num_layers))
    layer_types = ["sliding_attention" if i in layers else "full_attention" for i in range(args.num_layers)]
    return dict(use_sliding_window=True, sliding_window=args.sliding_window, layer_types=layer_types)
