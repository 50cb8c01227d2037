"""Mixture-of-Experts feed-forward: a top-k router, stacked experts run with grouped GEMM, an optional
shared expert, and the load-balancing loss (Switch / Mixtral, as transformers computes it).

Legend: N tokens (B * S flattened), D model dim, I an expert's hidden dim, E experts, K experts per token,
R routed rows (N * K, fewer when a capacity drops some).

Routing is token-choice and dropless by default: every token reaches its K experts. Rows are sorted by
expert, so that each expert's tokens are one contiguous slice and all experts run as one grouped matmul
(`torch._grouped_mm` where its kernel runs, `grouped_mm_runs`; a loop over experts otherwise). With a
`capacity_factor`, an expert takes at most ceil(factor * N * K / E) rows, the earliest tokens first; the
others are dropped (their routed contribution is zero) and counted.

Each forward with gradients on records its router statistics (`MoE.router_stats`), replacing the last
one's; `take_router_stats` collects them over a model's MoE layers and `router_totals` sums them, from
which `load_balancing_loss` and `router_z_loss` are computed (the Trainer adds them to the loss), the
expert load is logged and, with auxiliary-loss-free balancing, each router's bias is updated after the
step (`update_expert_bias`).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from meshtron.models.common.adapter import TensorGroup
from meshtron.models.common.args import ModelArgs
from meshtron.models.common.attention import residual_std
from meshtron.models.common.init import ParamInit
from meshtron.models.common.layers import ACTIVATIONS, GatedMLP
from meshtron.models.common.transformer import Transformer, TransformerBlock

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# MoEArgs fields that change how a model trains, not its weights: `model.args` may set them on a pretrained
# model (Hugging Face directory or checkpoint) too.
ROUTING_FIELDS = frozenset({"aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate",
                            "capacity_factor"})
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2")


@dataclass
class MoEArgs(ModelArgs):
    """The dense decoder's args plus the MoE layers'. `ffn_dim` is the dense layers' MLP size."""

    num_experts: int = 8
    num_experts_per_token: int = 2
    expert_ffn_dim: int = 14336
    shared_expert_ffn_dim: int = 0  # 0: no shared expert; else one gated by sigmoid(x @ w) (Qwen2-MoE)
    shared_expert_gated: bool = True  # False: the shared expert's output is added as is (DeepSeek)
    score_func: str = "softmax"  # router scores: softmax over experts, or an independent sigmoid per expert
    norm_topk: bool = True  # renormalize the K chosen scores to sum to one (Mixtral; Qwen's norm_topk_prob)
    route_scale: float = 1.0  # multiplies the chosen scores
    moe_step: int = 1  # every moe_step-th layer is MoE (Qwen's decoder_sparse_step)
    dense_layers: tuple[int, ...] = field(default_factory=tuple)  # layers kept dense (Qwen's mlp_only_layers)
    capacity_factor: float | None = None  # None: dropless; else rows per expert <= ceil(f * N * K / E)
    aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (0: not computed)
    # Weight of DeepSeek-V3's sequence-wise balance loss (`sequence_balance_loss`), summed over MoE layers.
    seq_aux_loss_coef: float = 0.0
    # Group-limited routing (DeepSeek's n_group / topk_group): experts form `num_groups` equal groups and a
    # token's K experts come from its `topk_groups` best groups, a group scored by its best expert ("max",
    # DeepSeek-V2) or the sum of its two best ("top2", DeepSeek-V3).
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    # A per-expert bias (float32 buffer) added to the scores for choosing the K only, not to their weights
    # (DeepSeek-V3's e_score_correction_bias); trained by auxiliary-loss-free balancing (bias_update_rate).
    router_bias: bool = False
    z_loss_coef: float = 0.0  # weight of the router z-loss (ST-MoE) in training
    # Auxiliary-loss-free balancing (DeepSeek-V3): after each step every expert's routing bias (`router_bias`,
    # implied) moves by this much towards balance (0: the bias, if any, stays as loaded).
    bias_update_rate: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.dense_layers = tuple(self.dense_layers)
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {', '.join(SCORE_FUNCS)}, not {self.score_func!r}")
        if not 0 < self.num_experts_per_token <= self.num_experts:
            raise ValueError(f"num_experts_per_token ({self.num_experts_per_token}) must be in 1..num_experts "
                             f"({self.num_experts})")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive (or None for dropless), not {self.capacity_factor}")
        self._check_groups()

    def _check_groups(self) -> None:
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"group_score must be one of {', '.join(GROUP_SCORES)}, not {self.group_score!r}")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"num_groups ({self.num_groups}) must divide num_experts ({self.num_experts})")
        if not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups ({self.topk_groups}) must be in 1..num_groups ({self.num_groups})")
        if self.topk_groups * (self.num_experts // self.num_groups) < self.num_experts_per_token:
            raise ValueError(f"topk_groups ({self.topk_groups}) groups of {self.num_experts // self.num_groups} "
                             f"experts hold fewer than num_experts_per_token ({self.num_experts_per_token})")

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id not in self.dense_layers and (layer_id + 1) % self.moe_step == 0

    def _moe_mlp_params(self, experts: int) -> int:
        gate = self.dim if self.shared_expert_gated else 0
        shared = 3 * self.dim * self.shared_expert_ffn_dim + gate if self.shared_expert_ffn_dim else 0
        return experts * 3 * self.dim * self.expert_ffn_dim + self.num_experts * self.dim + shared

    def _params_with(self, experts: int, include_embedding: bool) -> int:
        num_moe = sum(self.is_moe_layer(i) for i in range(self.num_layers))
        dense_mlp = 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim if self.mlp_bias else 0)
        return super().num_params(include_embedding) + num_moe * (self._moe_mlp_params(experts) - dense_mlp)

    def num_params(self, include_embedding: bool = True) -> int:
        return self._params_with(self.num_experts, include_embedding)

    def num_active_params(self, include_embedding: bool = True) -> int:
        """K experts of each MoE layer, not E."""
        return self._params_with(self.num_experts_per_token, include_embedding)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous: grouped_mm's backward refuses an expanded or
    strided one (e.g. the gradient of a sum)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm_runs(x_RD: torch.Tensor, hidden_dim: int) -> bool:
    """Whether torch._grouped_mm runs these experts: on CPU in any floating dtype (checked here, float32 and
    bfloat16), but under torch.compile only bfloat16 (its meta function, which compile traces with, refuses
    other dtypes); on CUDA only bfloat16 on compute capability 9.0+ with 16-byte aligned rows (D and I
    multiples of 8), the limits of torch's kernel (its meta checks). Elsewhere the loop over experts runs."""
    if not HAS_GROUPED_MM:
        return False
    if x_RD.device.type == "cpu":
        return x_RD.dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return (x_RD.device.type == "cuda" and x_RD.dtype == torch.bfloat16 and x_RD.shape[-1] % 8 == 0
            and hidden_dim % 8 == 0 and torch.cuda.get_device_capability(x_RD.device) >= (9, 0))


