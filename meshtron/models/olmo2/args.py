"""OLMo 2 args and its named shapes. `debug` is a tiny model for tests."""

from dataclasses import dataclass

from meshtron.models.common.args import ModelArgs


@dataclass
class Olmo2Args(ModelArgs):
    family: str = "olmo2"

    def num_params(self, include_embedding: bool = True) -> int:
        # q/k norms over the whole projections (num_heads * head_dim and num_kv_heads * head_dim wide), not per head.
        qk_norms = (self.num_heads + self.num_kv_heads) * self.head_dim
        return super().num_params(include_embedding) + self.num_layers * qk_norms


_OLMO2 = dict(family="olmo2", vocab_size=100352, norm_eps=1e-6, max_seq_len=4096, rope_theta=500000.0)

FLAVORS = {
    "debug": Olmo2Args(
        family="olmo2", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, rope_theta=500000.0,
    ),
    # OLMo-2-0425-1B (1.48B), OLMo-2-1124-7B (7.30B) and 13B (13.72B).
    "olmo2-1b": Olmo2Args(**_OLMO2, dim=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128, ffn_dim=8192),
    "olmo2-7b": Olmo2Args(**_OLMO2, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                          ffn_dim=11008),
    "olmo2-13b": Olmo2Args(**_OLMO2, dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                           ffn_dim=13824),
}
