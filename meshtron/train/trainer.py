"""The one training loop, in three levels: `forward_backward` (one micro-batch) -> `train_step`
(one optimizer step over the accumulated micro-batches) -> `train` (steps, logging,
checkpoints, resume, SIGTERM). Recipes supply how a batch becomes a loss.

Loss normalization (ARCHITECTURE principle 5): each micro-batch's summed loss is divided by the
number of loss tokens of the whole step over all data-parallel ranks, and multiplied by the
data-parallel x context-parallel size because FSDP averages gradients over those ranks (a cp rank
sums the loss of its part of the sequences). The gradients are then those of one big batch on one
device, whatever the accumulation, data-parallel and context-parallel split.
"""

import contextlib
import dataclasses
import logging
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from meshtron.config import JobConfig, to_dict, to_toml
from meshtron.errors import UserError
from meshtron.parallel import ParallelDims
from meshtron.train.build import (build_parallel_model, check_context_length, init_distributed, precision,
                                  resolve_model_source)
from meshtron.train.data import build_data_loader, build_training_dataset, dropped_samples_note, one_pass
from meshtron.train.guard import StepGuard, finite_on_every_rank
from meshtron.train.losses import IGNORE_INDEX, loss_context
from meshtron.train.lr import build_lr_scheduler
from meshtron.models.deepseek_v3.model import take_mtp_loss_sums
from meshtron.models.common.moe import (load_balancing_loss, moe_layers, router_totals, router_z_loss,
                                        sequence_balance_loss, take_router_stats, update_expert_bias)
from meshtron.train.metrics import (MetricsLogger, RouterMetrics, flops_per_token, peak_flops, peak_memory_gb,
                                    plot_expert_load, plot_loss)
from meshtron.train.ops import FaultDrill, HangWatchdog, LastGoodState, StepTimer, StragglerMonitor
from meshtron.train.optim import build_optimizer, clip_grad_norm
from meshtron.train.recipes import build_recipe

log = logging.getLogger(__name__)

