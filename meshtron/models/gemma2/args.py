"""Gemma 2 args (the dense args plus Gemma's own fields) and its named shapes. `debug` is a tiny
model for tests."""

from dataclasses import dataclass

from meshtron.models.common.args import ModelArgs


@dataclass
class Gemma2Args(ModelArgs):
    family: str = "gemma2"
    query_pre_attn_scalar: int = 256  # attention scores are scaled by its inverse square root
    attn_softcap: float | None = 50.0  # scores capped at +-attn_softcap with tanh
    final_softcap: float | None = 30.0  # logits capped likewise
    activation: str = "gelu_tanh"  # of the gated MLP (GeGLU)

    def num_params(self, include_embedding: bool = True) -> int:
        # Two more norms per layer (after attention and after the MLP: "sandwich" norms).
        return super().num_params(include_embedding) + 2 * self.num_layers * self.dim


_GEMMA2 = dict(family="gemma2", vocab_size=256000, head_dim=256, norm_eps=1e-6, max_seq_len=8192, rope_theta=10000.0,
               tie_embeddings=True, sliding_window=4096, query_pre_attn_scalar=256)


def _sliding(num_layers: int) -> tuple[int, ...]:
    return tuple(range(0, num_layers, 2))  # every other layer, from the first


FLAVORS = {
    "debug": Gemma2Args(
        family="gemma2", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-6, max_seq_len=2048, tie_embeddings=True, sliding_window=8, sliding_layers=(0,),
        query_pre_attn_scalar=16,
    ),
    "gemma2-2b": Gemma2Args(**_GEMMA2, dim=2304, num_layers=26, num_heads=8, num_kv_heads=4, ffn_dim=9216,
                            sliding_layers=_sliding(26)),
    "gemma2-9b": Gemma2Args(**_GEMMA2, dim=3584, num_layers=42, num_heads=16, num_kv_heads=8, ffn_dim=14336,
                            sliding_layers=_sliding(42)),
    "gemma2-27b": Gemma2Args(**{**_GEMMA2, "query_pre_attn_scalar": 144, "head_dim": 128}, dim=4608, num_layers=46,
                             num_heads=32, num_kv_heads=16, ffn_dim=36864, sliding_layers=_sliding(46)),
}
