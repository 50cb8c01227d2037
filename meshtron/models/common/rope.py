"""Rotary position embedding with the scalings transformers implements for dense decoders.

Supported `rope_type`s: default, linear, dynamic (NTK-aware, recomputed when a
sequence runs past `max_seq_len`), llama3, yarn and longrope (Phi-3: per-frequency factors,
the long ones once positions run past the original context). With `partial_rotary` < 1 only
the first part of each head is rotated (Phi-4-mini, StableLM). Frequencies and cos/sin are
computed in float32 and cast to the activation dtype, as transformers does, so
that logits match it bit for bit in float32.

The rotation pairs dims the way a family's Hugging Face checkpoints do, so no q/k weight
permutation is needed on import or export (nor on a PEFT adapter's export): "half" pairs dim j
with dim j + n/2 (most families), "interleaved" pairs adjacent dims 2j and 2j + 1 (GLM-4).
`RotaryPerLayerType` serves families whose kinds of layers rotate with different bases (Gemma 3).
"""

import math

import torch
from torch import nn

from meshtron.models.common.args import ModelArgs

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _base_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    return 1.0 / (base**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the middle band blended smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, params: dict, max_seq_len: int, device=None):
    factor = params.get("factor")
    original_max = params.get("original_max_position_embeddings", max_seq_len)
    if factor is None:
        factor = max_seq_len / original_max

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device).to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, attention_factor


def _longrope_inv_freq(base: float, dim: int, params: dict, max_seq_len: int, seq_len: int | None, device=None):
    original_max = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_seq_len / original_max
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
    long = seq_len is not None and seq_len > original_max
    factors = torch.tensor(params["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (factors * base**exponents), attention_factor


def rotary_dim(args: ModelArgs) -> int:
    """How many dims of each head RoPE rotates (all but with a partial rotary factor)."""
    return int(args.head_dim * args.partial_rotary)


def compute_inv_freq(args: ModelArgs, seq_len: int | None = None, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scaling factor for `args` (and, for dynamic and longrope, a
    sequence length)."""
    params = args.rope_scaling or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    dim = rotary_dim(args)
    base = args.rope_theta
    if rope_type == "default":
        return _base_inv_freq(base, dim, device), 1.0
    if rope_type == "linear":
        return _base_inv_freq(base, dim, device) / params["factor"], 1.0
    if rope_type == "dynamic":
        seq_len = max(seq_len or args.max_seq_len, args.max_seq_len)
        factor = params["factor"]
        base = base * ((factor * seq_len / args.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim, device), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(base, dim, device), params), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(base, dim, params, args.max_seq_len, device)
    if rope_type == "longrope":
        return _longrope_inv_freq(base, dim, params, args.max_seq_len, seq_len, device)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) of shape (B, S, head_dim) for given position ids."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        rope_type = (args.rope_scaling or {}).get("rope_type")
        # Frequencies that depend on the longest position of the input: past `switch_len`, recomputed.
        self.switch_len = {"dynamic": args.max_seq_len,
                           "longrope": (args.rope_scaling or {}).get("original_max_position_embeddings")}.get(rope_type)
        self.register_buffer("inv_freq", torch.empty(rotary_dim(args) // 2), persistent=False)
        self.attention_scaling = 1.0
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.inv_freq.is_meta:
            return
        inv_freq, self.attention_scaling = compute_inv_freq(self.args, device=self.inv_freq.device)
        # Always float32, even after the model was cast to a low-precision dtype: frequencies rounded
        # to bfloat16 would shift every rotation and break parity with transformers.
        self.inv_freq = inv_freq

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.dtype != torch.float32:  # the module was cast after initialization
            self.reset_parameters()
        inv_freq = self.inv_freq
        if self.switch_len is not None:
            # NTK-aware scaling (dynamic) and LongRoPE's long factors depend on the longest position seen;
            # short inputs keep the original frequencies.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.switch_len:
                inv_freq, _ = compute_inv_freq(self.args, seq_len=seq_len, device=inv_freq.device)
        freqs = position_ids[..., None].float() * inv_freq.float()  # (B, S, head_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


class RotaryPerLayerType(nn.Module):
    """One RoPE table per kind of layer, each from its own args (base, scaling): Gemma 3's local
    (sliding-window) layers rotate with a smaller base and without the global layers' scaling.
    Returns (cos, sin) as dicts keyed by kind; each block picks its own."""

    def __init__(self, args_by_kind: dict[str, ModelArgs]):
        super().__init__()
        self.kinds = nn.ModuleDict({kind: RotaryEmbedding(args) for kind, args in args_by_kind.items()})

    def reset_parameters(self) -> None:
        for rope in self.kinds.values():
            rope.reset_parameters()

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
        tables = {kind: rope(position_ids, dtype) for kind, rope in self.kinds.items()}
        return {kind: cos for kind, (cos, _) in tables.items()}, {kind: sin for kind, (_, sin) in tables.items()}


ROTARY_LAYOUTS = ("half", "interleaved")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): each adjacent pair rotated by 90 degrees."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half"):
    """q, k: (B, H, S, head_dim); cos, sin: (B, S, rotary dims), each frequency twice (cat(f, f)).
    Dims past the rotary ones pass unchanged. `layout`: which dims form a rotated pair (see the module
    docstring)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotate_pairs = rotate_half
    if layout == "interleaved":
        # Each frequency on two adjacent dims: (f0, f0, f1, f1, ...) from the first half of cat(f, f).
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half].repeat_interleave(2, dim=-1), sin[..., :half].repeat_interleave(2, dim=-1)
        rotate_pairs = rotate_interleaved
    n = cos.shape[-1]
    if n == q.shape[-1]:
        return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin

    def rotate(x):
        return torch.cat([x[..., :n] * cos + rotate_pairs(x[..., :n]) * sin, x[..., n:]], dim=-1)

    return rotate(q), rotate(k)
