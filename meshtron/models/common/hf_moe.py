"""Hugging Face adapter pieces shared by the MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE).

transformers 5 fuses a layer's experts in memory but `save_pretrained` writes (and `from_pretrained`
reads) one tensor per expert and projection: Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2`
(gate/up/down), Qwen's `mlp.experts.{e}.gate_proj/up_proj/down_proj`. Those on-disk names are what we
load and save; our experts are stacked (`mlp.experts.gate_proj` (E, I, D) ...).
"""

from meshtron.models.common.adapter import StateDictAdapter, TensorGroup
from meshtron.models.common.hf_dense import DENSE_GROUPS, dense_args_from_hf
from meshtron.models.common.moe import MoEArgs, stacked_experts_group


def moe_adapter(args: MoEArgs, hf_mlp: str = "mlp", expert_names=("gate_proj", "up_proj", "down_proj")) -> StateDictAdapter:
    """The dense groups, preceded by the MoE layer's: stacked experts, the router (the checkpoint's
    `gate`) and the shared expert and its gate (same names on both sides)."""
    hf = f"model.layers.{{i}}.{hf_mlp}"
    groups = [
        stacked_experts_group("layers.{i}.mlp.experts", hf + ".experts.{e}.{name}.weight", expert_names,
                              args.num_experts),
        TensorGroup(("layers.{i}.mlp.router.weight",), (hf + ".gate.weight",)),
        *DENSE_GROUPS,
    ]
    return StateDictAdapter(args, groups, args.family)


def moe_args_from_hf(cfg, family: str, *, num_experts: int, expert_ffn_dim: int, norm_topk: bool,
                     qkv_bias: bool, out_bias: bool, qk_norm: bool, **moe_fields) -> MoEArgs:
    """The dense fields, plus the MoE ones every family has. The load-balancing loss is on in training
    when the config asks transformers for it (`output_router_logits`)."""
    dense = dense_args_from_hf(cfg, family, qkv_bias=qkv_bias, out_bias=out_bias, qk_norm=qk_norm)
    coef = cfg.router_aux_loss_coef if getattr(cfg, "output_router_logits", False) else 0.0
    return MoEArgs(**dense.to_dict(), num_experts=num_experts, num_experts_per_token=cfg.num_experts_per_tok,
                   expert_ffn_dim=expert_ffn_dim, norm_topk=norm_topk, aux_loss_coef=coef, **moe_fields)


def moe_hf_kwargs(args: MoEArgs) -> dict:
    """Config keywords common to the MoE config classes (beside `dense_hf_kwargs`)."""
    if args.score_func != "softmax" or args.route_scale != 1.0 or args.capacity_factor is not None:
        raise ValueError("Hugging Face MoE configs of these families route by softmax, unscaled and dropless; "
                         "set score_func = 'softmax', route_scale = 1.0 and capacity_factor = None to export")
    if args.bias_update_rate:
        raise ValueError("Hugging Face MoE configs of these families have no routing bias, which auxiliary-loss-free "
                         "balancing (bias_update_rate) trained into this model's expert choice; it cannot be exported "
                         "to them (meshtron generate, chat and eval use the checkpoint as it is)")
    return dict(num_experts_per_tok=args.num_experts_per_token, output_router_logits=args.aux_loss_coef > 0,
                router_aux_loss_coef=args.aux_loss_coef or 0.001)
