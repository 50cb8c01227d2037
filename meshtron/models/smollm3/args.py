"""SmolLM3 args (the dense args plus the layers without RoPE) and its named shapes. `debug` is a
tiny model for tests."""

from dataclasses import dataclass, field

from meshtron.models.common.args import ModelArgs


@dataclass
class SmolLM3Args(ModelArgs):
    family: str = "smollm3"
    # Indices of the layers that attend without positions ("NoPE"): RoPE is not applied there.
    no_rope_layers: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        super().__post_init__()
        self.no_rope_layers = tuple(self.no_rope_layers)


def every_fourth(num_layers: int) -> tuple[int, ...]:
    """SmolLM3's pattern (its `no_rope_layer_interval` 4): layers 3, 7, 11, ... have no RoPE."""
    return tuple(range(3, num_layers, 4))


FLAVORS = {
    "debug": SmolLM3Args(
        vocab_size=1024, dim=64, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128,
        norm_eps=1e-6, max_seq_len=2048, rope_theta=5000000.0, tie_embeddings=True, no_rope_layers=every_fourth(4),
    ),
    "smollm3-3b": SmolLM3Args(
        vocab_size=128256, dim=2048, num_layers=36, num_heads=16, num_kv_heads=4, head_dim=128, ffn_dim=11008,
        norm_eps=1e-6, max_seq_len=65536, rope_theta=5000000.0, tie_embeddings=True, no_rope_layers=every_fourth(36),
    ),
}
