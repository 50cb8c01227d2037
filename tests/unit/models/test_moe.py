"""The MoE layer: grouped GEMM against the per-expert loop, capacity dropping, the load-balancing loss
against transformers' formula, the router z-loss, and the bias of auxiliary-loss-free balancing."""

import pytest
import torch

from meshtron.models.common.init import init_model
from meshtron.models.common.moe import (HAS_GROUPED_MM, MoE, MoEArgs, grouped_mm_runs, load_balancing_loss,
                                        router_totals, router_z_loss, sequence_balance_loss, take_router_stats,
                                        update_expert_bias)

ARGS = dict(dim=32, num_heads=4, num_kv_heads=2, head_dim=8, num_layers=2, num_experts=6, num_experts_per_token=2,
            expert_ffn_dim=24, shared_expert_ffn_dim=16)


def make_moe(seed=0, **overrides) -> MoE:
    moe = MoE(MoEArgs(**{**ARGS, **overrides}), out_std=0.1)
    init_model(torch.nn.ModuleDict({"mlp": moe}), seed)  # every parameter claimed by its module's init_weights
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return moe


def inputs(dtype=torch.float32):
    return torch.randn(3, 10, ARGS["dim"], generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="this torch has no grouped GEMM")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_the_per_expert_loop_forward_and_backward(dtype):
    results = []
    for grouped in (True, False):
        moe = make_moe().to(dtype)
        moe.experts.grouped_mm = grouped
        x = inputs(dtype).requires_grad_()
        out = moe(x)
        out.sum().backward()  # the gradient of a sum is expanded: grouped_mm needs it contiguous
        results.append([out, x.grad] + [p.grad for p in moe.parameters()])
    for grouped, loop in zip(*results):
        assert torch.equal(grouped, loop)


def test_grouped_gemm_is_used_on_cpu_where_torch_has_it():
    assert grouped_mm_runs(inputs().flatten(0, 1), ARGS["expert_ffn_dim"]) == HAS_GROUPED_MM
    assert not grouped_mm_runs(inputs().flatten(0, 1).to("meta"), ARGS["expert_ffn_dim"])


def test_expert_with_no_tokens_and_every_row_written():
    """An expert nobody routes to has an empty group; every output row is written (none left
    uninitialized past the last offset)."""
    moe = make_moe(shared_expert_ffn_dim=0)
    with torch.no_grad():
        moe.router.weight[0] = -100.0  # on positive inputs, expert 0 is never among the top 2
    x = inputs().abs()
    out = moe(x)
    stats = take_router_stats(moe)[0]
    assert stats.selected_E[0] == 0 and stats.selected_E.sum() == 30 * 2
    moe.experts.grouped_mm = False
    assert torch.equal(out, moe(x)) and torch.isfinite(out).all()


def test_capacity_drops_and_counts_overflow_rows():
    x = inputs()
    dropless = make_moe(shared_expert_ffn_dim=0)
    roomy = make_moe(shared_expert_ffn_dim=0, capacity_factor=float(ARGS["num_experts"]))  # room for every row
    assert torch.equal(roomy(x), dropless(x))
    assert take_router_stats(roomy)[0].dropped == 0
    tight = make_moe(shared_expert_ffn_dim=0, capacity_factor=0.5)  # 5 rows per expert of 60 routed
    out = tight(x)
    stats = take_router_stats(tight)[0]
    capacity = 5
    expected_dropped = (stats.selected_E - capacity).clamp(min=0).sum()
    assert stats.dropped == expected_dropped > 0
    assert not torch.equal(out, dropless(x))


def test_capacity_keeps_the_earliest_tokens():
    moe = make_moe(shared_expert_ffn_dim=0, num_experts=2, num_experts_per_token=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.copy_(torch.stack([torch.ones(ARGS["dim"]), -torch.ones(ARGS["dim"])]))
    x = torch.ones(1, 4, ARGS["dim"])  # all four tokens choose expert 0, which takes 2
    out = moe(x)[0]
    assert out[:2].abs().sum() > 0 and out[2:].abs().sum() == 0
    assert take_router_stats(moe)[0].dropped == 2


def test_load_balancing_loss_equals_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    layers = [make_moe(seed) for seed in range(3)]
    x = inputs()
    logits = []
    for moe in layers:
        moe(x)
        logits.append(torch.nn.functional.linear(x.flatten(0, 1), moe.router.weight))
    stats = [s for moe in layers for s in take_router_stats(moe)]
    ours = load_balancing_loss(router_totals(stats, ARGS["num_experts"]), ARGS["num_experts"])
    expected = load_balancing_loss_func(tuple(logits), ARGS["num_experts"], ARGS["num_experts_per_token"])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=0)
    ours.backward()  # differentiable through the router probabilities
    assert all(moe.router.weight.grad.abs().sum() > 0 for moe in layers)
    # Pipeline stages each sum their own layers' totals; the sums add up to the whole model's.
    E = ARGS["num_experts"]
    split = router_totals(stats[:1], E) + router_totals(stats[1:], E) + router_totals([], E)
    torch.testing.assert_close(load_balancing_loss(split, E), expected, rtol=1e-6, atol=0)


def test_router_z_loss_is_the_mean_squared_logsumexp_summed_over_layers():
    layers = [make_moe(seed) for seed in range(2)]
    x = inputs()
    for moe in layers:
        moe(x)
    stats = [s for moe in layers for s in take_router_stats(moe)]
    expected = sum(torch.nn.functional.linear(x.flatten(0, 1), moe.router.weight).logsumexp(-1).square().mean()
                   for moe in layers)
    torch.testing.assert_close(router_z_loss(router_totals(stats, ARGS["num_experts"])), expected)
    router_z_loss(router_totals(stats, ARGS["num_experts"])).backward()
    assert all(moe.router.weight.grad.abs().sum() > 0 for moe in layers)


