"""Training metrics: metrics.jsonl, TensorBoard, a console progress line with ETA, the loss plot (and for an
MoE model the expert load plot).

MFU follows the PaLM paper (appendix B): a token costs 6 N FLOPs in the matrices (forward and
backward), N the parameters excluding the input embedding, plus 12 L H Q T for attention
(L layers, H heads of size Q, T the sequence length). MFU = tokens/s x that / (peak FLOP/s of
one device x devices). Peak numbers are dense bf16 tensor-core rates; on CPU (no known peak)
MFU is not reported.
"""

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import torch

from meshtron.models.common.args import ModelArgs

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by device-name substring, checked in order.
_PEAK_BF16_FLOPS = (("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
                    ("L40S", 362e12), ("A10", 125e12), ("4090", 165e12))


def flops_per_token(args: ModelArgs, seq_length: int) -> float:
    matrices = args.num_active_params(include_embedding=False)  # an MoE token runs through K experts only
    attention = 12 * args.num_layers * args.num_heads * args.head_dim * seq_length
    return 6 * matrices + attention


class RouterMetrics:
    """A step's MoE router metrics, from the statistics of every forward (`models.common.moe.RouterStats`):
    the load-balancing, router z- and sequence-wise balance losses (means over forwards and data x context
    parallel ranks), the rows routed
    to the busiest and the idlest expert over the mean (summed over layers, forwards and ranks), each
    expert's rows over the mean (`moe_expert_load`, a list: what plot_expert_load draws), rows dropped by
    a capacity. `layer_load` (this rank's MoE layers x experts, its rows of the step) is what
    auxiliary-loss-free balancing updates its biases from.

    Under pipeline parallel a rank sees its stages' layers only, and the losses only where it holds the last
    stage (zero elsewhere): `take`'s sum then runs over the pipeline ranks too."""

    LOSSES = ("moe_aux_loss", "moe_z_loss", "moe_seq_aux_loss")

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.losses, self.forwards, self.layer_load, self.dropped = torch.zeros(len(self.LOSSES)), 0, None, 0.0

    def add(self, losses: tuple[torch.Tensor, ...], stats: list) -> None:
        """One forward's losses (load-balancing, z, sequence-wise balance) and the statistics of this rank's
        MoE layers (none: a stage without any)."""
        self.losses = self.losses.to(losses[0].device) + torch.stack([l.detach().float() for l in losses])
        self.forwards += 1
        if stats:
            load = torch.stack([s.selected_E for s in stats])
            self.layer_load = load if self.layer_load is None else self.layer_load + load
            self.dropped = self.dropped + sum(s.dropped for s in stats)

    def take(self, rank_sum, num_replicas: int, device: torch.device) -> dict[str, float]:
        """The metrics since the last call (none for a dense model), then reset. `rank_sum` sums a tensor over
        the ranks whose statistics add up (data and context parallel, and pipeline stages); the losses are
        means over `num_replicas` (data x context parallel ranks)."""
        if not self.forwards:
            return {}
        zero = torch.zeros(self.num_experts, device=device)
        load = zero if self.layer_load is None else self.layer_load.sum(0)
        packed = torch.cat([self.losses.to(device) / self.forwards,
                            torch.as_tensor(self.dropped, dtype=torch.float32, device=device).reshape(1), load])
        losses, dropped, load = rank_sum(packed).split([len(self.LOSSES), 1, self.num_experts])
        self.__init__(self.num_experts)
        share = load / load.mean()
        return {**{name: value / num_replicas for name, value in zip(self.LOSSES, losses.tolist())},
                "moe_load_max": share.max().item(), "moe_load_min": share.min().item(),
                "moe_dropped": int(dropped.item()), "moe_expert_load": [round(x, 4) for x in share.tolist()]}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in _PEAK_BF16_FLOPS if key in name), None)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated, or on CPU the peak resident set size of this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / 1e6


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled = enabled
        self.total_steps = total_steps
        self.metrics_file = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self._start_time = time.perf_counter()
        self._start_step: int | None = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Remove the records of steps after `step` (a resumed run logs them again: one row per step)."""
        if not self.enabled or not self.metrics_file.is_file():
            return
        lines = self.metrics_file.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            tmp = self.metrics_file.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.metrics_file)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"train/{key}", value, step)
            self.writer.flush()
        print(self._progress_line(step, metrics), file=sys.stderr, flush=True)

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        """Held-out metrics: eval_loss and any recipe metrics (eval_accuracy, eval_rewards/...)."""
        if not self.enabled:
            return
        with self.metrics_file.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"eval/{key.removeprefix('eval_')}", value, step)
            self.writer.flush()
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"step {step}/{self.total_steps} | {shown}", file=sys.stderr, flush=True)

    def _progress_line(self, step: int, m: dict) -> str:
        if self._start_step is None:
            self._start_step, self._start_time = step - 1, time.perf_counter() - m.get("step_time_s", 0.0)
        per_step = (time.perf_counter() - self._start_time) / max(1, step - self._start_step)
        eta = int(per_step * (self.total_steps - step))
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {m['loss']:.4f}",
            f"lr {m['lr']:.2e}",
            f"grad_norm {m['grad_norm']:.3f}",
            f"{m['tokens_per_s']:,.0f} tok/s",
        ]
        if m.get("mfu") is not None:
            parts.append(f"mfu {m['mfu']:.1%}")
        parts += [f"mem {m['mem_gb']:.2f} GB", f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"]
        return " | ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(metrics_file: Path, key: str = "loss") -> list[dict]:
    """Records of metrics.jsonl holding `key` (loss: training steps, eval_loss: evaluations); a step
    logged again after a resume keeps its latest record."""
    by_step: dict[int, dict] = {}
    for line in Path(metrics_file).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if key in record:
                by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_loss(metrics_file: Path, out_png: Path, key: str = "loss", eval_key: str = "eval_loss") -> Path | None:
    """Draw a training metric (the loss unless `key` says otherwise) against step, with a moving average
    and its held-out counterpart `eval_key`, to a PNG; None if there is nothing to draw."""
    records = read_metrics(metrics_file, key=key) if Path(metrics_file).is_file() else []
    if not records:
        return None
    plt = _pyplot()

    steps = [r["step"] for r in records]
    losses = [r[key] for r in records]
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
              for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label=key)
    ax.plot(steps, smooth, label=f"moving average ({window} steps)")
    evals = read_metrics(metrics_file, key=eval_key)
    if evals:
        ax.plot([r["step"] for r in evals], [r[eval_key] for r in evals], "o-", label=f"held-out {key}")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"training {key}: {losses[0]:.3f} -> {smooth[-1]:.3f}")
    if not any(math.isnan(x) for x in losses):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def plot_expert_load(metrics_file: Path, out_png: Path) -> Path | None:
    """Draw an MoE run's expert load against step to a PNG: each expert's rows over the mean (all layers) as
    a heat map, and the busiest and idlest expert's as lines. None for a run without router metrics."""
    records = read_metrics(metrics_file, key="moe_expert_load") if Path(metrics_file).is_file() else []
    if not records:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in records]
    load_ES = torch.tensor([r["moe_expert_load"] for r in records]).T
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    image = top.imshow(load_ES, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, load_ES.shape[0] - 0.5, -0.5))
    fig.colorbar(image, ax=top, label="rows / mean")
    top.set_ylabel("expert")
    top.yaxis.set_major_locator(plt.MaxNLocator(integer=True))  # experts are whole numbers
    top.set_title("expert load (all MoE layers)")
    bottom.plot(steps, [r["moe_load_max"] for r in records], label="busiest expert")
    bottom.plot(steps, [r["moe_load_min"] for r in records], label="idlest expert")
    bottom.axhline(1.0, color="gray", linewidth=0.8)
    bottom.set_xlabel("step")
    bottom.set_ylabel("rows / mean")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
