"""Named Qwen2-MoE shapes. `debug` is a tiny model for tests (layer 1 dense)."""

from meshtron.models.common.moe import MoEArgs

_QWEN2_MOE = dict(family="qwen2_moe", vocab_size=151936, head_dim=128, norm_eps=1e-6, rope_theta=1000000.0,
                  qkv_bias=True, norm_topk=False)

FLAVORS = {
    "debug": MoEArgs(
        family="qwen2_moe", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, rope_theta=1000000.0, qkv_bias=True, num_experts=4,
        num_experts_per_token=2, expert_ffn_dim=32, shared_expert_ffn_dim=64, norm_topk=False, dense_layers=(1,),
    ),
    "qwen1.5-moe-a2.7b": MoEArgs(**_QWEN2_MOE, dim=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                                 ffn_dim=5632, max_seq_len=8192, num_experts=60, num_experts_per_token=4,
                                 expert_ffn_dim=1408, shared_expert_ffn_dim=5632),
    "qwen2-57b-a14b": MoEArgs(**_QWEN2_MOE, dim=3584, num_layers=28, num_heads=28, num_kv_heads=4,
                              ffn_dim=18944, max_seq_len=32768, num_experts=64, num_experts_per_token=8,
                              expert_ffn_dim=2560, shared_expert_ffn_dim=20480),
}
