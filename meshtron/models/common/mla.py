"""Multi-head latent attention (DeepSeek-V2 and V3) and its tensor-parallel plan.

Keys and values come from one small latent per token: x -> `kv_a_proj_with_mqa` -> (latent of
`kv_lora_rank` dims, normed by `kv_a_layernorm`; one rotary key of `qk_rope_head_dim` dims shared by all
heads). `kv_b_proj` expands the latent into each head's non-rotary key part (`qk_nope_head_dim`) and its
value (`v_head_dim`). Queries are projected directly (`q_proj`) or through a normed latent of
`q_lora_rank` dims (`q_a_proj` -> `q_a_layernorm` -> `q_b_proj`); each head's query and key are its
non-rotary part followed by its rotary part. The KV cache holds the latent and the rotary key
(kv_lora_rank + qk_rope_head_dim numbers per token and layer), never the expanded keys and values.

Module names are the checkpoints' so that they map one to one. Shapes: B batch, S queries, K keys,
H heads (local under tensor parallel: read from the projected tensors), C kv_lora_rank, R qk_rope_head_dim,
N qk_nope_head_dim, V v_head_dim.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from meshtron.models.common.args import ModelArgs
from meshtron.models.common.attention import AttentionCore, KVCache, residual_std
from meshtron.models.common.init import ParamInit
from meshtron.models.common.layers import RMSNorm
from meshtron.models.common.masks import AttentionMask
from meshtron.models.common.rope import apply_rotary

# The latents' norms keep RMSNorm's default epsilon, not the model's (as DeepSeek's checkpoints were trained).
LATENT_NORM_EPS = 1e-6


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_scale(args) -> float:
    """1/sqrt(query head dim), times YaRN's attention-scale correction squared when the RoPE scaling
    sets `mscale_all_dim` (the correction of the scores the rotary part alone cannot carry)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    params = args.rope_scaling or {}
    if params.get("mscale_all_dim"):
        scale *= yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


class LatentAttention(nn.Module):
    """Multi-head latent attention. `args` carries the MLA fields (q_lora_rank, kv_lora_rank,
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim, rope_interleave); `qkv_bias` is the bias of the
    down-projections, `out_bias` that of o_proj (Hugging Face's one `attention_bias`)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.nope_dim, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_rank = args.kv_lora_rank
        self.rotary = "interleaved" if args.rope_interleave else "half"
        q_dim = args.num_heads * (self.nope_dim + self.rope_dim)
        if args.q_lora_rank:
            self.q_proj = None
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=args.qkv_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(args.q_lora_rank, q_dim, bias=False)
        else:
            self.q_proj = nn.Linear(args.dim, q_dim, bias=False)
            self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, self.kv_rank + self.rope_dim, bias=args.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        # Identity; under tensor parallel the point where the shared rotary key's gradient, which each rank
        # computes from its own heads only, is summed over the ranks (`mla_projection_plan`).
        self.rotary_key = nn.Identity()
        self.kv_b_proj = nn.Linear(self.kv_rank, args.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(args.num_heads * self.v_dim, args.dim, bias=args.out_bias)
        self.core = AttentionCore(None, mla_scale(args))
        self.std, self.out_std = args.init_std, residual_std(args)
        self.absorb = False  # decode with the up-projections absorbed (`absorbed_decode`); a run setting

    def init_weights(self, init: ParamInit) -> None:
        for name in ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"):
            if getattr(self, name) is not None:
                init.linear(getattr(self, name), name, self.std)
        init.linear(self.o_proj, "o_proj", self.out_std)

    def query(self, x_BSE) -> torch.Tensor:
        """(B, H, S, N + R)."""
        B, S, _ = x_BSE.shape
        q = self.q_proj(x_BSE) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSE)))
        return q.view(B, S, -1, self.nope_dim + self.rope_dim).transpose(1, 2)

    def expand(self, latent_B1KC, k_rot_B1KR) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, H, K, N + R) and values (B, H, K, V) from the latent and the shared rotary key."""
        B, _, K, _ = latent_B1KC.shape
        kv = self.kv_b_proj(latent_B1KC.squeeze(1)).view(B, K, -1, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot_B1KR.expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        return k, v

    def forward(self, x_BSE, cos, sin, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSE.shape
        q_nope, q_rot = self.query(x_BSE).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x_BSE).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)
        q_rot, k_rot = apply_rotary(q_rot, self.rotary_key(k_rot).unsqueeze(1), cos, sin, self.rotary)
        if cache is not None:  # the latent in k's place, the rotary key in v's
            latent, k_rot = cache.update(self.layer_id, latent, k_rot)
            if self.absorb and S == 1:
                out = self.absorbed_decode(q_nope, q_rot, latent, k_rot, mask)
                return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
        k, v = self.expand(latent, k_rot)
        q, k, v = _same_width(torch.cat([q_nope, q_rot], dim=-1), k, v)
        out = self.core(q, k, v, mask)[..., :self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


    def absorbed_decode(self, q_nope, q_rot, latent_B1KC, k_rot_B1KR, mask: AttentionMask) -> torch.Tensor:
        """Attention output (B, H, S, V) without expanding the cached latent into every head's keys and values
        (DeepSeek-V2's absorption): the key up-projection W_UK is applied to the query instead
        (q_nope . W_UK c = (W_UK^T q_nope) . c), the value up-projection W_UV to the attended latent, so the
        step reads the cache as one shared key/value head of width kv_lora_rank + rope dim. Worth it where a
        decode step's keys outnumber its heads' up-projection work: long caches."""
        w_HXC = self.kv_b_proj.weight.view(-1, self.nope_dim + self.v_dim, self.kv_rank)
        w_uk, w_uv = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q = torch.cat([torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk), q_rot], dim=-1)
        k = torch.cat([latent_B1KC, k_rot_B1KR], dim=-1)
        q, k, v = _same_width(q, k, latent_B1KC)
        out_lat = self.core(q, k, v, mask)[..., :self.kv_rank]
        return torch.einsum("bhsc,hvc->bhsv", out_lat, w_uv)


