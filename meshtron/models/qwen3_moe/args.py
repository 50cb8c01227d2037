"""Named Qwen3-MoE shapes. `debug` is a tiny model for tests."""

from meshtron.models.common.moe import MoEArgs

_QWEN3_MOE = dict(family="qwen3_moe", vocab_size=151936, head_dim=128, norm_eps=1e-6, max_seq_len=40960,
                  rope_theta=1000000.0, qk_norm=True, num_kv_heads=4, num_experts=128, num_experts_per_token=8,
                  norm_topk=True)

FLAVORS = {
    "debug": MoEArgs(
        family="qwen3_moe", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, rope_theta=1000000.0, qk_norm=True, num_experts=4,
        num_experts_per_token=2, expert_ffn_dim=32, norm_topk=False,
    ),
    "30b-a3b": MoEArgs(**_QWEN3_MOE, dim=2048, num_layers=48, num_heads=32, ffn_dim=6144, expert_ffn_dim=768),
    "235b-a22b": MoEArgs(**_QWEN3_MOE, dim=4096, num_layers=94, num_heads=64, ffn_dim=12288, expert_ffn_dim=1536),
}