def grouped_linear(x_RD: torch.Tensor, w_EOD: torch.Tensor, offsets_E: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows offsets[e-1]:offsets[e] of x times expert e's (out, in) weight transposed: (R, O). Every row is
    covered (offsets[-1] == R): grouped_mm leaves rows past the last offset uninitialized."""
    if grouped:
        return _ContiguousGrad.apply(torch._grouped_mm(x_RD, w_EOD.transpose(-2, -1), offs=offsets_E))
    starts = [0] + offsets_E[:-1].tolist()
    return torch.cat([F.linear(x_RD[s:e], w_EOD[i]) for i, (s, e) in enumerate(zip(starts, offsets_E.tolist()))])


class GroupedExperts(nn.Module):
    """E gated MLPs as stacked weights: gate_proj and up_proj (E, I, D), down_proj (E, D, I), each
    expert's slice in nn.Linear's (out, in) layout, as checkpoints store them."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, std: float = 0.02, out_std: float = 0.02,
                 activation: str = "silu"):
        super().__init__()
        self.std, self.out_std = std, out_std
        self.act = ACTIVATIONS[activation]
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.grouped_mm = HAS_GROUPED_MM  # False: the per-expert loop (tests compare both)

    def init_weights(self, init: ParamInit) -> None:
        init.normal_(self.gate_proj, "gate_proj", self.std)
        init.normal_(self.up_proj, "up_proj", self.std)
        init.normal_(self.down_proj, "down_proj", self.out_std)

    def forward(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x: rows sorted by expert, counts[e] of them for expert e. Returns (R, D)."""
        # Under expert parallel the weights are split over ranks (DTensors) and x and counts are this rank's
        # experts' rows (parallel/ep.py): compute with this rank's slice.
        gate_proj, up_proj, down_proj = (w.to_local() if isinstance(w, DTensor) else w
                                         for w in (self.gate_proj, self.up_proj, self.down_proj))
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        grouped = self.grouped_mm and grouped_mm_runs(x_RD, gate_proj.shape[1])
        gate = grouped_linear(x_RD, gate_proj, offsets, grouped)
        up = grouped_linear(x_RD, up_proj, offsets, grouped)
        return grouped_linear(self.act(gate) * up, down_proj, offsets, grouped)


@dataclass
class RouterStats:
    """One MoE forward's router statistics: what the load-balancing loss and the load metrics need."""

    selected_E: torch.Tensor  # float32 count of the rows each expert was chosen for (before any drop)
    prob_sum_E: torch.Tensor  # float32 sum over tokens of softmax(router logits): differentiable
    num_tokens: int
    dropped: torch.Tensor  # rows dropped by the capacity (0 when dropless)
    z_loss: torch.Tensor  # mean over tokens of logsumexp(router logits)^2: differentiable
    seq_balance: torch.Tensor  # this layer's sequence-wise balance loss (`sequence_balance`): differentiable


class Router(nn.Module):
    """Scores E experts per token from a (E, D) weight and keeps the top K, optionally from the best groups
    only and chosen with a per-expert bias (`MoEArgs.num_groups`, `router_bias`, trained by auxiliary-loss-free
    balancing); the chosen experts' weights are their unbiased scores."""

    def __init__(self, args: MoEArgs):
        super().__init__()
        self.top_k, self.score_func = args.num_experts_per_token, args.score_func
        self.norm_topk, self.route_scale, self.std = args.norm_topk, args.route_scale, args.init_std
        self.num_groups, self.topk_groups, self.group_score = args.num_groups, args.topk_groups, args.group_score
        self.weight = nn.Parameter(torch.empty(args.num_experts, args.dim))
        has_bias = args.router_bias or args.bias_update_rate
        bias = torch.zeros(args.num_experts, dtype=torch.float32) if has_bias else None
        self.register_buffer("expert_bias", bias)

    def init_weights(self, init: ParamInit) -> None:
        init.normal_(self.weight, "weight", self.std)
        if self.expert_bias is not None:
            init.fill_(self.expert_bias, "expert_bias", 0.0)

    def _apply(self, fn, recurse=True):
        """A dtype cast of the model (`model.to(torch.bfloat16)`) leaves the bias in float32, as transformers
        keeps `e_score_correction_bias`: rounded to bfloat16 it would change the choice of experts, and a
        balancing update of 1e-3 would vanish in it. Device moves apply."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias.dtype != bias.dtype:
            self.expert_bias = bias.to(self.expert_bias.device)
        return self

    def limit_to_groups(self, choice_NE: torch.Tensor) -> torch.Tensor:
        """The choice scores with the experts outside each token's `topk_groups` best groups at -inf."""
        N, E = choice_NE.shape
        grouped = choice_NE.view(N, self.num_groups, E // self.num_groups)
        group_scores = grouped.amax(-1) if self.group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)

    def scores(self, logits_NE: torch.Tensor) -> torch.Tensor:
        """The experts' float32 scores (softmax over experts, or a sigmoid each), unbiased."""
        return logits_NE.float().softmax(-1) if self.score_func == "softmax" else logits_NE.float().sigmoid()

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E), chosen experts (N, K), their weights (N, K) in float32)."""
        logits = F.linear(x_ND, self.weight)
        scores = self.scores(logits)
        choice = scores if self.expert_bias is None else scores + self.expert_bias
        if self.num_groups > 1:
            choice = self.limit_to_groups(choice)
        experts = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if self.norm_topk:
            # The tiny term is DeepSeek's guard against a zero sum (sigmoid scores can all underflow).
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, experts, weights * self.route_scale


def keep_within_capacity(expert_R: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
    """Boolean (R,) over rows sorted by expert: the first `capacity` rows of each expert."""
    starts = torch.cumsum(counts_E, 0) - counts_E
    rank = torch.arange(expert_R.numel(), device=expert_R.device) - starts[expert_R]
    return rank < capacity


class MoE(nn.Module):
    """The MoE feed-forward of one block: routed experts plus an optional sigmoid-gated shared expert."""

    def __init__(self, args: MoEArgs, out_std: float):
        super().__init__()
        self.num_experts, self.top_k, self.capacity_factor = (args.num_experts, args.num_experts_per_token,
                                                              args.capacity_factor)
        self.router = Router(args)
        self.experts = GroupedExperts(args.num_experts, args.dim, args.expert_ffn_dim, args.init_std, out_std)
        self.shared_expert = self.shared_expert_gate = None
        if args.shared_expert_ffn_dim:
            self.shared_expert = GatedMLP(args.dim, args.shared_expert_ffn_dim, std=args.init_std, out_std=out_std)
            if args.shared_expert_gated:
                self.shared_expert_gate = nn.Linear(args.dim, 1, bias=False)
        self.router_stats: RouterStats | None = None

    def init_weights(self, init: ParamInit) -> None:
        if self.shared_expert_gate is not None:
            init.linear(self.shared_expert_gate, "shared_expert_gate", self.router.std)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_ND = x_BSD.reshape(B * S, D)
        logits, experts_NK, weights_NK = self.router(x_ND)
        expert_R = experts_NK.flatten()
        order = torch.argsort(expert_R, stable=True)  # rows grouped by expert, tokens in order within each
        expert_R = expert_R[order]
        counts = torch.bincount(expert_R, minlength=self.num_experts)
        selected = counts.float()
        dropped = torch.zeros((), device=x_ND.device)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * B * S * self.top_k / self.num_experts)
            keep = keep_within_capacity(expert_R, counts, capacity)
            order, counts = order[keep], counts.clamp(max=capacity)
            dropped = (~keep).sum()
        token_R = order // self.top_k
        out_RD = self.experts(x_ND[token_R], counts)
        out_RD = (out_RD.float() * weights_NK.flatten()[order, None]).to(x_ND.dtype)
        y_ND = torch.zeros_like(x_ND).index_add(0, token_R, out_RD)
        if self.shared_expert_gate is not None:
            y_ND = y_ND + torch.sigmoid(self.shared_expert_gate(x_ND)) * self.shared_expert(x_ND)
        elif self.shared_expert is not None:
            y_ND = y_ND + self.shared_expert(x_ND)
        if torch.is_grad_enabled():  # a training forward; not generation, evaluation or a frozen reference pass
            logits = logits.float()
            self.router_stats = RouterStats(selected, logits.softmax(-1).sum(0), B * S, dropped,
                                            logits.logsumexp(-1).square().mean(),
                                            sequence_balance(self.router.scores(logits).view(B, S, -1),
                                                             experts_NK.view(B, S, -1)))
        return y_ND.view(B, S, D)


def take_router_stats(model: nn.Module) -> list[RouterStats]:
    """The router statistics of the model's MoE layers since their last forward, then forgotten."""
    stats = []
    for layer in moe_layers(model):
        if layer.router_stats is not None:
            stats.append(layer.router_stats)
            layer.router_stats = None
    return stats


