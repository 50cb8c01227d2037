"""Named Mixtral shapes. `debug` is a tiny model for tests (load-balancing loss on)."""

from meshtron.models.common.moe import MoEArgs


def _mixtral(dim, num_layers, num_heads, ffn_dim, vocab_size):
    return MoEArgs(family="mixtral", vocab_size=vocab_size, dim=dim, num_layers=num_layers, num_heads=num_heads,
                   num_kv_heads=8, head_dim=128, ffn_dim=ffn_dim, expert_ffn_dim=ffn_dim, norm_eps=1e-5,
                   max_seq_len=32768 if vocab_size == 32000 else 65536, rope_theta=1000000.0, num_experts=8,
                   num_experts_per_token=2)


FLAVORS = {
    "debug": MoEArgs(
        family="mixtral", vocab_size=1024, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
        ffn_dim=96, expert_ffn_dim=96, norm_eps=1e-5, max_seq_len=2048, rope_theta=1000000.0, num_experts=4,
        num_experts_per_token=2, aux_loss_coef=0.01,
    ),
    "8x7b": _mixtral(4096, 32, 32, 14336, 32000),
    "8x22b": _mixtral(6144, 56, 48, 16384, 32768),
}
