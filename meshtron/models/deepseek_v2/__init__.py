"""The DeepSeek-V2 family (DeepSeek-V2, V2-Lite, V2.5): DeepSeek-V3's decoder (multi-head latent attention,
interleaved RoPE, dense first layers, ungated shared experts) with DeepSeek-V2's routing as transformers
runs it: softmax scores; with `topk_method = "group_limited_greedy"` the choice limited to the `topk_group`
best of `n_group` groups, a group scored by its best expert; the chosen scores times
`routed_scaling_factor`, never renormalized."""

from meshtron.models.deepseek_v2.args import FLAVORS
from meshtron.models.deepseek_v3 import adapter, deepseek_args_from_hf, deepseek_hf_kwargs
from meshtron.models.deepseek_v3.args import DeepSeekArgs
from meshtron.models.deepseek_v3.model import DeepSeekTransformer
from meshtron.models.deepseek_v3.parallelize import PLAN
from meshtron.models.spec import FamilySpec

TOPK_METHODS = ("greedy", "group_limited_greedy")


def args_from_hf(cfg) -> DeepSeekArgs:
    if cfg.topk_method not in TOPK_METHODS:
        raise ValueError(f"topk_method {cfg.topk_method!r} is not supported; supported: {', '.join(TOPK_METHODS)}")
    groups = (cfg.n_group, cfg.topk_group) if cfg.topk_method == "group_limited_greedy" else (1, 1)
    return deepseek_args_from_hf(cfg, "deepseek_v2", score_func="softmax", norm_topk=False, group_score="max",
                                 num_groups=groups[0], topk_groups=groups[1], rope_interleave=True)


def hf_config_from_args(args: DeepSeekArgs):
    from transformers import DeepseekV2Config

    if (args.score_func != "softmax" or args.router_bias or args.norm_topk or args.group_score != "max"
            or not args.rope_interleave or args.num_mtp_layers):
        raise ValueError("a deepseek_v2 config routes by softmax scores, unbiased and not renormalized, groups "
                         "scored by their best expert, rotates adjacent dims and has no multi-token prediction "
                         "layers")
    grouped = args.num_groups > 1
    return DeepseekV2Config(**deepseek_hf_kwargs(args), topk_method="group_limited_greedy" if grouped else "greedy",
                            n_group=args.num_groups if grouped else None,
                            topk_group=args.topk_groups if grouped else None)


SPEC = FamilySpec("deepseek_v2", ("deepseek_v2",), FLAVORS, args_from_hf, hf_config_from_args,
                  build=DeepSeekTransformer, adapter=adapter, plan=PLAN, args_cls=DeepSeekArgs)
