"""The parts a Trainer is built from: the process group and device, the model source (flavor,
Hugging Face directory or meshtron checkpoint) and tokenizer, and the parallelized model.

The model follows ARCHITECTURE principle 3: built on the meta device, parallelized, then
materialized and initialized (or loaded, streaming shard by shard).
"""

import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from meshtron.assets import EXAMPLE_MODEL, resolve_model_dir
from meshtron.config import JobConfig
from meshtron.errors import UserError
from meshtron.models.common.args import ModelArgs
from meshtron.models.registry import build_model, get_family, get_flavor, model_args_from_dict
from meshtron.parallel import Meshes, ParallelDims, parallelize
from meshtron.parallel.dims import device_binding, local_device
from meshtron.train.converters import build_converters

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def init_distributed(deterministic: bool) -> torch.device:
    """Join the process group torchrun describes (or a one-process group) and pick the device.

    NCCL on GPU (with gloo beside it for CPU-side collectives of checkpointing), gloo on CPU.
    """
    if deterministic:
        # cuBLAS needs this set before its first use to pick deterministic workspaces.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.cuda.is_available():
        # The NCCL flight recorder: a ring of the last collectives, dumped by the hang watchdog.
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    device = local_device()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend, **_restart_scoped_store(), **device_binding(device))
        else:
            # Not under torchrun: a one-process group, so that one code path (mesh, DCP) serves all runs.
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **device_binding(device))
    return device


