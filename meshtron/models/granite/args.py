"""Granite args (the dense args plus Granite's four scalar multipliers) and its named shapes. `debug`
is a tiny model with multipliers far from one, for tests."""

from dataclasses import dataclass

from meshtron.models.common.args import ModelArgs


@dataclass
class GraniteArgs(ModelArgs):
    family: str = "granite"
    embedding_multiplier: float = 1.0  # the embedding output is multiplied by it
    residual_multiplier: float = 1.0  # attention and MLP outputs are multiplied by it before the residual add
    attention_multiplier: float = 1.0  # the attention score scale (in place of 1/sqrt(head_dim))
    logits_scaling: float = 1.0  # the logits are divided by it


_GRANITE33 = dict(family="granite", vocab_size=49159, num_heads=32, num_kv_heads=8, head_dim=128, num_layers=40,
                  norm_eps=1e-5, max_seq_len=131072, rope_theta=10000000.0, tie_embeddings=True,
                  embedding_multiplier=12.0, residual_multiplier=0.22)

FLAVORS = {
    "debug": GraniteArgs(
        family="granite", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=128, norm_eps=1e-5, max_seq_len=2048, tie_embeddings=True, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.125, logits_scaling=4.0,
    ),
    # Granite-3.3 2B (2.53B) and 8B (8.17B).
    "granite3.3-2b": GraniteArgs(**{**_GRANITE33, "head_dim": 64}, dim=2048, ffn_dim=8192,
                                 attention_multiplier=0.015625, logits_scaling=8.0),
    "granite3.3-8b": GraniteArgs(**_GRANITE33, dim=4096, ffn_dim=12800, attention_multiplier=0.0078125,
                                 logits_scaling=16.0),
}