# The end-of-run sample reloads the final model whole, in float32, on rank 0's CPU (12 GB at this size).
SAMPLE_MAX_PARAMS = 3_000_000_000
RUN_TOKEN = ".run-token"  # written by rank 0 at start-up; every rank must read it back


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0  # input tokens over all ranks

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step, self.tokens_seen = int(state_dict["step"]), int(state_dict["tokens_seen"])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a (possibly distributed) tensor, as a view to update in place."""
    return t.to_local() if isinstance(t, DTensor) else t


def sample_skip_reason(num_params: int) -> str | None:
    """Why the end-of-run sample is skipped for a model this large (None: it is written)."""
    if num_params <= SAMPLE_MAX_PARAMS:
        return None
    return (f"the model's {num_params / 1e9:.1f}B parameters would be reloaded whole on rank 0's CPU in float32 "
            f"({num_params * 4 / 1e9:.0f} GB); generate from the final checkpoint with "
            "`torchrun --nproc-per-node N -m meshtron generate --model OUTPUT_DIR --prompt ...` instead")


class Trainer:
    def __init__(self, config: JobConfig, config_dir: Path | None = None):
        self.config = config
        self.device = init_distributed(config.train.deterministic)
        self.drill = FaultDrill.from_env(dist.get_rank())
        self._set_numerics()
        p = config.parallel
        self.dims = ParallelDims.resolve(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp,
                                         world_size=dist.get_world_size(), pp=p.pp, cp=p.cp, ep=p.ep,
                                         cp_algo=p.cp_algo, cp_ulysses=p.cp_ulysses)
        self.meshes = self.dims.build_mesh(self.device.type)
        self.grad_accum_steps = self._grad_accum_steps()
        self.run_dir = self.drill.run_dir(Path(config.train.output_dir))
        self.is_main = dist.get_rank() == 0
        self._prepare_run_dir()

        self.source = resolve_model_source(config)
        check_context_length(config, self.source)
        self.model_args = self.source.args
        self.resume_from = self._find_resume_checkpoint()
        self.recipe = build_recipe(config)
        if self.dims.cp > 1:
            from meshtron.parallel.cp import ContextParallel

            self.recipe.context_parallel = ContextParallel.from_meshes(self.meshes)
        self.model_args = self.source.args = self.recipe.model_args(self.source.args)
        self._check_mtp()
        layout = self._pipeline_layout()
        self.data_loader = build_data_loader(
            config, data_kind=self.recipe.data_kind, default_handler=self.recipe.default_handler,
            vocab_size=self.model_args.vocab_size, tokenizer_dir=self.source.tokenizer_dir,
            **self._data_shard(), config_dir=config_dir,
        )
        self.eval_dataset = None
        if config.data.eval_paths:
            self.eval_dataset = build_training_dataset(
                config, config.data.eval_paths, [], data_kind=self.recipe.data_kind,
                default_handler=self.recipe.default_handler, tokenizer_dir=self.source.tokenizer_dir,
                config_dir=config_dir)
            note = dropped_samples_note(len(self.eval_dataset), config.train.micro_batch_size, self.dims.dp_size,
                                        whole_rounds=layout is not None)
            if note and self.is_main:
                log.warning(note)
        # After the data, so that a bad data path fails before a large model is loaded.
        self.grad_scaler = self._build_grad_scaler()
        self.pipeline = None  # the PipelineRunner under pipeline parallel
        self.router_metrics = RouterMetrics(getattr(self.model_args, "num_experts", 0))
        self.model = self._build_model(layout)
        self.recipe.setup(self)
        self.optimizer = build_optimizer(self.model, config.optim, self.device.type)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config.lr, config.optim.lr, config.train.steps)
        self.state = TrainState()
        self.checkpointer = self._build_checkpointer()
        self.ft = self._build_ft()
        self.metrics = MetricsLogger(self.run_dir, enabled=self.is_main, tensorboard=config.log.tensorboard,
                                     total_steps=config.train.steps)
        self.guard = StepGuard(max_skipped_steps=config.train.max_skipped_steps,
                               loss_spike_factor=config.train.loss_spike_factor, report=self.is_main)
        self._stop_signal: int | None = None
        self.stop_agreed = False  # every rank knows that some rank was signalled: stop after this step
        self.timer = StepTimer(self.device)
        self.stragglers = StragglerMonitor(config.log.straggler_fraction)
        self.last_good = LastGoodState(self.optimizer)
        self.mtp_loss_sum = 0.0  # the step's MTP losses (Trainer._mtp_loss)

    # ---- construction helpers ------------------------------------------------------------

    def _set_numerics(self) -> None:
        """The seed, deterministic kernels if asked, and the matmul precision of float32 on CUDA."""
        torch.manual_seed(self.config.train.seed)
        if self.config.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cuda":
            # What stays float32 (the master weights' updates, a float32 run's matmuls) uses TF32
            # tensor cores: full float32 matmuls run at a small fraction of the GPU's rate.
            torch.set_float32_matmul_precision("high")

    def _data_shard(self) -> dict:
        """This rank's share of the data: its data-parallel rank and size, over the replica groups
        of torchft ([ft]) too."""
        dp_rank, dp_size = self.meshes.dp.get_local_rank(), self.dims.dp_size
        ft = self.config.ft
        if ft.enable:
            return {"dp_rank": ft.replica_group * dp_size + dp_rank, "dp_size": ft.num_replica_groups * dp_size}
        return {"dp_rank": dp_rank, "dp_size": dp_size}

    def _build_ft(self):
        if not self.config.ft.enable:
            return None
        from meshtron.train.ft import ReplicaGroupFT

        return ReplicaGroupFT(self.config.ft, self.checkpointer.states, self.device)

    def _prepare_run_dir(self) -> None:
        """Rank 0 creates the run directory and writes a fresh token into it; every rank must read that
        token back. Ranks on several nodes write their checkpoint shards into this one directory, so it
        must be one shared filesystem: a node-local path would leave each node with part of every
        checkpoint."""
        token_file = self.run_dir / RUN_TOKEN
        token = [None]
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.toml").write_text(to_toml(self.config))
            token[0] = uuid.uuid4().hex
            token_file.write_text(token[0])
        dist.broadcast_object_list(token, src=0)
        sees = token_file.is_file() and token_file.read_text() == token[0]
        seen_by = [None] * dist.get_world_size()
        dist.all_gather_object(seen_by, sees)
        blind = [rank for rank, ok in enumerate(seen_by) if not ok]
        if blind:
            raise UserError(
                f"rank(s) {', '.join(map(str, blind))} do not see the run directory rank 0 created "
                f"(train.output_dir = {self.config.train.output_dir}: the file {RUN_TOKEN} rank 0 wrote there is "
                "missing or different on them); with several nodes, put train.output_dir on a filesystem every "
                "node mounts at the same path"
            )

    def _check_mtp(self) -> None:
        """model.mtp_loss_weight needs a model with MTP modules, a recipe that runs them, and no model split."""
        if not self.config.model.mtp_loss_weight:
            return
        if not getattr(self.model_args, "num_mtp_layers", 0):
            raise UserError("model.mtp_loss_weight trains multi-token prediction modules, which this model has none "
                            "of: use a DeepSeek-V3 checkpoint holding its MTP layers (num_nextn_predict_layers), or "
                            "a deepseek_v3 flavor with model.args = {num_mtp_layers = 1}; or set it to 0")
        if not self.recipe.trains_mtp:
            raise UserError(f"model.mtp_loss_weight is for the pretrain and sft recipes, not "
                            f"{self.config.train.recipe}; set it to 0")
        split = [name for name, size in (("pp", self.dims.pp), ("tp", self.dims.tp), ("cp", self.dims.cp)) if size > 1]
        if split:
            raise UserError(f"multi-token prediction does not run with parallel.{', parallel.'.join(split)} > 1 yet: "
                            "train it with data and expert parallel only, or set model.mtp_loss_weight = 0")

    def _grad_accum_steps(self) -> int:
        t = self.config.train
        per_step = t.micro_batch_size * self.dims.dp_size
        if t.global_batch_size % per_step:
            raise UserError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size x "
                f"data-parallel size ({t.micro_batch_size} x {self.dims.dp_size} = {per_step})"
            )
        return t.global_batch_size // per_step

    def _pipeline_layout(self):
        """The checked pipeline layout (None without pipeline parallel)."""
        if not self.dims.pp_enabled:
            return None
        from meshtron.parallel.pipeline import PipelineLayout

        if not self.recipe.supports_pipeline:
            raise UserError(f"the {self.recipe.name} recipe does not run with pipeline parallel yet; set parallel.pp = 1")
        args = self.model_args
        p = self.config.parallel
        layout = PipelineLayout.resolve(pp=p.pp, vpp=p.vpp, schedule=p.pp_schedule, pp_layers=p.pp_layers,
                                        num_layers=args.num_layers, n_microbatches=self.grad_accum_steps)
        if dist.get_rank() == 0:
            log.info(layout.describe())
        return layout

    def _build_model(self, layout) -> nn.Module:
        """The parallelized model; under pipeline parallel, this rank's stages (StageParts), driven by
        the PipelineRunner."""
        # A resume loads every weight from the checkpoint, but LoRA checkpoints hold only the adapters.
        load_weights = self.resume_from is None or self.config.lora.rank > 0
        if layout is None:
            return build_parallel_model(self.config, self.source, self.dims, self.meshes, self.device, load_weights)
        from meshtron.parallel.pipeline import PipelineRunner
        from meshtron.train.build import StageSpec

        last = layout.num_stages - 1
        stage_ids = layout.stages_of_rank(self.meshes.pp.get_local_rank())
        parts = [build_parallel_model(self.config, self.source, self.dims, self.meshes, self.device, load_weights,
                                      stage=StageSpec(layout.stage_layers[i], first=i == 0, last=i == last))
                 for i in stage_ids]
        moe = hasattr(self.model_args, "num_experts")
        self.pipeline = PipelineRunner(layout, parts, stage_ids, self.meshes, self.device, self.recipe,
                                       self.grad_scaler, self.train_context,
                                       router_loss=self.router_loss if moe else None,
                                       router_metrics=self.router_metrics)
        return self.pipeline.model

    @torch.no_grad()
    def _settle_gradients(self) -> None:
        """Lay each distributed gradient out like its parameter.

        Under tensor parallel some gradients come back in another layout than their parameter: a
        sequence-parallel norm's as Partial (per-rank sums still to be added), the vocabulary-parallel
        embedding's as Replicate. Whether the optimizer and the norm then reduce them correctly
        differs between torch releases (torch 2.11 updated each rank's norm weights from its partial
        sum), so the reduction is done here, explicitly, once.
        """
        for param in self.model.parameters():
            grad = param.grad
            if isinstance(grad, DTensor) and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)

    def _find_resume_checkpoint(self) -> Path | None:
        resume = self.config.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto":
            # Rank 0 chooses for all: ranks choosing on their own could pick different checkpoints (a
            # directory listing cached differently on another node).
            from meshtron.checkpoint.manager import latest_loadable

            choice = [(None, None)]  # (checkpoint, error)
            if self.is_main:
                try:
                    choice[0] = (latest_loadable(self.run_dir / "checkpoints"), None)
                except UserError as e:
                    choice[0] = (None, str(e))
            dist.broadcast_object_list(choice, src=0)
            checkpoint, error = choice[0]
            if error is not None:
                raise UserError(error)
            return checkpoint
        from meshtron.checkpoint.manager import resolve_checkpoint

        return resolve_checkpoint(resume)

    def _build_grad_scaler(self):
        compute, master = precision(self.config, self.device.type)
        if compute != torch.float16:
            return None
        # fp16 has a narrow range: scale the loss up dynamically so small gradients do not underflow.
        # The sharded scaler agrees over all ranks on whether a step overflowed: each rank sees only
        # its shards (FSDP) or its stages (pipeline).
        if self.dims.fsdp_enabled or self.dims.pp_enabled:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return torch.amp.GradScaler(self.device.type)

    def _build_checkpointer(self):
        from meshtron.checkpoint.manager import CheckpointManager, ModelState, OptimizerState

        states = {
            "model": ModelState(self.model, part="adapters" if self.config.lora.rank else "all"),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.lr_scheduler,
            "dataloader": self.data_loader,
            "train_state": self.state,
        }
        states.update(self.recipe.checkpoint_states())
        if self.grad_scaler is not None:
            states["grad_scaler"] = self.grad_scaler
        manifest = {
            "model_args": self.model_args.to_dict(),
            "recipe": self.config.train.recipe,
            "dtype": self.config.model.master_dtype,
            "world_size": self.dims.world_size,
            "parallel": {"dp_replicate": self.dims.dp_replicate, "dp_shard": self.dims.dp_shard, "tp": self.dims.tp,
                         "pp": self.dims.pp, "cp": self.dims.cp},
            "hf_config_extra": self.source.hf_config_extra,
            "config": to_dict(self.config),
        }
        if self.config.lora.rank:
            # Adapter-only checkpoints: the manifest names the base they apply to.
            manifest["lora"] = to_dict(self.config)["lora"]
            manifest["base_model"] = {"kind": self.source.kind, "path": str(Path(self.source.path).resolve())}
        return CheckpointManager(self.run_dir, states, keep=self.config.checkpoint.keep,
                                 async_save=self.config.checkpoint.async_, manifest=manifest,
                                 tokenizer_dir=self.source.tokenizer_dir)

    # ---- the three levels ----------------------------------------------------------------

    def train_context(self):
        """Vocabulary-parallel loss under TP; autocast when computing below the master dtype without FSDP
        (FSDP's mixed-precision policy casts the parameters itself)."""
        stack = contextlib.ExitStack()
        stack.enter_context(loss_context(self.dims.tp_enabled))
        compute, master = precision(self.config, self.device.type)
        if compute != master and not self.dims.fsdp_enabled:
            stack.enter_context(torch.autocast(self.device.type, dtype=compute))
        return stack

    def forward_backward(self, batch: dict, loss_scale: float) -> torch.Tensor:
        """Forward and backward one prepared micro-batch (`recipe.prepare_batch`); returns its (unscaled)
        summed loss."""
        with self.train_context():
            with torch.profiler.record_function("forward"):
                loss_sum = self.recipe.loss_sum(self.model, batch)
                loss = loss_sum * loss_scale
                loss = loss + self._mtp_loss(loss_scale)
                router_loss = self._router_loss()
                if router_loss is not None:  # a plain tensor: the loss joins it as one (a DTensor under tp)
                    loss = _local(loss) + router_loss
                if self.grad_scaler is not None:
                    loss = self.grad_scaler.scale(loss)
            with torch.profiler.record_function("backward"):
                loss.backward()
        return _local(loss_sum.detach())

    def _router_loss(self) -> torch.Tensor | None:
        """The router loss of the forward just run (`router_loss`), its statistics kept for the metrics.
        None for a dense model."""
        stats = take_router_stats(self.model)
        if not stats:
            return None
        loss, losses = self.router_loss(router_totals(stats, self.model_args.num_experts))
        self.router_metrics.add(losses, stats)
        return loss

    def router_loss(self, totals: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(loss, (load-balancing loss, router z-loss, sequence-wise balance loss)) of one forward's router
        totals over all MoE layers (`router_totals`; under pipeline parallel, summed over the stages). The
        loss weighs each by its coefficient (`aux_loss_coef`, `z_loss_coef`, `seq_aux_loss_coef`), divided
        by the number of micro-batches: as transformers adds the first to each forward's mean loss, its
        gradient is the mean over the step's forwards (data-parallel ranks average gradients)."""
        args = self.model_args
        aux, z_loss = load_balancing_loss(totals, args.num_experts), router_z_loss(totals)
        seq_aux = sequence_balance_loss(totals)
        loss = args.aux_loss_coef * aux + args.z_loss_coef * z_loss + args.seq_aux_loss_coef * seq_aux
        return loss / self.grad_accum_steps, (aux, z_loss, seq_aux)

    def _mtp_loss(self, loss_scale: float) -> torch.Tensor | float:
        """The MTP loss of the forward just run (the mean over depths of each depth's summed cross-entropy),
        scaled as the main loss and weighted by model.mtp_loss_weight; its sum is kept for the mtp_loss metric."""
        sums = take_mtp_loss_sums(self.model)
        if sums is None:
            return 0.0
        mtp = torch.stack(sums).mean()
        self.mtp_loss_sum = self.mtp_loss_sum + mtp.detach().float()
        return self.config.model.mtp_loss_weight * mtp * loss_scale

    def _update_expert_bias(self) -> None:
        """Auxiliary-loss-free balancing: each router's bias moves towards balance by the step's expert
        counts, summed over the ranks that hold the same layers and see other tokens (data and context
        parallel), so that each of them applies the same update."""
        rate = getattr(self.model_args, "bias_update_rate", 0.0)
        if rate and self.router_metrics.layer_load is not None:
            update_expert_bias(moe_layers(self.model), self._loss_sum(self.router_metrics.layer_load), rate)

    def forward_backward_micro_batches(self, batches: list[dict[str, torch.Tensor]], loss_scale: float) -> torch.Tensor:
        """The plain micro-batch loop (the PipelineRunner has the same call); returns the summed loss."""
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            if self.dims.dp_replicate > 1:
                # Gradients are reduce-scattered after every micro-batch, so that a rank holds only its
                # shard of them between micro-batches (not the whole model's unsharded gradients, which
                # FSDP keeps while sync is off); under HSDP only the all-reduce across replicas waits
                # for the last micro-batch.
                self.model.set_requires_all_reduce(i == len(batches) - 1)
            loss_sum += self.forward_backward(self.recipe.prepare_batch(batch), loss_scale).float()
        return loss_sum

    def finish_gradients(self) -> None:
        """Nothing left to do after the plain loop (the pipeline sums a split tied head's gradients here)."""

    def train_step(self) -> dict | None:
        """One optimizer step over `grad_accum_steps` micro-batches; returns its metrics (None when torchft
        dropped the step).

        The host waits for the device once per step: the check that decides whether the optimizer steps
        (every rank must agree), which reads the step's metrics with it. The token count scales the loss
        as a tensor, and the recipe's metric sums cross the data-parallel ranks in one collective, so
        nothing before the optimizer step stalls the host while it could queue work."""
        batches = self.recipe.next_batches(self)
        units = torch.stack([self.recipe.num_loss_units(b) for b in batches]).sum().to(torch.float32)
        self.timer.phase("forward_backward")
        units = self._dp_sum(units).clamp(min=1.0)
        runner = self.pipeline or self
        loss_sum = runner.forward_backward_micro_batches(batches, self.dims.loss_ranks / units)
        self.timer.phase("optimizer")
        if self.ft is not None and not self.ft.average_gradients(self.model.parameters()):
            self.optimizer.zero_grad(set_to_none=True)
            return None  # a peer replica group failed during the step: it is dropped
        self._settle_gradients()
        runner.finish_gradients()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        pp_group, copies = (self.pipeline.pp_group, self.pipeline.head_copies) if self.pipeline else (None, [])
        grad_norm = clip_grad_norm(list(self.model.parameters()), self.config.optim.grad_clip, pp_group, copies)
        lr = self.optimizer.param_groups[0]["lr"]
        loss = self._loss_sum(loss_sum) / units
        recipe_metrics = self._recipe_metric_tensors(units)
        if self.config.model.mtp_loss_weight:  # per loss token, like the loss
            recipe_metrics["mtp_loss"] = self._loss_sum(torch.as_tensor(self.mtp_loss_sum, device=units.device)) / units
            self.mtp_loss_sum = 0.0
        read = [_local(loss), _local(grad_norm), units, *recipe_metrics.values()]
        applied, values = self._apply_step(loss, grad_norm, read)
        if applied:
            self._update_expert_bias()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        loss_value, grad_norm_value, units_value, *recipe_values = values
        metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, "loss_tokens": int(units_value)}
        metrics.update(zip(recipe_metrics, recipe_values))
        metrics.update(self.recipe.step_metrics())
        metrics.update(self.router_metrics.take(self._router_metric_sum, self.dims.loss_ranks, self.device))
        metrics.update(self.guard.observe(self.state.step + 1, metrics["loss"], metrics["grad_norm"], applied))
        return metrics

    def _apply_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, read: list[torch.Tensor]) -> tuple[bool, list]:
        """Step the optimizer (and grad scaler) unless the loss or the gradient norm is not finite on some
        rank; then no rank changes its parameters, optimizer state or scaler. Returns whether it stepped,
        and the values of the scalar tensors `read`, fetched in the same transfer as the check's answer.
        The same collective tells every rank whether any was signalled to stop (`stop_agreed`), so that
        they all stop after this step without a collective of their own.

        Under fp16 an infinite gradient with a finite loss is an overflow of the loss scale: the scaler
        skips that step itself and lowers the scale, as it should, so only the loss is checked.
        """
        finite, stop, values = finite_on_every_rank([loss] if self.grad_scaler is not None else [loss, grad_norm],
                                                    read, stop=self._stop_signal is not None)
        if stop:
            self.stop_agreed = True
            if self._stop_signal is None:
                self._stop_signal = -1  # another rank was signalled
        if not finite:
            if self.grad_scaler is not None:
                # unscale_ has run: forget this step's record without touching the scale or its growth count.
                self.grad_scaler.update(new_scale=self.grad_scaler.get_scale())
            return False, values
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        return True, values

    def _recipe_metric_tensors(self, units: torch.Tensor, prefix: str = "") -> dict[str, torch.Tensor]:
        """The recipe's summed metrics, summed over data-parallel ranks in one collective and divided by the
        global units (still on the device)."""
        sums = self.recipe.take_metrics()
        if not sums:
            return {}
        reduced = self._loss_sum(torch.stack([_local(v).float().reshape(()) for v in sums.values()])) / units
        return {f"{prefix}{name}": value for name, value in zip(sums, reduced.unbind())}

    def build_frozen_copy(self) -> nn.Module:
        """A frozen copy of the starting model at the same layout, without adapters (the DPO reference)."""
        config = dataclasses.replace(self.config, lora=dataclasses.replace(self.config.lora, rank=0))
        model = build_parallel_model(config, self.source, self.dims, self.meshes, self.device, load_weights=True)
        model.requires_grad_(False)
        return model.eval()

    def train(self) -> None:
        cfg = self.config
        if self.resume_from is not None:
            self._resume()
        self.data_iter = iter(self.data_loader)
        saved_step = self.state.step if self.resume_from is not None else None
        if self.eval_dataset is not None and self.state.step == 0:
            if self.pipeline is not None:
                self.pipeline.prime(cfg.train.micro_batch_size, cfg.train.seq_length, IGNORE_INDEX)
                self.optimizer.zero_grad(set_to_none=True)
            self.metrics.log_eval(0, self.evaluate())
        profiler = self._build_profiler()
        watchdog = self._start_watchdog()
        with self._stop_on_signals():
            while self.state.step < cfg.train.steps:
                if self.ft is not None:
                    self.ft.step_begins()  # may heal this replica group: the step count too
                step = self.state.step + 1
                profiler.step_begins(step)
                metrics = self._guarded_train_step(step, saved_step)
                if metrics is None:
                    self.timer.end()
                    log.warning("step %d dropped: a replica group failed during it; repeating it", step)
                    continue
                self.state.step = step
                self.state.tokens_seen += cfg.train.global_batch_size * cfg.train.seq_length
                if self.guard.diverged:
                    self._stop_diverged(step, metrics)
                if self.eval_dataset is not None and (
                        step == cfg.train.steps or (cfg.train.eval_interval and step % cfg.train.eval_interval == 0)):
                    self.timer.phase("eval")
                    self.metrics.log_eval(step, self.evaluate())
                stop = self.stop_agreed
                if stop:
                    log.warning("stopping at step %d on signal %s; saving a checkpoint", step, self._stop_signal)
                if stop or (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0):
                    self.timer.phase("checkpoint")
                    self._save_checkpoint(step, metrics)
                    saved_step = step
                self.timer.end()
                self._log_step(step, metrics)
                profiler.step_ends(step)
                if watchdog is not None:
                    watchdog.beat()
                if stop:
                    break
        if watchdog is not None:
            watchdog.stop()
        if self.ft is not None:
            self.ft.shutdown()
        if self.state.step >= cfg.train.steps and cfg.checkpoint.save_final and saved_step != self.state.step:
            self._save_checkpoint(self.state.step)
        self.checkpointer.wait()
        self.metrics.close()
        if self.is_main and self._stop_signal is None:
            self._finish_run()
        dist.barrier()

    def _save_checkpoint(self, step: int, metrics: dict | None = None) -> None:
        """Save, unless some rank's parameters hold inf or NaN (a step with a finite loss and gradient norm
        can still overflow them, e.g. at a huge lr): a checkpoint is never written from a non-finite state.
        Only trained parameters can have become non-finite (QLoRA's frozen NF4 base has no isfinite)."""
        if not finite_on_every_rank(_shard(p.detach()) for p in self.model.parameters() if p.requires_grad):
            self._stop_diverged(step, metrics, reason="the parameters hold inf or NaN")
        self.checkpointer.save(step)

    def _stop_diverged(self, step: int, metrics: dict | None = None, reason: str = "") -> None:
        """End a run that cannot go on: too many non-finite steps in a row, or non-finite parameters. The
        step's record (`metrics`, when the loop has it) is logged first."""
        from meshtron.checkpoint.manager import list_checkpoints

        if metrics is not None:
            self.timer.end()
            self._log_step(step, metrics)

        self.checkpointer.wait()  # a save in flight is a good one: let it commit, so it can be named
        self.metrics.close()
        good = list_checkpoints(self.run_dir / "checkpoints")
        reason = reason or (f"{self.guard.consecutive_skips} steps in a row had a non-finite loss or gradient norm "
                            f"(last: loss {metrics['loss']}, grad_norm {metrics['grad_norm']})")
        raise UserError(
            f"training stopped at step {step}: {reason}. Last good checkpoint: "
            f"{good[-1] if good else 'none (no checkpoint was saved)'}; resume from it with a lower optim.lr (or "
            "check the data), or raise train.max_skipped_steps to tolerate more skipped steps in a row"
        )

    def _logs(self, step: int) -> bool:
        """Whether a step is logged: every log.interval steps, the last, and every skipped step."""
        return (step % self.config.log.interval == 0 or step == self.config.train.steps
                or bool(self.guard.consecutive_skips))

    def _guarded_train_step(self, step: int, saved_step: int | None) -> dict:
        """train_step, timed phase by phase; if it fails before the optimizer step, the last completed
        step is saved first (when every rank failed and it is not saved already)."""
        self.timer.begin(timed=self._logs(step))
        self.last_good.step_begins()
        try:
            self.drill.before_step(step)
            metrics = self.train_step()
        except Exception:
            self.timer.end()
            self.last_good.save_if_useful(self.checkpointer, self.state.step, saved_step)
            raise
        return metrics  # the optimizer phase runs on to the end of the step (the stop check)

    def _log_step(self, step: int, metrics: dict) -> None:
        """Add throughput, MFU, memory and the step-time breakdown to a step's metrics and log them (every
        log.interval steps). Throughput counts the training phases only (not evaluation or saving)."""
        cfg = self.config
        if not self._logs(step):
            return
        times = self.timer.times
        step_time = self.timer.elapsed()
        tokens_per_s = cfg.train.global_batch_size * cfg.train.seq_length / (
            times["data"] + times["forward_backward"] + times["optimizer"])
        peak = peak_flops(self.device)
        flops = flops_per_token(self.model_args, cfg.train.seq_length)
        metrics.update(
            tokens_per_s=tokens_per_s,
            mfu=tokens_per_s * flops / (peak * self.dims.world_size) if peak else None,
            mem_gb=peak_memory_gb(self.device),
            step_time_s=step_time,
            **{f"time_{phase}_s": seconds for phase, seconds in times.items()},
            **self.stragglers.gather(step_time, times["data"]),
            tokens_seen=self.state.tokens_seen,
        )
        self.metrics.log(step, metrics)

    def _build_profiler(self):
        from meshtron.train.profiling import StepProfiler

        return StepProfiler(self.config.profile, self.run_dir, dist.get_rank(), self.device,
                            first_step=self.state.step + 1, final_step=self.config.train.steps)

    def _start_watchdog(self) -> HangWatchdog | None:
        if not self.config.train.hang_timeout_s:
            return None
        watchdog = HangWatchdog(self.config.train.hang_timeout_s, self.run_dir, dist.get_rank())
        watchdog.start()
        return watchdog

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The loss (and recipe metrics, e.g. reward accuracy) over one pass of the held-out data,
        normalized like the training loss."""
        own = self.recipe.evaluate(self)
        if own is not None:
            return own
        self.recipe.take_metrics()  # drop anything a training step left
        loss_sum = torch.zeros((), device=self.device)
        units = torch.zeros((), device=self.device)
        batches = one_pass(self.eval_dataset, self.config.train.micro_batch_size, self.meshes.dp.get_local_rank(),
                           self.dims.dp_size, whole_rounds=self.pipeline is not None)
        if self.pipeline is not None:
            loss_sum, units = self.pipeline.evaluate(list(batches), IGNORE_INDEX)
            units = self._dp_sum(units)
            return {"eval_loss": (self._dp_sum(loss_sum) / units.clamp(min=1)).item()}
        for batch in batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            units += self.recipe.num_loss_units(batch)  # of the whole sequences (before a cp split)
            with self.train_context():
                loss_sum += _local(self.recipe.loss_sum(self.model, self.recipe.prepare_batch(batch))).float()
        units = self._dp_sum(units)
        units = units.clamp(min=1)
        metrics = {"eval_loss": self._loss_sum(loss_sum) / units, **self._recipe_metric_tensors(units, prefix="eval_")}
        return dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))

    # ---- helpers of the loop ---------------------------------------------------------------

    def _resume(self) -> None:
        from meshtron.checkpoint.manager import check_resume_matches, read_manifest

        check_resume_matches(self.resume_from, self.checkpointer.manifest)
        saved_optimizer = read_manifest(self.resume_from).get("config", {}).get("optim", {}).get("name")
        if saved_optimizer not in (None, self.config.optim.name):
            raise UserError(
                f"{self.resume_from} was trained with optim.name = {saved_optimizer}, this run uses "
                f"{self.config.optim.name}; resume with the same optimizer, or start a new run from its weights "
                f"(model.name_or_path = \"{self.resume_from}\", checkpoint.resume = \"none\")"
            )
        if self.config.checkpoint.verify:
            from meshtron.checkpoint.integrity import verify_before_resume

            verify_before_resume(self.resume_from)
        log.info("resuming from %s", self.resume_from)
        self.checkpointer.load(self.resume_from)
        self.metrics.drop_after(self.state.step)
        # The optimizer state carries the lr of the saved run's schedule; re-derive it from this
        # run's config, so that a resumed run may extend train.steps or change optim.lr.
        self.lr_scheduler.base_lrs = [self.config.optim.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, self.lr_scheduler.lr_lambdas):
            group["lr"] = self.config.optim.lr * factor(self.lr_scheduler.last_epoch)

    def _dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Summed over the data-parallel ranks (what each cp rank of a group has alike: the sequences)."""
        if self.dims.dp_size > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.meshes.dp.get_group())
        return t

    def _router_metric_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks whose router statistics add up: data and context parallel, and the pipeline
        stages (each holds other layers)."""
        t = self._loss_sum(t)
        if self.pipeline is not None:
            t = t.clone()
            dist.all_reduce(t, group=self.pipeline.pp_group)
        return t

    def _loss_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Summed over data-parallel x context-parallel ranks (what each rank has of its own: losses)."""
        if self.dims.loss_ranks > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.meshes.loss.get_group())
        return t

    @contextlib.contextmanager
    def _stop_on_signals(self):
        """On SIGTERM/SIGINT, finish the current step, save and stop (preemption)."""

        def handler(signum, frame):
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _finish_run(self) -> None:
        """Rank 0: the loss plot (and an MoE model's expert load plot) and the sample text."""
        if self.config.log.plot:
            for key, eval_key in (("loss", "eval_loss"), *self.recipe.plots):
                png = plot_loss(self.run_dir / "metrics.jsonl", self.run_dir / f"{key}.png", key, eval_key)
                if png is not None:
                    log.info("%s curve: %s", key, png)
            png = plot_expert_load(self.run_dir / "metrics.jsonl", self.run_dir / "expert_load.png")
            if png is not None:
                log.info("expert load: %s", png)
        if self.config.train.sample_prompt:
            skip = sample_skip_reason(self.model_args.num_params())
            if skip:
                log.warning("no sample: %s", skip)
            else:
                self._write_sample()

    def _write_sample(self) -> None:
        from meshtron.checkpoint.manager import list_checkpoints

        if not list_checkpoints(self.run_dir / "checkpoints") or self.source.tokenizer_dir is None:
            log.warning("no sample: it needs a final checkpoint (checkpoint.save_final) and a tokenizer (model.tokenizer)")
            return
        from meshtron.infer.generation import SamplingParams, generate
        from meshtron.infer.loading import load_for_generation

        loaded = load_for_generation(str(self.run_dir), dtype="float32", device=torch.device("cpu"))
        prompt = self.config.train.sample_prompt
        prompt_ids = loaded.tokenizer(prompt)["input_ids"]
        t = self.config.train
        params = SamplingParams(max_new_tokens=t.sample_max_new_tokens, temperature=t.sample_temperature,
                                top_k=t.sample_top_k, seed=t.seed, stop_token_ids=loaded.stop_token_ids)
        new_ids = generate(loaded.model, [prompt_ids], params)[0]
        text = prompt + loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
        (self.run_dir / "sample.txt").write_text(text + "\n")
        print(f"sample: {text}", flush=True)
