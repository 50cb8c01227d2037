"""The Qwen3-MoE family (Qwen3-30B-A3B, 235B-A22B): Qwen3's decoder (per-head q/k RMSNorm) with MoE layers
of fine-grained experts, no shared expert; top-k scores renormalized only with `norm_topk_prob` (default
false); `decoder_sparse_step` / `mlp_only_layers` keep some layers dense."""

from meshtron.models.common.hf_dense import dense_hf_kwargs, sliding_hf_kwargs
from meshtron.models.common.hf_moe import moe_adapter, moe_args_from_hf, moe_hf_kwargs
from meshtron.models.common.moe import MoEArgs, MoETransformer
from meshtron.models.common.parallelize import MOE_PLAN
from meshtron.models.qwen3_moe.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg) -> MoEArgs:
    bias = bool(getattr(cfg, "attention_bias", False))
    return moe_args_from_hf(cfg, "qwen3_moe", num_experts=cfg.num_experts, expert_ffn_dim=cfg.moe_intermediate_size,
                            norm_topk=cfg.norm_topk_prob, qkv_bias=bias, out_bias=bias, qk_norm=True,
                            moe_step=cfg.decoder_sparse_step, dense_layers=tuple(cfg.mlp_only_layers))


def hf_config_from_args(args: MoEArgs):
    from transformers import Qwen3MoeConfig

    if args.qkv_bias != args.out_bias or args.mlp_bias or not args.qk_norm or args.shared_expert_ffn_dim:
        raise ValueError("a qwen3_moe config has q/k norm, one attention_bias for q/k/v/o and no shared expert")
    return Qwen3MoeConfig(**dense_hf_kwargs(args), **moe_hf_kwargs(args), **sliding_hf_kwargs(args),
                          attention_bias=args.qkv_bias, num_experts=args.num_experts,
                          moe_intermediate_size=args.expert_ffn_dim, norm_topk_prob=args.norm_topk,
                          decoder_sparse_step=args.moe_step, mlp_only_layers=list(args.dense_layers))


SPEC = FamilySpec("qwen3_moe", ("qwen3_moe",), FLAVORS, args_from_hf, hf_config_from_args, build=MoETransformer,
                  adapter=moe_adapter, plan=MOE_PLAN, args_cls=MoEArgs)
