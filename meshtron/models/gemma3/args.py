"""Gemma 3 (text) args: Gemma 2's, with q/k norms, no soft-caps by default, and a RoPE base of their
own for the sliding-window layers. `debug` is a tiny model for tests."""

from dataclasses import dataclass

from meshtron.models.gemma2.args import Gemma2Args


@dataclass
class Gemma3Args(Gemma2Args):
    family: str = "gemma3"
    qk_norm: bool = True  # per-head (1 + w) RMSNorm on q and k
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # The RoPE base of the sliding-window ("local") layers, which also ignore `rope_scaling`; the full
    # ("global") layers use `rope_theta` with `rope_scaling`.
    rope_local_theta: float = 10000.0


_GEMMA3 = dict(head_dim=256, norm_eps=1e-6, rope_theta=1000000.0, rope_local_theta=10000.0, tie_embeddings=True,
               query_pre_attn_scalar=256)


def _sliding(num_layers: int) -> tuple[int, ...]:
    """Five sliding-window layers, then a full one (the published `sliding_window_pattern` 6)."""
    return tuple(i for i in range(num_layers) if (i + 1) % 6)


_LINEAR_8 = {"rope_type": "linear", "factor": 8.0}  # the global layers of the 4B and larger models

FLAVORS = {
    "debug": Gemma3Args(
        vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128,
        norm_eps=1e-6, max_seq_len=2048, tie_embeddings=True, sliding_window=8, sliding_layers=(0,),
        query_pre_attn_scalar=16, rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "gemma3-1b": Gemma3Args(**_GEMMA3, vocab_size=262144, dim=1152, num_layers=26, num_heads=4, num_kv_heads=1,
                            ffn_dim=6912, max_seq_len=32768, sliding_window=512, sliding_layers=_sliding(26)),
    "gemma3-4b": Gemma3Args(**_GEMMA3, vocab_size=262208, dim=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                            ffn_dim=10240, max_seq_len=131072, sliding_window=1024, sliding_layers=_sliding(34),
                            rope_scaling=_LINEAR_8),
    "gemma3-12b": Gemma3Args(**_GEMMA3, vocab_size=262208, dim=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                             ffn_dim=15360, max_seq_len=131072, sliding_window=1024, sliding_layers=_sliding(48),
                             rope_scaling=_LINEAR_8),
    "gemma3-27b": Gemma3Args(**{**_GEMMA3, "head_dim": 128, "query_pre_attn_scalar": 168}, vocab_size=262208,
                             dim=5376, num_layers=62, num_heads=32, num_kv_heads=16, ffn_dim=21504,
                             max_seq_len=131072, sliding_window=1024, sliding_layers=_sliding(62),
                             rope_scaling=_LINEAR_8),
}