def set_absorbed_decode(model: nn.Module, on: bool) -> None:
    """Decode (one new token per step, from the latent cache) with the up-projections absorbed, in every
    latent attention of `model`; prefill and training are unchanged."""
    for module in model.modules():
        if isinstance(module, LatentAttention):
            module.absorb = on


def _same_width(q, k, v):
    """q, k and v zero-padded to one head width: the attention kernels (Flash, the per-document and
    variable-length paths) take one head dim. Zeros change neither the scores (the scale is explicit) nor
    the kept part of the output."""
    width = max(q.shape[-1], v.shape[-1])
    return tuple(F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))


def latent_cache_numbers(args) -> int:
    """Numbers the cache holds per token and layer: the latent and the shared rotary key."""
    return args.kv_lora_rank + args.qk_rope_head_dim


def expanded_cache_numbers(args) -> int:
    """What caching the expanded keys and values would hold per token and layer."""
    return args.num_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)


def mla_projection_plan(args, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The attention entries of a block's tensor-parallel plan (the dense plan's q/k/v/o ones replaced):
    heads split, the up-projections to heads (q_proj or q_b_proj, kv_b_proj) column-wise, o_proj row-wise
    (reduce-scattered to the sequence shards with sequence parallel). The down-projections and their norms
    are small and replicated: every rank computes the whole latents, whose gradients arrive whole (the
    column-wise projections all-reduce their input's gradient)."""
    q = "attn.q_b_proj" if args.q_lora_rank else "attn.q_proj"
    out = RowwiseParallel(output_layouts=Shard(1), use_local_output=False) if sequence_parallel else RowwiseParallel()
    return {q: ColwiseParallel(), "attn.kv_b_proj": ColwiseParallel(), "attn.o_proj": out,
            "attn.rotary_key": SumGradient()}


class SumGradient(ParallelStyle):
    """Identity forward on a replicated tensor; backward sums its gradient over the ranks (each rank's part
    comes from its own heads): the tensor is marked replicated with a partial gradient, which DTensor
    all-reduces when the gradient goes back to the replicated input."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def output_fn(mod, out, mesh):
            return DTensor.from_local(out, mesh, (Replicate(),), run_check=False).to_local(grad_placements=(Partial(),))

        return distribute_module(module, device_mesh, output_fn=output_fn)
