"""Named Qwen2.5 shapes. `debug` is a tiny model for tests."""

from meshtron.models.common.args import ModelArgs

_QWEN25 = dict(family="qwen2", head_dim=128, norm_eps=1e-6, max_seq_len=32768, rope_theta=1000000.0,
               qkv_bias=True)


def _qwen25(dim, num_layers, num_heads, num_kv_heads, ffn_dim, vocab_size=152064, tie=False):
    return ModelArgs(**dict(_QWEN25, head_dim=dim // num_heads), dim=dim, num_layers=num_layers,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, ffn_dim=ffn_dim, vocab_size=vocab_size,
                     tie_embeddings=tie)


FLAVORS = {
    "debug": ModelArgs(
        family="qwen2", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, rope_theta=1000000.0, qkv_bias=True,
    ),
    "qwen2.5-0.5b": _qwen25(896, 24, 14, 2, 4864, vocab_size=151936, tie=True),
    "qwen2.5-1.5b": _qwen25(1536, 28, 12, 2, 8960, vocab_size=151936, tie=True),
    "qwen2.5-3b": _qwen25(2048, 36, 16, 2, 11008, vocab_size=151936, tie=True),
    "qwen2.5-7b": _qwen25(3584, 28, 28, 4, 18944),
    "qwen2.5-14b": _qwen25(5120, 48, 40, 8, 13824),
    "qwen2.5-32b": _qwen25(5120, 64, 40, 8, 27648),
    "qwen2.5-72b": _qwen25(8192, 80, 64, 8, 29568),
}
