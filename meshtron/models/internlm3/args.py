"""Named InternLM3 shapes. `debug` is a tiny model with InternLM3's dynamic RoPE, for tests."""

from meshtron.models.common.args import ModelArgs

FLAVORS = {
    "debug": ModelArgs(
        family="internlm3", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=256, rope_theta=50000000.0,
        rope_scaling=dict(rope_type="dynamic", factor=6.0),
    ),
    # InternLM3-8B-Instruct (8.80B): 48 layers, GQA with 2 key/value heads, dynamic NTK RoPE.
    "internlm3-8b": ModelArgs(
        family="internlm3", vocab_size=128512, dim=4096, num_layers=48, num_heads=32, num_kv_heads=2, head_dim=128,
        ffn_dim=10240, norm_eps=1e-5, max_seq_len=32768, rope_theta=50000000.0,
        rope_scaling=dict(rope_type="dynamic", factor=6.0),
    ),
}
