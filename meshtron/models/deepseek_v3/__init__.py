"""The DeepSeek-V3 family (DeepSeek-V3 / R1, Kimi K2, Moonlight): multi-head latent attention with the
latent cached, `first_k_dense_replace` dense layers, then MoE layers with an ungated shared expert
(`moe_intermediate_size * n_shared_experts` wide) and DeepSeek-V3's routing: float32 sigmoid scores, the
`e_score_correction_bias` added for the choice only, the choice limited to the `topk_group` best of
`n_group` groups (a group scored by its two best experts), the chosen experts' unbiased scores normalized
(`norm_topk_prob`) and scaled by `routed_scaling_factor`. Multi-token prediction layers are not built; a
checkpoint's are skipped on load."""

import torch

from meshtron.models.common.adapter import StateDictAdapter, TensorGroup, renames
from meshtron.models.common.hf_dense import DENSE_GROUPS, dense_args_from_hf, dense_hf_kwargs
from meshtron.models.common.moe import stacked_experts_group
from meshtron.models.deepseek_v3.args import FLAVORS, DeepSeekArgs
from meshtron.models.deepseek_v3.model import DeepSeekTransformer
from meshtron.models.deepseek_v3.parallelize import PLAN
from meshtron.models.spec import FamilySpec


def adapter(args: DeepSeekArgs) -> StateDictAdapter:
    """Stacked experts <-> one tensor per expert on disk; the router is the checkpoint's `gate` (its bias
    `e_score_correction_bias`), the shared expert its `shared_experts`; attention maps by name. The MTP
    modules' groups come first: their layer indices (num_layers...) also match the decoder layers' templates."""
    mtp = range(args.num_layers, args.num_layers + args.num_mtp_layers)
    layer_groups = _layer_groups(args)
    groups = [*(group for n in mtp for group in _mtp_groups(layer_groups, n)), *layer_groups, *DENSE_GROUPS,
              *MTP_GROUPS]
    return DeepSeekAdapter(args, groups, args.family)


def _layer_groups(args: DeepSeekArgs) -> list[TensorGroup]:
    hf = "model.layers.{i}.mlp"
    return [
        stacked_experts_group("layers.{i}.mlp.experts", hf + ".experts.{e}.{name}.weight",
                              ("gate_proj", "up_proj", "down_proj"), args.num_experts),
        *renames([("layers.{i}.mlp.router.weight", hf + ".gate.weight"),
                  ("layers.{i}.mlp.router.expert_bias", hf + ".gate.e_score_correction_bias"),
                  ("layers.{i}.mlp.shared_expert.{rest}", hf + ".shared_experts.{rest}")]),
    ]


def _mtp_groups(layer_groups: list[TensorGroup], n: int) -> list[TensorGroup]:
    """MTP module `n`'s tensors: a decoder layer's (the layer groups with `mtp.n` for `layers.{i}`) and its own."""
    block = [g for g in layer_groups + DENSE_GROUPS if g.ours[0].startswith("layers.{i}.")]
    own = renames([(f"mtp.{{i}}.{name}", f"model.layers.{{i}}.{hf}") for name, hf in MTP_OWN])
    return [TensorGroup(tuple(t.replace("layers.{i}", f"mtp.{n}").replace("mtp.{i}", f"mtp.{n}") for t in g.ours),
                        tuple(t.replace("{i}", str(n)) for t in g.hf), g.to_hf, g.from_hf) for g in block + own]


# An MTP module's own tensors beside its decoder layer's: (ours, the checkpoint's under model.layers.{i}).
MTP_OWN = [("enorm.weight", "enorm.weight"), ("hnorm.weight", "hnorm.weight"), ("eh_proj.weight", "eh_proj.weight"),
           ("head_norm.weight", "shared_head.norm.weight")]
# The copies of the embedding and the head that each MTP layer of a checkpoint holds (the model shares the main
# ones); and all of an MTP layer's own tensors when the model holds no MTP module. Named so that they are
# recognized; no parameter of ours has these names, so they are skipped unread on load.
MTP_GROUPS = renames([(f"mtp.{{i}}.{name}", f"model.layers.{{i}}.{name}")
                      for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight",
                                   "shared_head.norm.weight", "shared_head.head.weight")])