def router_totals(stats: list[RouterStats], num_experts: int, device: torch.device | None = None) -> torch.Tensor:
    """One forward's router statistics summed over MoE layers, as one float32 vector: [rows chosen per
    expert (E), probability sums per expert (E), rows, z-loss sum, sequence-wise balance loss sum]. The
    losses need only these sums, so the totals of layers split between pipeline stages add up (the
    probability and loss parts differentiable); no layers: zeros (on `device`)."""
    if not stats:
        return torch.zeros(2 * num_experts + 3, device=device)
    selected = torch.stack([s.selected_E for s in stats]).sum(0)
    prob = torch.stack([s.prob_sum_E for s in stats]).sum(0)
    rows = selected.new_tensor([float(sum(s.num_tokens for s in stats))])
    z_loss = torch.stack([s.z_loss for s in stats]).sum().reshape(1)
    seq_balance = torch.stack([s.seq_balance for s in stats]).sum().reshape(1).float()
    return torch.cat([selected, prob, rows, z_loss, seq_balance])


def load_balancing_loss(totals: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The Switch / Mixtral auxiliary loss over all layers together (`router_totals`), as transformers'
    `load_balancing_loss_func` computes it: E * sum_e (share of routed rows to e) * (mean probability of e),
    both averaged over the rows of every layer."""
    selected, prob, rows = totals[:num_experts], totals[num_experts:2 * num_experts], totals[2 * num_experts]
    return (selected / rows * prob / rows).sum() * num_experts


def sequence_balance(scores_BSE: torch.Tensor, experts_BSK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss of one layer, before its weight, averaged over
    the sequences: per sequence of T tokens, sum_i f_i * P_i with f_i = E / (K * T) * (tokens routed to
    expert i) and P_i the mean over tokens of the scores normalized to sum to one (s_i / sum_j s_j)."""
    B, S, E = scores_BSE.shape
    K = experts_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, device=scores_BSE.device).scatter_add_(
        1, experts_BSK.reshape(B, S * K), torch.ones(B, S * K, device=scores_BSE.device))
    f_BE = counts_BE * E / (K * S)
    p_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return (f_BE * p_BE).sum(-1).mean()


