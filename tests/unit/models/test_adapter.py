"""State-dict adapters (groups of tensors both ways, the head rules) and strict model args."""

import json
import random

import pytest
import torch

from meshtron.errors import UserError
from meshtron.models.common.adapter import StateDictAdapter, TensorGroup, split_group
from meshtron.models.common.hf_dense import DENSE_GROUPS, dense_adapter
from meshtron.models.registry import build_model, flavor_names, get_flavor, model_args_from_dict


def _state(args):
    model = build_model(args, device="meta")
    model.to_empty(device="cpu")
    model.init_weights(seed=1)
    return model.state_dict()


def _fused_adapter(args):
    """The dense groups behind a fused qkv and gate_up (the phi3 layout), to exercise splitting."""
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attn = "layers.{i}.attn."
    groups = [
        split_group((attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    "model.layers.{i}.self_attn.qkv_proj.weight", [q, kv, kv]),
        split_group(("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
                    "model.layers.{i}.mlp.gate_up_proj.weight", [args.ffn_dim, args.ffn_dim]),
    ]
    return StateDictAdapter(args, groups + DENSE_GROUPS, "test")


def test_fused_groups_split_and_fuse_back_whatever_the_order():
    args = get_flavor("llama:debug")
    state = _state(args)
    adapter = _fused_adapter(args)
    hf = adapter.to_hf(state)
    assert "model.layers.1.self_attn.qkv_proj.weight" in hf and "model.layers.1.self_attn.q_proj.weight" not in hf
    assert hf["model.layers.0.mlp.gate_up_proj.weight"].shape == (2 * args.ffn_dim, args.dim)
    items = list(hf.items())
    random.Random(0).shuffle(items)
    back = dict(adapter.from_hf(iter(items)))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_incomplete_group_and_unknown_tensor_are_user_errors():
    args = get_flavor("llama:debug")
    adapter = _fused_adapter(args)
    hf = adapter.to_hf(_state(args))
    hf.pop("model.layers.1.self_attn.q_proj.weight", None)
    with pytest.raises(UserError, match="unexpected tensor 'model.extra'"):
        list(adapter.from_hf([("model.extra", torch.zeros(1))]))
    groups = [TensorGroup(("a.{i}", "b.{i}"), ("ab.{i}.x", "ab.{i}.y"))]
    with pytest.raises(UserError, match="ab.3.y missing"):
        list(StateDictAdapter(args, groups, "test").from_hf([("ab.3.x", torch.zeros(1))]))


def test_head_rules_tied_score_and_language_model():
    args = get_flavor("llama:debug")
    args.tie_embeddings = True
    state = _state(args)
    tied = dense_adapter(args)
    assert "lm_head.weight" not in tied.to_hf(state)
    assert tied.head_aliases("embed.weight") == ("embed.weight", "lm_head.weight")
    args.num_labels = 1  # a reward model: never tied, its head is `score`
    scored = dense_adapter(args)
    hf = scored.to_hf({"lm_head.weight": torch.ones(1, args.dim), "norm.weight": torch.ones(args.dim)})
    assert set(hf) == {"score.weight", "model.norm.weight"}
    from_hf = dict(scored.from_hf([("lm_head.weight", torch.zeros(3)), ("score.weight", torch.ones(1, args.dim))]))
    assert set(from_hf) == {"lm_head.weight"} and from_hf["lm_head.weight"].shape == (1, args.dim)


def test_unknown_model_args_field_is_an_error_naming_it():
    fields = get_flavor("qwen3:debug").to_dict()
    with pytest.raises(UserError, match=r"^manifest: unknown model args field\(s\) 'moe_experts'"):
        model_args_from_dict({**fields, "moe_experts": 8}, "manifest")


def test_every_flavor_round_trips_through_a_manifest():
    for name in flavor_names():
        args = get_flavor(name)
        stored = json.loads(json.dumps({"model_args": args.to_dict()}))["model_args"]
        assert model_args_from_dict(stored, name) == args, name