class DeepSeekAdapter(StateDictAdapter):
    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each MTP layer is written with its copies of the embedding and the head, as DeepSeek's checkpoints
        hold them (safetensors refuses tensors that share storage: clones)."""
        out = super().to_hf(state_dict)
        for n in range(self.args.num_layers, self.args.num_layers + self.args.num_mtp_layers):
            out[f"model.layers.{n}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
            out[f"model.layers.{n}.shared_head.head.weight"] = out["lm_head.weight"].clone()
        return out


def deepseek_args_from_hf(cfg, family: str, **routing) -> DeepSeekArgs:
    """The fields DeepSeek-V2 and V3 configs share; `routing`: the family's router fields."""
    bias = bool(cfg.attention_bias)
    dense = dense_args_from_hf(cfg, family, qkv_bias=bias, out_bias=bias, qk_norm=False).to_dict()
    dense.update(num_kv_heads=cfg.num_attention_heads, head_dim=cfg.qk_rope_head_dim)
    return DeepSeekArgs(
        **dense, num_experts=cfg.n_routed_experts, num_experts_per_token=cfg.num_experts_per_tok,
        expert_ffn_dim=cfg.moe_intermediate_size,
        shared_expert_ffn_dim=cfg.moe_intermediate_size * (cfg.n_shared_experts or 0), shared_expert_gated=False, route_scale=cfg.routed_scaling_factor,
        dense_layers=tuple(range(cfg.first_k_dense_replace or 0)), q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim, **routing)


def deepseek_hf_kwargs(args: DeepSeekArgs) -> dict:
    """The config keywords DeepSeek-V2 and V3 share; refuses what their configs cannot express."""
    first_dense = len(args.dense_layers)
    if (args.qkv_bias != args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_window is not None
            or args.moe_step != 1 or args.dense_layers != tuple(range(first_dense)) or args.shared_expert_gated
            or args.shared_expert_ffn_dim % args.expert_ffn_dim or args.capacity_factor is not None):
        raise ValueError("a DeepSeek config has one attention_bias, no MLP bias, q/k norm or window, the first "
                         "layers dense and the rest MoE, dropless, with an ungated shared expert a multiple of "
                         "an expert's width")
    kwargs = dense_hf_kwargs(args)
    del kwargs["head_dim"]  # the config derives it (qk_rope_head_dim)
    return dict(**kwargs, n_routed_experts=args.num_experts, num_experts_per_tok=args.num_experts_per_token,
                moe_intermediate_size=args.expert_ffn_dim,
                n_shared_experts=args.shared_expert_ffn_dim // args.expert_ffn_dim, routed_scaling_factor=args.route_scale, first_k_dense_replace=first_dense,
                q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_rope_head_dim=args.head_dim,
                qk_nope_head_dim=args.qk_nope_head_dim, v_head_dim=args.v_head_dim, attention_bias=args.qkv_bias)


def args_from_hf(cfg) -> DeepSeekArgs:
    return deepseek_args_from_hf(cfg, "deepseek_v3", score_func="sigmoid", router_bias=True, group_score="top2",
                                 num_groups=cfg.n_group or 1, topk_groups=cfg.topk_group or 1,
                                 norm_topk=bool(cfg.norm_topk_prob), rope_interleave=bool(cfg.rope_interleave),
                                 num_mtp_layers=cfg.num_nextn_predict_layers or 0)


def hf_config_from_args(args: DeepSeekArgs):
    from transformers import DeepseekV3Config

    if args.score_func != "sigmoid" or not args.router_bias or args.group_score != "top2":
        raise ValueError("a deepseek_v3 config routes by sigmoid scores with a bias, groups scored by their two "
                         "best experts")
    return DeepseekV3Config(**deepseek_hf_kwargs(args), n_group=args.num_groups, topk_group=args.topk_groups,
                            norm_topk_prob=args.norm_topk, rope_interleave=args.rope_interleave,
                            num_nextn_predict_layers=args.num_mtp_layers)


SPEC = FamilySpec("deepseek_v3", ("deepseek_v3",), FLAVORS, args_from_hf, hf_config_from_args,
                  build=DeepSeekTransformer, adapter=adapter, plan=PLAN, args_cls=DeepSeekArgs)
