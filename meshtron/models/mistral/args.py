"""Named Mistral shapes. `debug` is a tiny model with a sliding window, for tests."""

from meshtron.models.common.args import ModelArgs

_MISTRAL_7B = dict(family="mistral", dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                   ffn_dim=14336, norm_eps=1e-5, max_seq_len=32768)

FLAVORS = {
    "debug": ModelArgs(
        family="mistral", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=2048, sliding_window=8,
    ),
    "mistral-7b-v0.1": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=10000.0, sliding_window=4096),
    "mistral-7b-v0.3": ModelArgs(**_MISTRAL_7B, vocab_size=32768, rope_theta=1000000.0),
}
