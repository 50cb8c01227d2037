"""Named Qwen3 dense shapes. `debug` is a tiny model for tests."""

from meshtron.models.common.args import ModelArgs

_QWEN3 = dict(family="qwen3", vocab_size=151936, head_dim=128, norm_eps=1e-6, max_seq_len=40960,
              rope_theta=1000000.0, qk_norm=True)


def _qwen3(dim, num_layers, num_heads, ffn_dim, tie=False):
    return ModelArgs(**_QWEN3, dim=dim, num_layers=num_layers, num_heads=num_heads, num_kv_heads=8,
                     ffn_dim=ffn_dim, tie_embeddings=tie)


FLAVORS = {
    "debug": ModelArgs(
        family="qwen3", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, rope_theta=1000000.0, qk_norm=True,
    ),
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, tie=True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, tie=True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, tie=True),
    "qwen3-8b": _qwen3(4096, 36, 32, 12288),
    "qwen3-14b": _qwen3(5120, 40, 40, 17408),
    "qwen3-32b": _qwen3(5120, 64, 64, 25600),
}
