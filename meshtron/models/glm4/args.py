"""GLM-4 args (the dense args; the family adds two norms per layer) and its named shapes. `debug` is a
tiny model for tests."""

from dataclasses import dataclass

from meshtron.models.common.args import ModelArgs


@dataclass
class Glm4Args(ModelArgs):
    family: str = "glm4"
    qkv_bias: bool = True
    partial_rotary: float = 0.5

    def num_params(self, include_embedding: bool = True) -> int:
        # Two more norms per layer (after attention and after the MLP: "sandwich" norms).
        return super().num_params(include_embedding) + 2 * self.num_layers * self.dim


FLAVORS = {
    "debug": Glm4Args(
        vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=128,
        norm_eps=1e-5, max_seq_len=2048,
    ),
    # GLM-4-9B-0414 and GLM-4-32B-0414.
    "glm4-9b": Glm4Args(vocab_size=151552, dim=4096, num_layers=40, num_heads=32, num_kv_heads=2, head_dim=128,
                        ffn_dim=13696, norm_eps=1e-5, max_seq_len=32768),
    "glm4-32b": Glm4Args(vocab_size=151552, dim=6144, num_layers=61, num_heads=48, num_kv_heads=2, head_dim=128,
                         ffn_dim=23040, norm_eps=1e-5, max_seq_len=32768),
}
