"""The Qwen2-MoE family (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's decoder (bias on q/k/v) with MoE layers of
fine-grained experts (top-k scores not renormalized unless `norm_topk_prob`) plus one shared expert scaled
by its own sigmoid gate; `decoder_sparse_step` / `mlp_only_layers` keep some layers dense."""

from meshtron.models.common.hf_dense import dense_hf_kwargs, sliding_hf_kwargs
from meshtron.models.common.hf_moe import moe_adapter, moe_args_from_hf, moe_hf_kwargs
from meshtron.models.common.moe import MoEArgs, MoETransformer
from meshtron.models.common.parallelize import MOE_PLAN
from meshtron.models.qwen2_moe.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg) -> MoEArgs:
    return moe_args_from_hf(cfg, "qwen2_moe", num_experts=cfg.num_experts, expert_ffn_dim=cfg.moe_intermediate_size,
                            norm_topk=cfg.norm_topk_prob, qkv_bias=getattr(cfg, "qkv_bias", True), out_bias=False,
                            qk_norm=False, shared_expert_ffn_dim=cfg.shared_expert_intermediate_size,
                            moe_step=cfg.decoder_sparse_step, dense_layers=tuple(cfg.mlp_only_layers))


def hf_config_from_args(args: MoEArgs):
    from transformers import Qwen2MoeConfig

    if args.out_bias or args.mlp_bias or args.qk_norm or not args.shared_expert_ffn_dim:
        raise ValueError("a qwen2_moe config has optional bias on q/k/v only, no q/k norm and a shared expert")
    return Qwen2MoeConfig(**dense_hf_kwargs(args), **moe_hf_kwargs(args), **sliding_hf_kwargs(args),
                          num_experts=args.num_experts, moe_intermediate_size=args.expert_ffn_dim,
                          shared_expert_intermediate_size=args.shared_expert_ffn_dim, norm_topk_prob=args.norm_topk,
                          decoder_sparse_step=args.moe_step, mlp_only_layers=list(args.dense_layers),
                          qkv_bias=args.qkv_bias)


SPEC = FamilySpec("qwen2_moe", ("qwen2_moe",), FLAVORS, args_from_hf, hf_config_from_args, build=MoETransformer,
                  adapter=moe_adapter, plan=MOE_PLAN, args_cls=MoEArgs)
