"""Normalization and feed-forward layers of the dense decoder."""

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


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)).

    `std` initializes gate and up; `out_std` the down projection, which writes into the residual stream."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, std: float = 0.02, out_std: float = 0.02):
        super().__init__()
        self.std, self.out_std = std, out_std
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def init_weights(self, init: ParamInit) -> None:
        init.linear(self.gate_proj, "gate_proj", self.std)
        init.linear(self.up_proj, "up_proj", self.std)
        init.linear(self.down_proj, "down_proj", self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
