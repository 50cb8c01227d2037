"""The InternLM3 family (`model_type: internlm3`).

transformers has no InternLM3 model class: `AutoModelForCausalLM` builds `LlamaForCausalLM` for
this model type, so a checkpoint is the dense Llama decoder with Llama's tensor names. Its config
names the biases `qkv_bias` (q/k/v/o, Llama's `attention_bias`) and `bias` (the MLP's), and
transformers accepts only the two equal. The family is its own so that an exported directory
keeps `model_type: internlm3` (and its tokenizer and chat template stay matched to it)."""

from meshtron.models.common.hf_dense import dense_args_from_hf, dense_hf_kwargs
from meshtron.models.internlm3.args import FLAVORS
from meshtron.models.spec import FamilySpec


def args_from_hf(cfg):
    bias = bool(cfg.attention_bias)
    return dense_args_from_hf(cfg, "internlm3", qkv_bias=bias, out_bias=bias, qk_norm=False)


def hf_config_from_args(args):
    from transformers import InternLM3Config

    if not args.qkv_bias == args.out_bias == args.mlp_bias or args.qk_norm or args.sliding_window is not None:
        raise ValueError("an internlm3 config has one bias setting for q/k/v/o and the MLP, and no q/k norm or "
                         "sliding window")
    return InternLM3Config(**dense_hf_kwargs(args), attention_bias=args.qkv_bias, mlp_bias=args.mlp_bias,
                           bos_token_id=None, eos_token_id=None, pad_token_id=None)


SPEC = FamilySpec("internlm3", ("internlm3",), FLAVORS, args_from_hf, hf_config_from_args)
