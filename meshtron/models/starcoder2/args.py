"""StarCoder2 args and its named shapes. `debug` is a tiny model with a sliding window, for tests."""

from dataclasses import dataclass

from meshtron.models.common.args import ModelArgs


@dataclass
class Starcoder2Args(ModelArgs):
    family: str = "starcoder2"

    def num_params(self, include_embedding: bool = True) -> int:
        # A two-matrix MLP instead of three, and a bias beside every norm weight (LayerNorm).
        mlp_gate = self.dim * self.ffn_dim + (self.ffn_dim if self.mlp_bias else 0)
        norm_biases = (2 * self.num_layers + 1) * self.dim
        return super().num_params(include_embedding) - self.num_layers * mlp_gate + norm_biases


_STARCODER2 = dict(family="starcoder2", vocab_size=49152, head_dim=128, norm_eps=1e-5, max_seq_len=16384,
                   sliding_window=4096, qkv_bias=True, out_bias=True, mlp_bias=True)

FLAVORS = {
    "debug": Starcoder2Args(
        family="starcoder2", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=2048, sliding_window=8, qkv_bias=True, out_bias=True,
        mlp_bias=True, tie_embeddings=True,
    ),
    # StarCoder2 3B (3.03B), 7B (7.17B) and 15B (15.96B).
    "starcoder2-3b": Starcoder2Args(**_STARCODER2, dim=3072, num_layers=30, num_heads=24, num_kv_heads=2,
                                    ffn_dim=12288, rope_theta=999999.4420358813, tie_embeddings=True),
    "starcoder2-7b": Starcoder2Args(**_STARCODER2, dim=4608, num_layers=32, num_heads=36, num_kv_heads=4,
                                    ffn_dim=18432, rope_theta=1000000.0, tie_embeddings=True),
    "starcoder2-15b": Starcoder2Args(**_STARCODER2, dim=6144, num_layers=40, num_heads=48, num_kv_heads=4,
                                     ffn_dim=24576, rope_theta=100000.0),
}
