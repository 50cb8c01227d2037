"""Logit parity with transformers for every family (dense and MoE), on tiny random models built with
transformers' own classes and saved as HF directories."""

import json

import pytest
import torch

from meshtron.checkpoint.hf import load_hf_model, read_hf_config, save_hf_model

TOL = 1e-4  # float32 max abs logit difference

BASE = dict(
    vocab_size=300, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
)

# One case per family: its distinctive options on, and one RoPE scaling each.
CASES = {
    "llama-llama3rope-bias": (
        "LlamaConfig",
        dict(attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=False,
             rope_parameters=dict(rope_theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "llama-mqa-linear-tied": (
        "LlamaConfig",
        dict(num_key_value_heads=1, tie_word_embeddings=True,
             rope_parameters=dict(rope_theta=10000.0, rope_type="linear", factor=2.0)),
    ),
    "llama-mha-dynamic": (
        "LlamaConfig",
        dict(num_key_value_heads=4, max_position_embeddings=16,
             rope_parameters=dict(rope_theta=10000.0, rope_type="dynamic", factor=2.0)),
    ),
    "mistral-window-default": (
        "MistralConfig",
        dict(sliding_window=5, head_dim=32, rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    ),
    "qwen2-window-yarn": (
        "Qwen2Config",
        dict(use_sliding_window=True, sliding_window=6, max_window_layers=1, tie_word_embeddings=True,
             rope_parameters=dict(rope_theta=1000000.0, rope_type="yarn", factor=4.0,
                                  original_max_position_embeddings=64)),
    ),
    "gemma2-softcap-window": (
        "Gemma2Config",
        # Caps low enough to bend these tiny models' scores and logits; the window on every other layer.
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=0.5,
             final_logit_softcapping=0.3, attention_bias=True,
             rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    ),
    "phi3-longrope-partial": (
        "Phi3Config",
        # 24 test tokens run past the original 16 positions: the long factors; a quarter of each head unrotated.
        dict(original_max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             rope_parameters=dict(rope_theta=10000.0, rope_type="longrope", partial_rotary_factor=0.75,
                                  original_max_position_embeddings=16, short_factor=[1.0, 1.2, 1.5, 2.0, 3.0, 5.0],
                                  long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])),
    ),
    "gemma3-qknorm-ropebases": (
        "Gemma3TextConfig",
        # Sliding, full, sliding: the two kinds rotate with different bases, the full one linearly scaled.
        dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, attention_bias=True,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"],
             pad_token_id=0, bos_token_id=1, eos_token_id=2,
             rope_parameters={"full_attention": dict(rope_theta=1000000.0, rope_type="linear", factor=4.0),
                              "sliding_attention": dict(rope_theta=100.0, rope_type="default")}),
    ),
    "glm4-interleaved-partial": (
        "Glm4Config",
        # Half of each head rotated, adjacent dims paired; gate_up fused in the checkpoint; linear scaling.
        dict(head_dim=24, attention_bias=True, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, rope_parameters=dict(rope_theta=10000.0, rope_type="linear", factor=2.0,
                                                  partial_rotary_factor=0.5)),
    ),
    "smollm3-nope-window": (
        "SmolLM3Config",
        # Layer 1 without RoPE, and (SmolLM3's default layer types) the window on that layer only.
        dict(no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=6, attention_bias=True,
             pad_token_id=0, bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=False, rope_parameters=dict(rope_theta=5000000.0, rope_type="default")),
    ),
    "olmo2-postnorm-qknorm-linear": (
        "Olmo2Config",
        # Biased q/k before the whole-projection q/k norms; GQA so that the k norm is narrower than the q norm.
        dict(attention_bias=True, head_dim=24, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             rope_parameters=dict(rope_theta=500000.0, rope_type="linear", factor=2.0)),
    ),
    "granite-multipliers": (
        "GraniteConfig",
        # Multipliers far from one (and from each other) so that each one's place matters.
        dict(embedding_multiplier=12.0, residual_multiplier=0.5, attention_multiplier=2.0, logits_scaling=4.0,
             mlp_bias=True, tie_word_embeddings=True, rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    ),
    "starcoder2-layernorm-gelu-window": (
        "Starcoder2Config",
        dict(sliding_window=6, use_bias=True, norm_epsilon=1e-5, head_dim=16, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, rope_parameters=dict(rope_theta=999999.4420358813, rope_type="default")),
    ),
    "internlm3-bias-dynamic": (
        "InternLM3Config",
        # The config's own bias names (qkv_bias, bias); 24 test tokens run past the 16 positions: dynamic NTK.
        dict(qkv_bias=True, bias=True, head_dim=24, max_position_embeddings=16,
             rope_parameters=dict(rope_theta=50000000.0, rope_type="dynamic", factor=6.0)),
    ),
    "qwen3-qknorm-yarn": (
        "Qwen3Config",
        dict(head_dim=32, attention_bias=False, tie_word_embeddings=False,
             rope_parameters=dict(rope_theta=1000000.0, rope_type="yarn", factor=2.0,
                                  original_max_position_embeddings=128, beta_fast=16, beta_slow=2)),
    ),
    "mixtral-top2-window": (
        "MixtralConfig",
        dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5, head_dim=16,
             rope_parameters=dict(rope_theta=1000000.0, rope_type="linear", factor=2.0)),
    ),
    "qwen2moe-shared-mlponly": (
        "Qwen2MoeConfig",
        # Layer 1 dense (mlp_only_layers); top-k weights renormalized; the shared expert and its gate.
        dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
             norm_topk_prob=True, mlp_only_layers=[1], rope_parameters=dict(rope_theta=1000000.0, rope_type="default")),
    ),
    "qwen3moe-qknorm-sparsestep": (
        "Qwen3MoeConfig",
        # Every second layer MoE (1 and 3); top-k weights not renormalized (Qwen3-MoE's default).
        dict(num_hidden_layers=4, decoder_sparse_step=2, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=40, head_dim=16, tie_word_embeddings=False,
             rope_parameters=dict(rope_theta=1000000.0, rope_type="yarn", factor=2.0,
                                  original_max_position_embeddings=128)),
    ),
    "deepseekv3-qlora-groups-yarn": (
        "DeepseekV3Config",
        # Layer 0 dense; 8 experts in 4 groups, 2 groups kept, 3 chosen; two shared experts' width; queries through
        # their latent; interleaved RoPE with YaRN and its attention-scale correction (mscale != mscale_all_dim).
        dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
             n_shared_experts=2, moe_intermediate_size=24, first_k_dense_replace=1, q_lora_rank=40, kv_lora_rank=24,
             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, routed_scaling_factor=2.5, num_mtp_layers=0,
             rope_parameters=dict(rope_theta=10000.0, rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                  mscale=0.7, mscale_all_dim=1.0, beta_fast=32, beta_slow=1)),
    ),
    "deepseekv3-noqlora-halfrope": (
        "DeepseekV3Config",
        # Queries projected directly, RoPE on halves, unnormalized weights, one group, biases on attention.
        dict(num_key_value_heads=4, n_routed_experts=6, num_experts_per_tok=2, n_group=1, topk_group=1,
             n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=2, q_lora_rank=None, kv_lora_rank=16,
             qk_rope_head_dim=16, qk_nope_head_dim=8, v_head_dim=20, norm_topk_prob=False, rope_interleave=False,
             attention_bias=True, num_mtp_layers=0, rope_parameters=dict(rope_theta=10000.0, rope_type="default")),
    ),
    "deepseekv2-qlora-grouplimited-yarn": (
        "DeepseekV2Config",
        # Softmax scores; 8 experts in 4 groups (each scored by its best), 2 kept, 3 chosen, scaled, not
        # renormalized; queries through their latent; YaRN with both mscales.
        dict(num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, topk_method="group_limited_greedy",
             n_group=4, topk_group=2, n_shared_experts=2, moe_intermediate_size=24, first_k_dense_replace=1,
             q_lora_rank=40, kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12,
             routed_scaling_factor=1.5, rope_parameters=dict(rope_theta=10000.0, rope_type="yarn", factor=4.0,
                                                             original_max_position_embeddings=16, mscale=0.707,
                                                             mscale_all_dim=0.707)),
    ),
}
MOE_CASES = ["mixtral-top2-window", "qwen2moe-shared-mlponly", "qwen3moe-qknorm-sparsestep"]
DEEPSEEK_CASES = ["deepseekv3-qlora-groups-yarn", "deepseekv3-noqlora-halfrope", "deepseekv2-qlora-grouplimited-yarn"]


