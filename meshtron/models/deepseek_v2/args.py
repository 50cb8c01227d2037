"""Named DeepSeek-V2 shapes. `debug` is a tiny model for tests."""

from meshtron.models.deepseek_v3.args import DeepSeekArgs


def deepseek_v2(dim, num_layers, num_heads, ffn_dim, expert_ffn_dim, num_experts, num_shared, vocab_size,
                **fields) -> DeepSeekArgs:
    return DeepSeekArgs(family="deepseek_v2", vocab_size=vocab_size, dim=dim, num_layers=num_layers,
                        num_heads=num_heads, num_kv_heads=num_heads, ffn_dim=ffn_dim, expert_ffn_dim=expert_ffn_dim,
                        num_experts=num_experts, shared_expert_ffn_dim=num_shared * expert_ffn_dim,
                        shared_expert_gated=False, dense_layers=(0,), score_func="softmax", norm_topk=False,
                        group_score="max", norm_eps=1e-6, **fields)


FLAVORS = {
    "debug": deepseek_v2(64, 3, 4, 128, 32, 8, 2, 1024, head_dim=8, q_lora_rank=32, kv_lora_rank=24,
                         qk_nope_head_dim=16, v_head_dim=16, num_experts_per_token=2, num_groups=4, topk_groups=2,
                         max_seq_len=2048),
    # DeepSeek-V2-Lite (config.json of deepseek-ai/DeepSeek-V2-Lite): queries without a latent, YaRN x40.
    "lite": deepseek_v2(2048, 27, 16, 10944, 1408, 64, 2, 102400, head_dim=64, q_lora_rank=None, kv_lora_rank=512,
                        qk_nope_head_dim=128, v_head_dim=128, num_experts_per_token=6, max_seq_len=163840,
                        rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
}
