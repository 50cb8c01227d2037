"""DeepSeek args (the MoE args plus multi-head latent attention's) and the named DeepSeek-V3 shapes.
`debug` is a tiny model for tests."""

from dataclasses import dataclass

from meshtron.models.common.moe import MoEArgs


@dataclass
class DeepSeekArgs(MoEArgs):
    """`head_dim` is the rotary part of a head (`qk_rope_head_dim`, what RoPE rotates); `num_kv_heads` equals
    `num_heads` (every head has its own key and value, expanded from the shared latent)."""

    family: str = "deepseek_v3"
    q_lora_rank: int | None = None  # None: queries projected directly (q_proj); else through a normed latent
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    rope_interleave: bool = True  # RoPE pairs adjacent dims (DeepSeek's checkpoints), not halves
    # Multi-token prediction modules (DeepSeek-V3's num_nextn_predict_layers; models/deepseek_v3/model.py),
    # trained with `model.mtp_loss_weight`; not counted in num_params (the report's 671B excludes them).
    num_mtp_layers: int = 0

    @property
    def qk_rope_head_dim(self) -> int:
        return self.head_dim

    def __post_init__(self):
        super().__post_init__()
        if self.num_mtp_layers < 0:
            raise ValueError(f"num_mtp_layers must be >= 0, not {self.num_mtp_layers}")
        if self.num_kv_heads != self.num_heads:
            raise ValueError(f"latent attention has one key/value head per query head: num_kv_heads "
                             f"({self.num_kv_heads}) must equal num_heads ({self.num_heads})")

    def attention_params(self) -> int:
        H, qk = self.num_heads, self.qk_nope_head_dim + self.head_dim
        if self.q_lora_rank:
            q = self.dim * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
            q += self.q_lora_rank if self.qkv_bias else 0
        else:
            q = self.dim * H * qk
        kv_a = self.kv_lora_rank + self.head_dim
        kv = self.dim * kv_a + (kv_a if self.qkv_bias else 0) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        out = H * self.v_head_dim * self.dim + (self.dim if self.out_bias else 0)
        return q + kv + out


def deepseek_v3(dim, num_layers, num_heads, ffn_dim, expert_ffn_dim, num_experts, dense_layers, vocab_size,
                num_shared=1, norm_eps=1e-6, **fields) -> DeepSeekArgs:
    return DeepSeekArgs(family="deepseek_v3", vocab_size=vocab_size, dim=dim, num_layers=num_layers,
                        num_heads=num_heads, num_kv_heads=num_heads, ffn_dim=ffn_dim, expert_ffn_dim=expert_ffn_dim,
                        num_experts=num_experts, shared_expert_ffn_dim=num_shared * expert_ffn_dim,
                        shared_expert_gated=False, dense_layers=tuple(range(dense_layers)), score_func="sigmoid",
                        router_bias=True, group_score="top2", norm_topk=True, norm_eps=norm_eps, **fields)


# DeepSeek-V3 / R1 (config.json of deepseek-ai/DeepSeek-V3): YaRN x40 over 4096 positions.
_V3_ROPE = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

FLAVORS = {
    "debug": deepseek_v3(64, 3, 4, 128, 32, 8, 1, 1024, head_dim=8, q_lora_rank=32, kv_lora_rank=24,
                         qk_nope_head_dim=16, v_head_dim=16, num_experts_per_token=2, num_groups=4, topk_groups=2,
                         route_scale=2.5, max_seq_len=2048),
    "671b": deepseek_v3(7168, 61, 128, 18432, 2048, 256, 3, 129280, head_dim=64, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, v_head_dim=128, num_experts_per_token=8, num_groups=8, topk_groups=4,
                        route_scale=2.5, max_seq_len=163840, rope_scaling=_V3_ROPE),
    # Moonlight-16B-A3B (Moonshot AI; DeepSeek-V3's architecture): queries without a latent, 2 shared experts,
    # one group, plain RoPE with base 50000.
    "moonlight-16b-a3b": deepseek_v3(2048, 27, 16, 11264, 1408, 64, 1, 163840, num_shared=2, norm_eps=1e-5,
                                     head_dim=64, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                                     v_head_dim=128, num_experts_per_token=6, route_scale=2.446, max_seq_len=8192,
                                     rope_theta=50000.0),
}
