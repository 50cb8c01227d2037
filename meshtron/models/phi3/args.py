"""Named Phi-3 shapes. `debug` is a tiny model with LongRoPE and a partial rotary, for tests."""

from meshtron.models.common.args import ModelArgs

_LONGROPE_DEBUG = dict(rope_type="longrope", original_max_position_embeddings=64,
                       short_factor=[1.0, 1.1, 1.2, 1.5, 2.0, 3.0], long_factor=[1.0, 2.0, 4.0, 8.0, 16.0, 32.0])

FLAVORS = {
    "debug": ModelArgs(
        family="phi3", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=256, rope_scaling=_LONGROPE_DEBUG, partial_rotary=0.75,
    ),
    # Phi-3-mini-4k (3.82B) and Phi-4-mini (3.84B, 200k vocabulary, GQA, 3/4 of each head rotated, tied).
    "phi3-mini-4k": ModelArgs(family="phi3", vocab_size=32064, dim=3072, num_layers=32, num_heads=32, num_kv_heads=32,
                              head_dim=96, ffn_dim=8192, norm_eps=1e-5, max_seq_len=4096, rope_theta=10000.0),
    "phi4-mini": ModelArgs(family="phi3", vocab_size=200064, dim=3072, num_layers=32, num_heads=24, num_kv_heads=8,
                           head_dim=128, ffn_dim=8192, norm_eps=1e-5, max_seq_len=131072, rope_theta=10000.0,
                           partial_rotary=0.75, tie_embeddings=True),
}