def test_sequence_balance_loss_equals_a_direct_computation_per_sequence():
    """DeepSeek-V3's sequence-wise balance loss, with biased group-limited sigmoid routing: per sequence,
    sum_i f_i P_i (f_i = E / (K T) x tokens routed to i, P_i = mean over tokens of s_i / sum_j s_j), averaged
    over the sequences, summed over layers; it reaches the router weight."""
    routing = dict(score_func="sigmoid", router_bias=True, num_groups=3, topk_groups=2, group_score="top2")
    layers = [make_moe(seed, **routing) for seed in range(2)]
    layers[0].router.expert_bias.copy_(torch.linspace(-0.2, 0.2, 6))
    x = inputs()
    expected = 0.0
    for moe in layers:
        moe(x)
        E, K = 6, 2
        for seq in x:  # (T, D)
            _, experts, _ = moe.router(seq)
            scores = torch.sigmoid(seq @ moe.router.weight.T)
            f = torch.tensor([(experts == i).sum().item() for i in range(E)]) * E / (K * len(seq))
            p = (scores / scores.sum(-1, keepdim=True)).mean(0)
            expected = expected + (f * p).sum() / len(x)
    stats = [s for moe in layers for s in take_router_stats(moe)]
    loss = sequence_balance_loss(router_totals(stats, ARGS["num_experts"]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(moe.router.weight.grad.abs().sum() > 0 for moe in layers)


def test_expert_bias_moves_towards_balance_and_changes_the_choice_only():
    moe = make_moe(bias_update_rate=0.1)
    x = inputs()
    moe(x)
    counts = take_router_stats(moe)[0].selected_E
    assert counts.max() > counts.min()  # the random router is unbalanced
    update_expert_bias([moe], counts[None], 0.1)
    bias = moe.router.expert_bias
    assert torch.equal(bias[counts > counts.mean()], torch.full_like(bias[counts > counts.mean()], -0.1))
    assert torch.equal(bias[counts < counts.mean()], torch.full_like(bias[counts < counts.mean()], 0.1))
    # A bias large enough for one expert makes every token choose it, with its unbiased score as weight.
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0]))
    logits, experts, weights = moe.router(x.flatten(0, 1))
    assert (experts == 3).any(-1).all()
    scores = logits.float().softmax(-1)
    chosen = scores.gather(-1, experts)
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_without_balancing_the_router_has_no_bias():
    assert make_moe().router.expert_bias is None
    assert "router.expert_bias" in make_moe(bias_update_rate=0.01).state_dict()


def test_routing_fields_apply_to_a_pretrained_moe_model(tmp_path):
    """model.args may set aux_loss_coef and capacity_factor on a Hugging Face MoE directory (its config
    turns the loss off); a dense model has no such fields."""
    import transformers

    from meshtron.config import load_config
    from meshtron.errors import UserError
    from meshtron.train.build import resolve_model_source

    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=8, moe_intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=2, num_experts_per_tok=1, head_dim=8)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "hf"))
    routing = ["--model.args", "{aux_loss_coef = 0.02, capacity_factor = 1.5}"]
    cfg = load_config(None, ["--data.mock", "true", "--model.name_or_path", str(tmp_path / "hf"), *routing])
    args = resolve_model_source(cfg).args
    assert (args.aux_loss_coef, args.capacity_factor, args.num_experts) == (0.02, 1.5, 2)
    dense = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                     num_attention_heads=2)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(str(tmp_path / "dense"))
    cfg = load_config(None, ["--data.mock", "true", "--model.name_or_path", str(tmp_path / "dense"), *routing])
    with pytest.raises(UserError, match="model.args: unknown field 'aux_loss_coef'"):
        resolve_model_source(cfg)


def test_moe_section_sets_the_built_model_s_moe_layers():
    """[moe]'s keys land in the args and in every MoE layer of the built model; unset keys keep the flavor's;
    model.args still works beside [moe]; a dense model refuses [moe] in one line."""
    from meshtron.config import load_config
    from meshtron.errors import UserError
    from meshtron.models.registry import build_model
    from meshtron.train.build import resolve_model_source

    base = ["--data.mock", "true", "--model.name_or_path", "mixtral:debug"]
    flavor = resolve_model_source(load_config(None, base)).args
    assert (flavor.aux_loss_coef, flavor.capacity_factor, flavor.bias_update_rate) == (0.01, None, 0.0)
    cfg = load_config(None, [*base, "--moe.capacity_factor", "1.5", "--moe.bias_update_rate", "0.01",
                             "--model.args", "{z_loss_coef = 0.001}"])
    args = resolve_model_source(cfg).args
    assert (args.aux_loss_coef, args.capacity_factor, args.bias_update_rate, args.z_loss_coef) == (0.01, 1.5, 0.01, 0.001)
    layers = [m for m in build_model(args).modules() if isinstance(m, MoE)]
    assert len(layers) == args.num_layers
    assert all(m.capacity_factor == 1.5 and m.router.expert_bias is not None for m in layers)
    dense = load_config(None, ["--data.mock", "true", "--model.name_or_path", "llama:debug", "--moe.aux_loss_coef", "0"])
    with pytest.raises(UserError, match=r"^\[moe\] sets aux_loss_coef, but 'llama:debug' is a dense model") as e:
        resolve_model_source(dense)
    assert "\n" not in str(e.value)