def _restart_scoped_store() -> dict:
    """The rendezvous torchrun describes, in a key space of this restart attempt's own.

    After `torchrun --max-restarts` restarts the workers, keys the previous attempt left in a
    store that outlives it (the agent's) can be read by the new group's setup, which then
    connects to dead peers or waits for them (seen on gloo: connection refused at re-init, hangs
    in process-group creation). A prefix per attempt (TORCHELASTIC_RESTART_COUNT) keeps them apart.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    from meshtron.train.ops import restart_attempt

    prefixed = dist.PrefixStore(f"meshtron/attempt-{restart_attempt()}", store)
    return {"store": prefixed, "rank": rank, "world_size": world_size}


@dataclass
class ModelSource:
    kind: str  # flavor | hf | checkpoint
    args: ModelArgs
    path: Path | None  # HF directory or checkpoint directory
    tokenizer_dir: Path | None
    hf_config_extra: dict  # bos/eos/pad ids to carry into an exported HF config


def _token_ids_from_dir(path: Path | None) -> dict:
    config = path / "config.json" if path is not None else None
    if config is None or not config.is_file():
        return {}
    raw = json.loads(config.read_text())
    return {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}


def _apply_arg_overrides(args: ModelArgs, overrides: dict) -> ModelArgs:
    fields = args.to_dict()
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; fields: {', '.join(fields)}"
            raise UserError(f"model.args: unknown field {key!r}{hint}")
    try:
        return type(args).from_dict({**fields, **overrides})
    except ValueError as e:
        raise UserError(f"model.args: {e}") from None


def _apply_overrides(args: ModelArgs, config: JobConfig) -> ModelArgs:
    """The model's args with model.args, then [moe]'s set keys (the loader refused a key given different
    values in both), applied."""
    from meshtron.models.common.moe import MoEArgs

    moe = {key: value for key, value in dataclasses.asdict(config.moe).items() if value is not None}
    if moe and not isinstance(args, MoEArgs):
        raise UserError(f"[moe] sets {', '.join(moe)}, but {config.model.name_or_path!r} is a dense model (no "
                        "experts); remove the [moe] settings or train an MoE model")
    return _apply_arg_overrides(args, {**config.model.args, **moe})


def resolve_model_source(config: JobConfig) -> ModelSource:
    from meshtron.checkpoint.manager import read_manifest, resolve_checkpoint

    name = config.model.name_or_path
    tokenizer = config.model.tokenizer
    tokenizer_dir = resolve_model_dir(tokenizer) if tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise UserError(f"model.tokenizer {tokenizer!r} is not a directory; give a tokenizer or HF model directory")
    path = resolve_model_dir(name)
    if path.is_dir() and (path / "config.json").is_file():
        from meshtron.checkpoint.hf import read_hf_config

        _, _, args = read_hf_config(path)
        args = _apply_overrides(args, config)  # routing and context fields only (config validation)
        return ModelSource("hf", args, path, tokenizer_dir or path, _token_ids_from_dir(path))
    if path.is_dir():
        checkpoint = resolve_checkpoint(path)
        manifest = read_manifest(checkpoint)
        own_tokenizer = checkpoint / manifest["tokenizer"] if manifest.get("tokenizer") else None
        args = model_args_from_dict(manifest["model_args"], f"{checkpoint}/manifest.json model_args")
        args = _apply_overrides(args, config)  # routing and context fields only (config validation)
        return ModelSource("checkpoint", args, checkpoint,
                           tokenizer_dir or own_tokenizer, manifest.get("hf_config_extra", {}))
    if ":" not in name:
        raise UserError(f"model.name_or_path {name!r} is neither a directory nor a flavor (family:name, e.g. "
                        f"llama:debug) nor {EXAMPLE_MODEL!r}")
    args = _apply_overrides(get_flavor(name), config)
    return ModelSource("flavor", args, None, tokenizer_dir, _token_ids_from_dir(tokenizer_dir))


def check_context_length(config: JobConfig, source: ModelSource) -> None:
    """Refuse lengths beyond the model's context before anything is allocated: attention's dense mask
    and scores grow with the square of the length (seq_length 100000 on a 2048-position model took
    19.5 GB before the kernel killed it), and positions past the context were never trained."""
    limit = source.args.max_seq_len
    if source.kind == "flavor":
        how = "raise the flavor's context with model.args = {max_seq_len = N}"
    else:
        how = ("extend the model's context with RoPE scaling: model.args = {max_seq_len = N, rope_scaling = "
               f'{{rope_type = "yarn", factor = N / {limit}, original_max_position_embeddings = {limit}}}}} '
               "(configs/smollm2/sft_long.toml)")
    if config.train.seq_length > limit:
        raise UserError(f"train.seq_length {config.train.seq_length} is above the model's context length {limit} "
                        f"(max_seq_len / max_position_embeddings); lower train.seq_length or {how}")
    if config.train.sample_prompt and config.train.sample_max_new_tokens >= limit:
        raise UserError(f"train.sample_max_new_tokens {config.train.sample_max_new_tokens} leaves no room for the "
                        f"prompt in the model's context of {limit} tokens; lower it")


def compute_dtype_name(config: JobConfig, device_type: str) -> str:
    """model.dtype with `auto` resolved for the device: bfloat16 on CUDA, where float32 runs at a
    fraction of the tensor cores' rate, float32 elsewhere (a CPU has no faster low-precision path)."""
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if device_type == "cuda" else "float32"


def compile_blocks(config: JobConfig, device_type: str) -> bool:
    """train.compile with `auto` resolved for the device: on for CUDA, off elsewhere (on a CPU the
    compile takes longer than it saves in a run of this size)."""
    if config.train.compile == "auto":
        return device_type == "cuda"
    return config.train.compile


def precision(config: JobConfig, device_type: str) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, master dtype) on `device_type`, checked."""
    name = compute_dtype_name(config, device_type)
    compute, master = DTYPES[name], DTYPES[config.model.master_dtype]
    if compute == torch.float32 and master != torch.float32:
        raise UserError(f"model.dtype = float32 with model.master_dtype = {config.model.master_dtype}: the master "
                        "weights must be at least as precise as the compute; set master_dtype = float32")
    if master == torch.float16:
        raise UserError("pure float16 training (master_dtype = float16) overflows without fp32 master weights; use "
                        "bfloat16, or dtype = float16 with master_dtype = float32 (dynamic loss scaling)")
    if compute != master and master != torch.float32:
        raise UserError(f"model.dtype = {name} with master_dtype = {config.model.master_dtype} is "
                        "not a supported combination; use master_dtype = float32 or equal to dtype")
    return compute, master


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline stage holds: its layers (global indices) and whether it is the first or last."""

    layers: tuple[int, ...]
    first: bool
    last: bool


