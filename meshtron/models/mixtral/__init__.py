"""The Mixtral family: Mistral's decoder with a top-2 MoE (softmax router, chosen weights renormalized)
in every layer; experts stored as `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down) on disk."""

from meshtron.models.common.hf_dense import dense_hf_kwargs
from meshtron.models.common.hf_moe import moe_adapter, moe_args_from_hf, moe_hf_kwargs
from meshtron.models.common.moe import MoEArgs, MoETransformer
from meshtron.models.common.parallelize import MOE_PLAN
from meshtron.models.mixtral.args import FLAVORS
from meshtron.models.spec import FamilySpec


def adapter(args: MoEArgs):
    return moe_adapter(args, hf_mlp="block_sparse_moe", expert_names=("w1", "w3", "w2"))


def args_from_hf(cfg) -> MoEArgs:
    return moe_args_from_hf(cfg, "mixtral", num_experts=cfg.num_local_experts, expert_ffn_dim=cfg.intermediate_size,
                            norm_topk=True, qkv_bias=False, out_bias=False, qk_norm=False)


def hf_config_from_args(args: MoEArgs):
    from transformers import MixtralConfig

    if (args.qkv_bias or args.out_bias or args.mlp_bias or args.qk_norm or args.sliding_layers or not args.norm_topk
            or args.shared_expert_ffn_dim or args.moe_step != 1 or args.dense_layers
            or args.ffn_dim != args.expert_ffn_dim):
        raise ValueError("a mixtral config has no biases, no q/k norm, a window on all layers or none, and "
                         "renormalized top-k experts of size ffn_dim in every layer, none shared")
    return MixtralConfig(**dense_hf_kwargs(args), **moe_hf_kwargs(args), num_local_experts=args.num_experts,
                         sliding_window=args.sliding_window)


SPEC = FamilySpec("mixtral", ("mixtral",), FLAVORS, args_from_hf, hf_config_from_args, build=MoETransformer,
                  adapter=adapter, plan=MOE_PLAN, args_cls=MoEArgs)