def sequence_balance_loss(totals: torch.Tensor) -> torch.Tensor:
    """The sequence-wise balance loss summed over the MoE layers (each layer balances its own experts;
    `router_totals`)."""
    return totals[-1]


def router_z_loss(totals: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss, summed over the MoE layers (as Megatron adds it per layer; `router_totals`):
    it keeps the router logits small, where their softmax is well conditioned."""
    return totals[-2]


def moe_layers(model: nn.Module) -> list["MoE"]:
    """The model's MoE layers, in the order `take_router_stats` returns their statistics."""
    return [module for module in model.modules() if isinstance(module, MoE)]


@torch.no_grad()
def update_expert_bias(layers: list["MoE"], counts_LE: torch.Tensor, rate: float) -> None:
    """Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): each layer's bias rises by `rate` for
    the experts that took fewer than the mean of the step's rows (`counts_LE`, one row per layer, counted
    over every data-parallel rank) and falls by `rate` for those that took more."""
    for layer, counts_E in zip(layers, counts_LE):
        layer.router.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)


class MoETransformer(Transformer):
    """The dense decoder with an MoE feed-forward on the layers `MoEArgs.is_moe_layer` names (Mixtral,
    Qwen2-MoE, Qwen3-MoE)."""

    def make_block(self, args: MoEArgs, layer_id: int) -> nn.Module:
        mlp = MoE(args, out_std=residual_std(args)) if args.is_moe_layer(layer_id) else None
        return TransformerBlock(args, layer_id, mlp=mlp)


def stacked_experts_group(ours: str, hf: str, names: tuple[str, str, str], num_experts: int) -> TensorGroup:
    """Our stacked gate/up/down expert weights (`ours`.gate_proj ...) <-> one tensor per expert and
    projection on disk: `hf` formatted with the expert index `e` and the checkpoint's name of gate, up and
    down (`names`), e.g. "model.layers.{i}.mlp.experts.{e}.{name}.weight"."""
    hf_names = tuple(hf.format(i="{i}", e=e, name=name) for name in names for e in range(num_experts))

    def to_hf(stacked):  # clones: safetensors refuses tensors that share storage
        return [w.clone() for weight in stacked for w in weight.unbind(0)]

    def from_hf(tensors):
        return [torch.stack(tensors[k * num_experts:(k + 1) * num_experts]) for k in range(3)]

    return TensorGroup(tuple(f"{ours}.{p}" for p in ("gate_proj", "up_proj", "down_proj")), hf_names, to_hf, from_hf)
