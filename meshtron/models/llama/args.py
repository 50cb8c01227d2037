"""Named Llama-family shapes. `debug` is a tiny model for tests."""

from meshtron.models.common.args import ModelArgs

_LLAMA2 = dict(family="llama", vocab_size=32000, head_dim=128, norm_eps=1e-5, max_seq_len=4096, rope_theta=10000.0)
_LLAMA3 = dict(family="llama", vocab_size=128256, norm_eps=1e-5, max_seq_len=8192, rope_theta=500000.0)
_LLAMA31_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)

FLAVORS = {
    "debug": ModelArgs(
        family="llama", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=2048, rope_theta=10000.0,
    ),
    "llama2-7b": ModelArgs(**_LLAMA2, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, ffn_dim=11008),
    "llama2-13b": ModelArgs(**_LLAMA2, dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, ffn_dim=13824),
    "llama2-70b": ModelArgs(**_LLAMA2, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, ffn_dim=28672),
    "llama3-8b": ModelArgs(**_LLAMA3, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                           ffn_dim=14336),
    "llama3-70b": ModelArgs(**_LLAMA3, dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                            ffn_dim=28672),
    "llama3.1-8b": ModelArgs(**dict(_LLAMA3, max_seq_len=131072), dim=4096, num_layers=32, num_heads=32,
                             num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_scaling=_LLAMA31_ROPE),
    "llama3.1-70b": ModelArgs(**dict(_LLAMA3, max_seq_len=131072), dim=8192, num_layers=80, num_heads=64,
                              num_kv_heads=8, head_dim=128, ffn_dim=28672, rope_scaling=_LLAMA31_ROPE),
    "llama3.2-1b": ModelArgs(**dict(_LLAMA3, max_seq_len=131072), dim=2048, num_layers=16, num_heads=32,
                             num_kv_heads=8, head_dim=64, ffn_dim=8192, tie_embeddings=True,
                             rope_scaling=_LLAMA32_ROPE),
    "llama3.2-3b": ModelArgs(**dict(_LLAMA3, max_seq_len=131072), dim=3072, num_layers=28, num_heads=24,
                             num_kv_heads=8, head_dim=128, ffn_dim=8192, tie_embeddings=True,
                             rope_scaling=_LLAMA32_ROPE),
    "smollm2-135m": ModelArgs(
        family="llama", vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
        ffn_dim=1536, norm_eps=1e-5, max_seq_len=8192, rope_theta=100000.0, tie_embeddings=True,
    ),
}
