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
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from meshtron.errors import UserError

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
