"""LoRA against PEFT: the exported adapter applied by PEFT to the transformers base gives
meshtron's logits; the merged export matches too; NF4 base within a stated tolerance."""

import pytest
import torch

from meshtron.checkpoint.hf import load_hf_model, save_hf_model
from meshtron.lora import LoRAConfig, apply_lora, count_parameters, lora_state_dict
from meshtron.lora.export import merged_state_dict, save_peft_adapter

TOL = 1e-4


@pytest.fixture
def tiny_base(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    return tmp_path / "base"


def _randomize_adapters(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("targets", [["all-linear"], ["q_proj", "v_proj"]])
def test_peft_adapter_and_merged_export_match(tiny_base, tmp_path, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, args = load_hf_model(tiny_base)
    config = LoRAConfig(rank=4, alpha=8, targets=targets)
    adapted = apply_lora(model, config)
    assert len(adapted) == (14 if targets == ["all-linear"] else 4)
    _randomize_adapters(model)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = model(tokens)

    save_peft_adapter(model, args, config, tmp_path / "adapter", base_model=str(tiny_base))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (peft_model(tokens).logits - ours).abs().max().item() <= TOL

    save_hf_model(merged_state_dict(model), args, tmp_path / "merged", source_dir=tiny_base)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (merged(tokens).logits - ours).abs().max().item() <= TOL


# Families whose blocks or module names differ from the dense decoder's (StarCoder2's MLP is c_fc / c_proj in
# transformers, up_proj / down_proj here): (config class, options, adapted linears per layer with all-linear).
OWN_BLOCK_BASES = {
    "olmo2": ("Olmo2Config", dict(attention_bias=True), 7),
    "granite": ("GraniteConfig", dict(embedding_multiplier=12.0, residual_multiplier=0.5, attention_multiplier=0.3,
                                      logits_scaling=4.0), 7),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=6, use_bias=True), 6),
}


@pytest.mark.parametrize("family", list(OWN_BLOCK_BASES))
def test_peft_adapter_matches_on_families_with_own_blocks(family, tmp_path):
    import transformers
    from peft import PeftModel

    cls_name, options, per_layer = OWN_BLOCK_BASES[family]
    cfg = getattr(transformers, cls_name)(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2, **options)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "base"))
    model, args = load_hf_model(tmp_path / "base")
    config = LoRAConfig(rank=4, alpha=8, targets=["all-linear"])
    assert len(apply_lora(model, config)) == 2 * per_layer
    _randomize_adapters(model)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = model(tokens)
    save_peft_adapter(model, args, config, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (peft_model(tokens).logits - ours).abs().max().item() <= TOL


def test_only_adapters_train_and_fresh_adapters_change_nothing(tiny_base):
    model, _ = load_hf_model(tiny_base)
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        before = model(tokens)
    apply_lora(model, LoRAConfig(rank=8, alpha=16, targets=["all-linear"]))
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # B = 0
    trainable, total = count_parameters(model)
    # 2 layers x (q,k,v,o,gate,up,down): r * (in + out) each.
    per_layer = 8 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert trainable == 2 * per_layer
    assert set(lora_state_dict(model)) == {n for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(tokens).sum().backward()
    optimizer.step()
    assert all(("lora_" in n) == (n in {k for k, _ in model.named_parameters() if _.grad is not None})
               for n, _ in model.named_parameters())
    assert len(optimizer.state) == len([p for p in model.parameters() if p.requires_grad])


def test_nf4_base_logits_are_close_to_the_float_base(tmp_path):
    pytest.importorskip("torchao")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "base"))
    tokens = torch.randint(0, 256, (2, 16))
    ref, _ = load_hf_model(tmp_path / "base", dtype=torch.bfloat16)
    qmodel, _ = load_hf_model(tmp_path / "base", dtype=torch.bfloat16)
    apply_lora(qmodel, LoRAConfig(rank=4, alpha=8, quantize_base="nf4"))
    with torch.no_grad():
        expected, got = ref(tokens).float(), qmodel(tokens).float()
    # NF4 rounds each weight to one of 16 levels per 64-block (about 10% relative weight error):
    # stated tolerance, relative RMS logit error < 0.25 (observed 0.16 here; 0.27 on SmolLM2, whose
    # GGUF weights were already 4-bit) and every weight within 12% of its float value.
    rel = (got - expected).pow(2).mean().sqrt() / expected.std()
    assert rel < 0.25
    for name, module in qmodel.named_modules():
        if hasattr(module, "lora_A"):
            w = dict(ref.named_parameters())[f"{name}.weight"].float()
            assert (module.weight.get_original_weight().float() - w).norm() / w.norm() < 0.12, name


def test_peft_adapter_matches_on_latent_attention(tmp_path):
    """LoRA on DeepSeek-V3's latent attention projections (their checkpoint names): PEFT's adapter on the
    transformers model gives our logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    cfg = DeepseekV3Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                           n_group=1, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1, q_lora_rank=32,
                           kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_mtp_layers=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp_path / "base"))
    model, args = load_hf_model(tmp_path / "base")
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    config = LoRAConfig(rank=4, alpha=8, targets=targets)
    assert len(apply_lora(model, config)) == 2 * len(targets)
    _randomize_adapters(model)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = model(tokens)
    save_peft_adapter(model, args, config, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert (peft_model(tokens).logits - ours).abs().max().item() <= TOL