def build_parallel_model(config: JobConfig, source: ModelSource, dims: ParallelDims, meshes: Meshes,
                         device: torch.device, load_weights: bool, stage: StageSpec | None = None) -> nn.Module:
    """The build order, written once:

    1. build on the meta device (no memory);
    2. keep one pipeline stage's layers (with pipeline parallel);
    3. converters change the structure (LoRA adapters, float8 linears; see train/converters.py);
    4. parallelize: TP, recompute, compile, FSDP (after step 7 for a converter that needs the whole
       weights: QLoRA);
    5. materialize (`to_empty`);
    6. load the source's weights (an HF directory or a checkpoint), streaming into the shards;
    7. initialize what was not loaded, seeded and layout-independent (everything, for a flavor;
       adapters or a new score head otherwise): pretrained weights are never drawn first, and
       with `load_weights` False (a resume, whose checkpoint brings every weight) nothing is;
    8. converters' step on the loaded model (QLoRA quantizes the base).
    """
    args = source.args
    # grpo and ppo train on rows as long as prompt + completion, which sequence parallel shards unevenly:
    # train.seq_length plays no part there.
    seq_length = None if config.train.recipe in ("grpo", "ppo") else config.train.seq_length
    dims.check_model(args.num_heads, args.num_kv_heads, args.ffn_dim, args.vocab_size, seq_length,
                     config.parallel.sequence_parallel)
    if dims.ep_enabled:
        if not hasattr(args, "num_experts"):
            raise UserError(f"parallel.ep = {dims.ep} splits the experts of a Mixture-of-Experts model, and "
                            f"{args.family} has none; set parallel.ep = 1")
        dims.check_experts(args.num_experts)
    compute, master = precision(config, device.type)
    converters = build_converters(config, source.kind, dims.dp_shard, device.type)
    model = build_model(args, device="meta")
    model.set_attention(config.model.attention)
    if stage is not None:
        from meshtron.parallel.pipeline import prune_to_stage

        prune_to_stage(model, stage.layers, first=stage.first, last=stage.last)
    model.to(master)
    for converter in converters:
        converter.convert(model)
    late = any(c.needs_full_weights for c in converters)

    def _parallelize():
        parallelize(
            model, get_family(args.family).plan, dims, meshes,
            sequence_parallel=config.parallel.sequence_parallel,
            recompute_mode=config.recompute.mode,
            recompute_layers=config.recompute.num_layers,
            param_dtype=compute,
            reduce_dtype=master,
            compile_blocks=compile_blocks(config, device.type),
            reshard_after_forward=stage is None,
        )
        if stage is not None and dims.tp_enabled:
            from meshtron.parallel.pipeline import add_boundary_hooks

            add_boundary_hooks(model, meshes.tp, config.parallel.sequence_parallel, first=stage.first, last=stage.last)
        for converter in converters:
            converter.after_parallelize(model)

    if not late:
        _parallelize()
    model.to_empty(device=device)
    if load_weights:
        loaded = _load_weights(model, source, converters)
        # Each rank draws only the blocks of its shards, on its device, and the values are the same
        # at every parallel layout (models/common/init.py).
        drawn = model.init_weights(seed=config.train.seed, skip=frozenset(loaded))
        log.info("rank %d drew %d initial values", dist.get_rank() if dist.is_initialized() else 0, drawn)
    else:
        model.init_buffers()  # a resume: every weight comes from the checkpoint, none is drawn first
    for converter in converters:
        converter.after_load(model)
    if late:
        _parallelize()
    model.train()
    return model


def _load_weights(model: nn.Module, source: ModelSource, converters: list) -> set[str]:
    """The source's weights into the materialized model; returns the names of the parameters loaded."""
    if source.kind == "hf":
        from meshtron.checkpoint.hf import load_hf_weights

        return load_hf_weights(model, source.path, get_family(source.args.family))
    if source.kind == "checkpoint":
        from meshtron.checkpoint import load_model_weights

        # A base checkpoint holds no adapters: load the base weights only.
        return load_model_weights(model, source.path, base_only=bool(converters))
    return set()