def make_hf_model(case: str, tmp_path, edit=None):
    """A tiny random transformers model of `case`, saved; `edit(model)` changes its weights before saving."""
    import transformers

    cls_name, extra = CASES[case]
    config = getattr(transformers, cls_name)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random (not zero/one) norms and biases so that every tensor's mapping matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
            elif name.endswith("gate.weight"):  # routers (and the shared expert's gate): top-k ties unlikely
                p.normal_(0.0, 0.5)
            elif "experts" in name:  # experts large enough that a wrong one changes the logits
                p.normal_(0.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's routing bias: it changes the choice
                b.normal_(0.0, 0.3)
        if edit is not None:
            edit(model)
    model.eval()
    path = tmp_path / case
    model.save_pretrained(str(path))
    return model, path


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    hf_model, path = make_hf_model(case, tmp_path)
    ours, args = load_hf_model(path)
    # Long enough to cross the sliding windows and (dynamic) the original max position.
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_packed_documents_match_separate_runs(case, tmp_path):
    hf_model, path = make_hf_model(case, tmp_path)
    ours, _ = load_hf_model(path)
    gen = torch.Generator().manual_seed(2)
    lengths = [7, 12, 5]
    docs = [torch.randint(0, BASE["vocab_size"], (1, n), generator=gen) for n in lengths]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        got = ours(packed, document_ids=document_ids)
        start = 0
        for doc in docs:
            expected = hf_model(doc).logits
            n = doc.shape[1]
            assert (got[:, start : start + n] - expected).abs().max().item() <= TOL
            start += n


def test_olmo2_qk_norms_span_all_heads(tmp_path):
    """OLMo 2 normalizes q and k over the whole projection: with one head's q and k made 8x larger, the
    other heads' come out much smaller than a per-head norm would make them."""
    def enlarge_first_head(model):
        head_dim = model.config.head_dim
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight[:head_dim] *= 8
                proj.bias[:head_dim] *= 8

    hf_model, path = make_hf_model("olmo2-postnorm-qknorm-linear", tmp_path, edit=enlarge_first_head)
    ours, _ = load_hf_model(path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf_model(tokens).logits).abs().max().item() <= TOL


def test_internlm3_published_config_loads(tmp_path):
    """An InternLM3 checkpoint as published: `InternLM3ForCausalLM` (remote code that transformers replaces
    by Llama), the bias fields `qkv_bias` / `bias`, legacy `rope_scaling` and `rope_theta`."""
    hf_model, path = make_hf_model("internlm3-bias-dynamic", tmp_path)
    config = json.loads((path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(architectures=["InternLM3ForCausalLM"], qkv_bias=config.pop("attention_bias"),
                  bias=config.pop("mlp_bias"), rope_theta=rope.pop("rope_theta"), rope_scaling=rope,
                  auto_map={"AutoModelForCausalLM": "modeling_internlm3.InternLM3ForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    ours, args = load_hf_model(path)
    assert args.qkv_bias and args.out_bias and args.mlp_bias and args.rope_scaling["rope_type"] == "dynamic"
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - hf_model(tokens).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("case", ["llama-llama3rope-bias", "qwen2-window-yarn", "qwen3-qknorm-yarn",
                                  "gemma2-softcap-window", "phi3-longrope-partial", "smollm3-nope-window",
                                  "gemma3-qknorm-ropebases", "glm4-interleaved-partial", "olmo2-postnorm-qknorm-linear",
                                  "granite-multipliers", "starcoder2-layernorm-gelu-window",
                                  "internlm3-bias-dynamic", *MOE_CASES, *DEEPSEEK_CASES])
def test_round_trip_identical_tensors(case, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    hf_model, path = make_hf_model(case, tmp_path)
    ours, args = load_hf_model(path)
    out = tmp_path / "exported"
    _, hf_cfg, _ = read_hf_config(path)
    # A tiny shard limit forces the sharded layout with an index.
    save_hf_model(ours.state_dict(), args, out, source_dir=path, max_shard_bytes=50_000)
    assert (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    exported = {}
    for file in set(index["weight_map"].values()):
        exported.update(load_file(str(out / file)))
    original = load_file(str(path / "model.safetensors"))
    assert exported.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, BASE["vocab_size"], (1, 16))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)
    assert reloaded.config.model_type == hf_cfg.model_type


@pytest.mark.parametrize("case", ["mistral-window-default", "gemma2-softcap-window", "phi3-longrope-partial",
                                  "smollm3-nope-window", "gemma3-qknorm-ropebases", "glm4-interleaved-partial",
                                  "olmo2-postnorm-qknorm-linear", "granite-multipliers",
                                  "starcoder2-layernorm-gelu-window", "internlm3-bias-dynamic", *MOE_CASES,
                                  *DEEPSEEK_CASES])
def test_greedy_generation_matches_transformers(case, tmp_path):
    from meshtron.infer.generation import SamplingParams, generate

    hf_model, path = make_hf_model(case, tmp_path)
    ours, _ = load_hf_model(path)
    # Batched with left padding (the shorter prompt) and long enough to cross the sliding window.
    prompts = [[5, 17, 42, 7, 99, 3, 250, 11], [8, 64, 21]]
    got = generate(ours, prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    for prompt, new in zip(prompts, got):
        with torch.no_grad():
            expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)
        assert new == expected[0, len(prompt):].tolist()


def test_deepseek_multi_token_prediction_layer_loads_saves_and_trains_as_referenced(tmp_path):
    """A DeepSeek-V3 checkpoint with an MTP module (layer num_hidden_layers: a decoder layer plus enorm, hnorm,
    eh_proj, shared_head.norm and copies of the embedding and head): loaded into the model, main logits equal to
    transformers' (which skips the layer), HF -> meshtron -> HF identical, and the MTP loss equal to a direct
    computation with transformers' decoder layer holding the MTP block's weights. Without
    num_nextn_predict_layers in the config, the layer is skipped and the model is the same."""
    import copy

    import torch.nn.functional as F
    from safetensors.torch import load_file, save_file

    from meshtron.models.common.masks import AttentionMask
    from meshtron.models.deepseek_v3.model import take_mtp_loss_sums
    from meshtron.train.losses import head_cross_entropy_sum

    hf_model, path = make_hf_model("deepseekv3-qlora-groups-yarn", tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    mtp, D, gen = BASE["num_hidden_layers"], BASE["hidden_size"], torch.Generator().manual_seed(2)
    for name, t in list(tensors.items()):
        if name.startswith("model.layers.2."):  # an MoE layer's tensors, changed, as the MTP module's decoder layer
            changed = t + 0.05 * torch.randn(t.shape, generator=gen)
            tensors[name.replace("model.layers.2.", f"model.layers.{mtp}.")] = changed
    for name in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight"):
        tensors[f"model.layers.{mtp}.{name}"] = 1 + 0.1 * torch.randn(D, generator=gen)
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = 0.1 * torch.randn(D, 2 * D, generator=gen)
    tensors[f"model.layers.{mtp}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{mtp}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_logits = hf_model(tokens).logits
    ours, args = load_hf_model(path)  # num_nextn_predict_layers 0: the layer is skipped
    assert args.num_mtp_layers == 0 and not list(ours.mtp.parameters())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    ours, args = load_hf_model(path)
    assert args.num_mtp_layers == 1
    with torch.no_grad():
        assert (ours(tokens) - hf_logits).abs().max().item() <= TOL

    out = tmp_path / "exported"
    save_hf_model(ours.state_dict(), args, out, source_dir=path)
    exported = load_file(str(out / "model.safetensors"))
    assert exported.keys() == tensors.keys()
    assert all(torch.equal(exported[key], t) for key, t in tensors.items())
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1

    # The MTP loss: the depth-1 module predicts token t + 2 from the main hidden state at t and token t + 1.
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100
    position_ids = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        main = ours(tokens, position_ids, mask=AttentionMask.for_batch(24), mtp_labels=labels,
                    head=lambda h, lm_head: head_cross_entropy_sum(h, lm_head, labels))
        mtp_sum, = take_mtp_loss_sums(ours)
        h = ours(tokens, head=lambda h, lm_head: h)[:, :-1]
        layer = copy.deepcopy(hf_model.model.layers[2])
        prefix = f"model.layers.{mtp}."
        block = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        experts = [[block.pop(f"mlp.experts.{e}.{p}.weight") for e in range(8)]
                   for p in ("gate_proj", "up_proj", "down_proj")]
        block["mlp.experts.gate_up_proj"] = torch.cat([torch.stack(experts[0]), torch.stack(experts[1])], 1)
        block["mlp.experts.down_proj"] = torch.stack(experts[2])
        layer.load_state_dict({k: t for k, t in block.items() if k.startswith(("self_attn", "mlp", "input", "post"))})
        embedded = _rms(hf_model.model.embed_tokens(tokens[:, 1:]), tensors[prefix + "enorm.weight"])
        hidden = _rms(h, tensors[prefix + "hnorm.weight"])
        x = F.linear(torch.cat([embedded, hidden], -1), tensors[prefix + "eh_proj.weight"])
        positions = torch.arange(23).expand(2, 23)
        causal = torch.full((23, 23), float("-inf")).triu(1).expand(2, 1, 23, 23)
        y = layer(x, attention_mask=causal, position_ids=positions,
                  position_embeddings=hf_model.model.rotary_emb(x, positions))
        y = y[0] if isinstance(y, tuple) else y
        logits = hf_model.lm_head(_rms(y, tensors[prefix + "shared_head.norm.weight"]))[:, :-1]
        expected = F.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten(), reduction="sum")
    main_expected = F.cross_entropy(hf_logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum")
    assert torch.allclose(main, main_expected, rtol=1e-5)
    assert torch.allclose(mtp_sum, expected, rtol=1e-5), (mtp_sum, expected)


def _rms(x, weight, eps=1e-6):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_load_balancing_loss_matches_transformers(case, tmp_path):
    """The load-balancing loss from the router statistics our MoE layers record in one forward equals
    transformers' `aux_loss` for the same tokens (its MoE layers only: dense and sparse-step layers left out)."""
    from meshtron.models.common.moe import load_balancing_loss, router_totals, take_router_stats

    hf_model, path = make_hf_model(case, tmp_path)
    ours, args = load_hf_model(path)
    tokens = torch.randint(0, BASE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens, labels=tokens, output_router_logits=True).aux_loss
        ours(tokens)  # a forward without gradients (generation, a frozen reference) records nothing
    assert take_router_stats(ours) == []
    ours(tokens)
    stats = take_router_stats(ours)
    assert len(stats) == sum(args.is_moe_layer(i) for i in range(args.num_layers))
    aux = load_balancing_loss(router_totals(stats, args.num_experts), args.num_experts)
    torch.testing.assert_close(aux, expected, rtol=1e-5, atol=0)
