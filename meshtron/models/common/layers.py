"""Normalization, feed-forward and embedding/head layers shared by the families: RMSNorm and its
(1 + w) variant, LayerNorm with bias, the gated MLP (SwiGLU, GeGLU), the plain two-layer MLP (GELU),
Gemma's scaled embedding and soft-capped head."""

import torch
import torch.nn.functional as F
from torch import nn

from meshtron.models.common.init import ParamInit


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as transformers' Llama does."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def init_weights(self, init: ParamInit) -> None:
        init.fill_(self.weight, "weight", 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaled by (1 + w), w starting at zero, all in float32 before the cast back (Gemma)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def init_weights(self, init: ParamInit) -> None:
        init.fill_(self.weight, "weight", 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).type_as(x)


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (weight and bias) that initializes itself: weight one, bias zero (StarCoder2)."""

    def init_weights(self, init: ParamInit) -> None:
        init.fill_(self.weight, "weight", 1.0)
        if self.bias is not None:
            init.fill_(self.bias, "bias", 0.0)


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu_tanh.

    `std` initializes gate and up; `out_std` the down projection, which writes into the residual stream."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, std: float = 0.02, out_std: float = 0.02,
                 activation: str = "silu"):
        super().__init__()
        self.std, self.out_std = std, out_std
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def init_weights(self, init: ParamInit) -> None:
        init.linear(self.gate_proj, "gate_proj", self.std)
        init.linear(self.up_proj, "up_proj", self.std)
        init.linear(self.down_proj, "down_proj", self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """down(act(up(x))), not gated (StarCoder2's c_fc / c_proj). The names `up_proj` / `down_proj` are the
    gated MLP's, so that LoRA targets and tensor-parallel plans address both kinds alike."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, std: float = 0.02, out_std: float = 0.02,
                 activation: str = "gelu_tanh"):
        super().__init__()
        self.std, self.out_std = std, out_std
        self.act = ACTIVATIONS[activation]
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def init_weights(self, init: ParamInit) -> None:
        init.linear(self.up_proj, "up_proj", self.std)
        init.linear(self.down_proj, "down_proj", self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class ScaledEmbedding(nn.Embedding):
    """An embedding whose output is multiplied by sqrt(dim), rounded to the weight's dtype as Gemma does."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # A Python number (not a tensor) so that it also scales a tensor-parallel (DTensor) output.
        return super().forward(tokens) * torch.tensor(self.embedding_dim**0.5, dtype=self.weight.dtype).item()


class SoftcappedHead(nn.Linear):
    """The output head with its logits capped at +-softcap by tanh. Not a plain nn.Linear, so the
    chunked loss (meshtron.train.losses) runs this forward instead of reading the weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, softcap: float):
        super().__init__(in_features, out_features, bias=bias)
        self.softcap = softcap

    def forward(self, h_BSE: torch.Tensor) -> torch.Tensor:
        return self.softcap * torch.tanh(super().forward(h_BSE) / self.softcap)
