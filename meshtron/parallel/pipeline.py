"""Pipeline parallel: the layers cut into stages, each run by one rank of the pp axis, driven by
a schedule of torch.distributed.pipelining.

A stage is the ordinary `Transformer` with the layers it does not run deleted: the first stage
keeps the embedding, the last the final norm and output head. Layers keep their global index as
their name (`layers.7`), so a stage's state-dict names are the full model's, and a checkpoint
saved at one pipeline layout loads at any other (DCP matches tensors by name).

Stages go to ranks in one of two ways:
- loop (gpipe, 1f1b, interleaved_1f1b): rank r runs stages r, r + pp, r + 2 pp, ... (vpp of them);
- V (zbv): rank r runs stages r and 2 pp - 1 - r, so the first and last stage share a rank.

`PipelineLayout.resolve` checks a layout once and says what to change when it cannot run.
`PipelineRunner` holds everything that exists only under pipeline parallel (the schedule, the
tied head's gradient sync, priming, the grad-scaler hand-off, an MoE model's router totals
carried between stages); the Trainer calls it where it would run its plain micro-batch loop.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from meshtron.errors import UserError
from meshtron.models.common.moe import router_totals, take_router_stats

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
_TORCH_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved_1f1b": "Interleaved1F1B", "zbv": "ZBVZeroBubble"}


@dataclass(frozen=True)
class PipelineLayout:
    pp: int
    schedule: str
    stages_per_rank: int
    stage_layers: tuple[tuple[int, ...], ...]  # global layer indices of each stage, in pipeline order
    n_microbatches: int

    @property
    def num_stages(self) -> int:
        return self.pp * self.stages_per_rank

    @classmethod
    def resolve(cls, *, pp: int, vpp: int, schedule: str, pp_layers: list[int], num_layers: int,
                n_microbatches: int) -> "PipelineLayout":
        if vpp < 1:
            raise UserError(f"parallel.vpp must be >= 1, got {vpp}")
        schedule = schedule or ("interleaved_1f1b" if vpp > 1 else "1f1b")
        if schedule in ("gpipe", "1f1b") and vpp > 1:
            raise UserError(f"parallel.pp_schedule = {schedule} runs one stage per rank, but vpp = {vpp}; set vpp = 1, "
                            "or pp_schedule = interleaved_1f1b for virtual stages")
        if schedule == "interleaved_1f1b" and vpp < 2:
            raise UserError("parallel.pp_schedule = interleaved_1f1b interleaves several stages per rank; set vpp >= 2 "
                            "(or pp_schedule = 1f1b)")
        if schedule == "zbv" and vpp not in (1, 2):
            raise UserError(f"parallel.pp_schedule = zbv runs exactly two stages per rank (a V); set vpp = 2 (or 1), "
                            f"not {vpp}")
        per_rank = 2 if schedule == "zbv" else vpp
        num_stages = pp * per_rank
        what = f"pp x vpp = {pp} x {per_rank}" if per_rank > 1 else f"pp = {pp}"
        if pp_layers:
            if len(pp_layers) != num_stages:
                raise UserError(f"parallel.pp_layers has {len(pp_layers)} entries for {num_stages} pipeline stages "
                                f"({what}); give one layer count per stage")
            if min(pp_layers) < 1:
                raise UserError(f"parallel.pp_layers = {pp_layers}: every stage needs at least one layer")
            if sum(pp_layers) != num_layers:
                raise UserError(f"parallel.pp_layers = {pp_layers} sums to {sum(pp_layers)}, but the model has "
                                f"{num_layers} layers; make the counts add up to {num_layers}")
            counts = list(pp_layers)
        else:
            if num_layers < num_stages:
                raise UserError(f"the model has {num_layers} layers, fewer than the {num_stages} pipeline stages "
                                f"({what}); lower pp or vpp so that every stage gets a layer")
            base, extra = divmod(num_layers, num_stages)
            counts = [base + (i < extra) for i in range(num_stages)]
        _check_microbatches(schedule, pp, num_stages, n_microbatches)
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + c)
        stage_layers = tuple(tuple(range(bounds[i], bounds[i + 1])) for i in range(num_stages))
        return cls(pp=pp, schedule=schedule, stages_per_rank=per_rank, stage_layers=stage_layers,
                   n_microbatches=n_microbatches)

    def stages_of_rank(self, pp_rank: int) -> list[int]:
        """The stage indices a pp rank runs, in the order the schedule expects them."""
        if self.schedule == "zbv":
            return [pp_rank, self.num_stages - 1 - pp_rank]
        return [pp_rank + v * self.pp for v in range(self.stages_per_rank)]

    def describe(self) -> str:
        sizes = ", ".join(str(len(layers)) for layers in self.stage_layers)
        return (f"pipeline: {self.schedule}, {self.num_stages} stages on {self.pp} ranks, layers per stage [{sizes}], "
                f"{self.n_microbatches} micro-batches per step")


def _check_microbatches(schedule: str, pp: int, num_stages: int, n: int) -> None:
    """Each schedule needs enough micro-batches to fill the pipeline (torch's schedules refuse fewer)."""
    need, multiple = {"gpipe": (1, 1), "1f1b": (pp, 1), "interleaved_1f1b": (pp, pp), "zbv": (num_stages, 1)}[schedule]
    if n < need or n % multiple:
        rule = f"at least {need}" + (f" and a multiple of pp = {pp}" if multiple > 1 else "")
        raise UserError(
            f"pp_schedule = {schedule} with pp = {pp} needs {rule} micro-batches per step, but global_batch_size / "
            f"(micro_batch_size x data-parallel size) gives {n}; raise train.global_batch_size or lower "
            "train.micro_batch_size")


class StageParts(nn.ModuleList):
    """The pipeline stages one rank runs (one, or several with virtual stages), as one module for the
    optimizer, gradient clipping and checkpoints. Not called itself: the schedule runs each stage."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("pipeline stages run through their schedule, not as one module")


def holds_split_head(part: nn.Module) -> bool:
    """Whether this stage holds the output head of a tied-embedding model without the embedding.

    Such a head is its own parameter, equal to the first stage's embedding: initialized and loaded
    from the same values, its gradient summed with the embedding's every step (Megatron-LM's
    treatment of shared embeddings), and checkpointed under the embedding's optimizer state.
    """
    return part.args.head_is_tied and part.embed is None and part.lm_head is not None


def prune_to_stage(model: nn.Module, layers: tuple[int, ...], *, first: bool, last: bool) -> nn.Module:
    """Delete from a (meta) Transformer what this stage does not run, in place."""
    keep = {str(i) for i in layers}
    for name in [n for n in model.layers if n not in keep]:
        del model.layers[name]
    if not first:
        model.embed = None
    if not last:
        model.norm = None
        model.lm_head = None
    return model


def add_boundary_hooks(stage: nn.Module, tp_mesh, sequence_parallel: bool, *, first: bool, last: bool) -> None:
    """With sequence parallel the residual stream inside a stage is a DTensor sharded on the sequence;
    between stages it travels as the local shard (pipelining sends plain tensors) and is re-wrapped."""
    if not sequence_parallel:
        return
    placements = (Shard(1),)
    if not first:
        def wrap_input(module, args, kwargs):
            h = args[0]
            if not isinstance(h, DTensor):
                h = DTensor.from_local(h, tp_mesh, placements, run_check=False)
            return (h, *args[1:]), kwargs

        stage.register_forward_pre_hook(wrap_input, with_kwargs=True)
    if not last:
        def unwrap_output(module, args, output):
            return output.to_local() if isinstance(output, DTensor) else output

        stage.register_forward_hook(unwrap_output)


def add_router_carry(stage: nn.Module, num_experts: int, record: list, *, first: bool) -> None:
    """An MoE model's router losses are computed over all its layers together (`Trainer.router_loss`), and
    the layers are split between stages: each stage passes on, beside its hidden states, the running sum of
    its and the earlier stages' router totals (`models.common.moe.router_totals`). The last stage's loss
    function computes the losses from the sum, and their gradients reach every stage's routers the way the
    activations' do. `record` gets the router statistics of each forward with gradients (metrics and
    auxiliary-loss-free balancing)."""
    incoming = []  # the earlier stages' totals, from the pre-hook to the hook of the same forward

    def split_input(module, args, kwargs):
        incoming.append(args[1])
        return (args[0], *args[2:]), kwargs

    def add_totals(module, args, output):
        stats = take_router_stats(module)
        if torch.is_grad_enabled():
            record.append(stats)
        totals = router_totals(stats, num_experts, output.device)
        return output, totals + incoming.pop() if incoming else totals

    if not first:
        # Ahead of FSDP's hook, which would cast the totals to the compute dtype with the hidden states.
        stage.register_forward_pre_hook(split_input, with_kwargs=True, prepend=True)
    stage.register_forward_hook(add_totals)


def build_schedule(layout: PipelineLayout, stage_modules: list[nn.Module], stage_ids: list[int], pp_group,
                   device: torch.device, loss_fn):
    """PipelineStages for this rank's modules and the schedule that drives them.

    The loss function returns each micro-batch's loss already normalized for the whole step (see
    the Trainer), so the schedule must not divide the gradients by the micro-batch count.
    """
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

    if layout.schedule == "zbv" and device.type == "cpu" and not zbv_runs_on_gloo():
        raise UserError(f"pp_schedule = zbv on CPU (gloo) needs torch >= 2.13 (this is {torch.__version__}): older "
                        "releases send between a rank's own two stages, which gloo cannot do; use another "
                        "pp_schedule here (zbv runs on GPUs with NCCL)")

    stages = [PipelineStage(module, stage_id, layout.num_stages, device, group=pp_group)
              for module, stage_id in zip(stage_modules, stage_ids)]
    cls = get_schedule_class(_TORCH_SCHEDULES[layout.schedule])
    if issubclass(cls, PipelineScheduleSingle):
        return cls(stages[0], n_microbatches=layout.n_microbatches, loss_fn=loss_fn, scale_grads=False), stages
    return cls(stages, n_microbatches=layout.n_microbatches, loss_fn=loss_fn, scale_grads=False), stages


def zbv_runs_on_gloo() -> bool:
    """torch 2.11 sets up a V schedule with point-to-point messages between a rank's own two stages,
    which gloo refuses; torch 2.13 hands them over in process."""
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 13)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class PipelineRunner:
    """This rank's stages and the schedule that drives them, behind the calls of the plain loop.

    `forward_backward_micro_batches(batches, loss_scale)` runs one step's micro-batches and returns
    their summed, unscaled loss on every rank; `finish_gradients()` sums the tied embedding's
    gradient with its head copy's; `evaluate(batches)` runs held-out batches in whole schedule
    rounds; `prime()` sets the schedule up for training before a first evaluation. The recipe gives the stage inputs and
    the last stage's loss (`pipeline_inputs`, `pipeline_loss`).

    For an MoE model, `router_loss` (the Trainer's) turns the router totals the stages carry
    (`add_router_carry`) into the loss added on the last stage, and each training step's router losses and
    per-layer statistics go to `router_metrics`. The schedule runs every stage once more on its first
    step to learn the shapes passed between stages: a step's own forwards are the last n_microbatches.
    """

    def __init__(self, layout: PipelineLayout, parts: list[nn.Module], stage_ids: list[int], meshes,
                 device: torch.device, recipe, grad_scaler, train_context: Callable,
                 router_loss: Callable | None = None, router_metrics=None):
        self.layout, self.recipe, self.grad_scaler = layout, recipe, grad_scaler
        self.device, self.train_context = device, train_context
        self.router_loss, self.router_metrics = router_loss, router_metrics
        self._router_records = [[] for _ in parts]  # per stage of this rank: each forward's router statistics
        self._router_losses = []  # per last-stage forward: (added loss, (its terms)), detached
        if router_loss is not None:
            for part, stage_id, record in zip(parts, stage_ids, self._router_records):
                add_router_carry(part, part.args.num_experts, record, first=stage_id == 0)
        self.pp_group = meshes.pp.get_group()
        self.model = StageParts(parts)
        last = layout.num_stages - 1
        self.has_first_stage, self.has_last_stage = 0 in stage_ids, last in stage_ids
        # The last stage's copy of a tied embedding (clipped, but counted once in the norm).
        self.head_copies = [part.lm_head.weight for part in parts if holds_split_head(part)]
        self.tied_group = _tied_embedding_group(meshes.world.mesh, layout) if parts[0].args.head_is_tied else None
        self.schedule, _ = build_schedule(layout, parts, stage_ids, self.pp_group, device, self._loss)
        # Not keeping the last stage's logits saves their memory (the option is newer than torch 2.11).
        takes = inspect.signature(self.schedule.step).parameters
        self._step_options = {"return_outputs": False} if "return_outputs" in takes else {}
        self._loss_scale = 1.0

    def forward_backward_micro_batches(self, batches: list[dict[str, torch.Tensor]], loss_scale: float) -> torch.Tensor:
        loss_sum = self._run(batches, loss_scale, train=True)
        if self.router_loss is not None:
            self._take_router_metrics()
        return loss_sum

    def _take_router_metrics(self) -> None:
        """Each micro-batch's router losses (where this rank holds the last stage) and its stages' layer
        statistics, in the model's layer order, to `router_metrics`."""
        n = self.layout.n_microbatches
        records = [record[-n:] for record in self._router_records]
        losses = self._router_losses[-n:]
        zeros = (torch.zeros((), device=self.device),) * len(self.router_metrics.LOSSES)
        for i in range(n):
            terms = losses[i][1] if losses else zeros
            self.router_metrics.add(terms, [stats for record in records for stats in record[i]])
        self._forget_router_records()

    def _forget_router_records(self) -> None:
        for record in self._router_records:
            record.clear()
        self._router_losses.clear()

    def _run(self, batches: list[dict[str, torch.Tensor]], loss_scale: float, train: bool) -> torch.Tensor:
        """The micro-batches are concatenated and prepared as one batch (`recipe.prepare_batch`); the
        schedule cuts it, its mask description included, back into the same micro-batches. The first
        stage gets the token ids, every stage the positions and its micro-batch's mask, the last stage
        the labels."""
        batch = self.recipe.prepare_batch({k: torch.cat([b[k] for b in batches]) for k in batches[0]})
        if self.grad_scaler is not None:
            # Only the last stage scales a loss, but every rank unscales its gradients: make sure each
            # rank's scaler has its (lazily created) scale.
            self.grad_scaler.scale(torch.zeros((), device=self.device))
        args, kwargs, target = self.recipe.pipeline_inputs(batch)
        args = args if self.has_first_stage else ()
        target = target if self.has_last_stage else None
        self._loss_scale = loss_scale
        losses: list[torch.Tensor] = []  # per micro-batch, as the loss function returned them
        with self.train_context():
            if train:
                self.schedule.step(*args, target=target, losses=losses, **self._step_options, **kwargs)
            else:
                self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        loss_sum = torch.zeros((), device=self.device)
        if losses:
            scale = self.grad_scaler.get_scale() if self.grad_scaler is not None and train else 1.0
            # The losses include the router loss added to each (scaled by the grad scaler with it, not by
            # loss_scale): taken off, what remains is the recipe's loss.
            router = sum(added for added, _ in self._router_losses[-len(losses):]) if train else 0.0
            loss_sum = (torch.stack([_full(l.detach()).float() for l in losses]).sum() / scale - router) / loss_scale
        # Only the rank with the last stage computed the loss.
        dist.all_reduce(loss_sum, group=self.pp_group)
        return loss_sum

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: a micro-batch's loss normalized for the whole step (as the
        plain loop does), so the schedule must not rescale the gradients."""
        if self.router_loss is not None:
            output, totals = output
        loss = self.recipe.pipeline_loss(output, target) * self._loss_scale
        if self.router_loss is not None and torch.is_grad_enabled():
            added, terms = self.router_loss(totals)
            self._router_losses.append((added.detach(), tuple(t.detach() for t in terms)))
            loss = _full(loss) + added  # a plain tensor: the loss joins it as one (a DTensor under tp)
        if self.grad_scaler is not None and torch.is_grad_enabled():
            loss = self.grad_scaler.scale(loss)
        return loss

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """Sum the embedding's gradient and its head copy's (they are one parameter split over stages)."""
        params = [part.embed.weight for part in self.model if part.embed is not None] + self.head_copies
        local = [_local(param.grad) for param in params if param.grad is not None]
        if len(local) == 2:  # both on this rank
            local[0].add_(local[1])
            local[1].copy_(local[0])
        elif local and self.tied_group is not None:
            dist.all_reduce(local[0], group=self.tied_group)

    def prime(self, micro_batch_size: int, seq_length: int, ignore_index: int) -> None:
        """One training pass of the schedule on a batch whose loss is zero; the caller drops the gradients.

        Schedules set their stages up on first use; torch 2.11 sets them up for forward only when
        that first use is an evaluation, and training then fails ("has gradients None"). Priming
        with a training pass before the step-0 evaluation makes the setup the training one.
        """
        shape = (micro_batch_size, seq_length)
        blank = {"input_ids": torch.zeros(shape, dtype=torch.long), "labels": torch.full(shape, ignore_index),
                 "position_ids": torch.arange(seq_length).expand(shape),
                 "document_ids": torch.zeros(shape, dtype=torch.long)}
        batch = {k: v.to(self.device) for k, v in blank.items()}
        self._run([batch] * self.layout.n_microbatches, 0.0, train=True)
        self._forget_router_records()

    @torch.no_grad()
    def evaluate(self, batches: list[dict[str, torch.Tensor]], ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, loss units) of held-out batches. The schedule takes a fixed number of
        micro-batches, so the last round is filled up with copies whose labels are all ignored."""
        n = self.layout.n_microbatches
        while len(batches) % n:
            filler = dict(batches[-1])
            filler["labels"] = torch.full_like(filler["labels"], ignore_index)
            batches.append(filler)
        loss_sum = torch.zeros((), device=self.device)
        units = torch.zeros((), device=self.device)
        for start in range(0, len(batches), n):
            group = [{k: v.to(self.device) for k, v in b.items()} for b in batches[start:start + n]]
            loss_sum += self._run(group, 1.0, train=False)
            units += sum(self.recipe.num_loss_units(b) for b in group)
        return loss_sum, units


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tied_embedding_group(world_ranks: torch.Tensor, layout: PipelineLayout):
    """With the head tied to the embedding and the two on different stages: the group of the two ranks
    holding the first and the last stage at each data/tensor-parallel coordinate (None where this
    rank holds neither, or both)."""
    if layout.schedule == "zbv":
        return None  # zbv puts the first and the last stage on the same rank
    mine = None
    for first, last in zip(world_ranks[0].flatten().tolist(), world_ranks[-1].flatten().tolist()):
        group = dist.new_group([first, last])  # every rank takes part in creating every group
        if dist.get_rank() in (first, last):
            mine = group
    return mine
