"""Hugging Face directories: read a config into `ModelArgs`, stream safetensors weights into a
model through the family's state-dict adapter, and write a model back as a directory
transformers loads unchanged.

Only safetensors are read or written (no pickle). Each rank reads only what it keeps: a tensor
that converts one to one is read as this rank's slice of the file (the DTensor shard's local shape
and global offset), copied straight into the local shard; a tensor no parameter of this rank holds
(another pipeline stage's layers) is not read. Tensors that convert in groups (fused qkv, stacked
experts; models/common/adapter.py) are read whole on the host, converted, and sliced there. Which
head a model has (tied, score, language model) is the adapter's business, not this file's.
"""

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from meshtron.checkpoint.atomic import atomic_directory
from meshtron.errors import UserError
from meshtron.models.common.args import ModelArgs
from meshtron.models.registry import build_model, family_for_model_type
from meshtron.models.spec import FamilySpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
log = logging.getLogger(__name__)
# Files copied verbatim from a source HF directory when saving (tokenizer, chat template, generation).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def read_hf_config(path: str | os.PathLike) -> tuple[FamilySpec, object, ModelArgs]:
    """(family spec, transformers config, ModelArgs) for an HF model directory."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file} is not valid JSON: {e}") from None
    spec = family_for_model_type(raw.get("model_type"))
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path))
    args = spec.args_from_hf(cfg)
    if getattr(args, "num_mtp_layers", 0) and not _holds_layer(path, args.num_layers):
        # transformers keeps num_nextn_predict_layers in the configs it saves but not the MTP layers it never runs.
        args.num_mtp_layers = 0
    if any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or []):
        args.num_labels = cfg.num_labels  # a reward model: the `score` head
    return spec, cfg, args


def _holds_layer(path: Path, index: int) -> bool:
    """Whether the directory's weights hold a tensor of layer `index` (False without weights: a config alone)."""
    try:
        names = weight_files(path)
    except UserError:
        return False
    return any(name.startswith(f"model.layers.{index}.") for name in names)


def hf_dtype(cfg) -> torch.dtype | None:
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with _open_safetensors(single) as f:
            return {k: single for k in f.keys()}
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise UserError(f"{path} holds only pickle weights (.bin/.pt); meshtron reads safetensors only")
    raise UserError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}")


def _open_safetensors(file: Path):
    """safe_open, with a damaged file (empty, truncated, not safetensors) named in a UserError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as e:
        raise UserError(f"{file} is not a complete safetensors file ({e}); it may be truncated or empty: "
                        "download or convert it again") from None


class SafetensorsTensor:
    """One tensor of a safetensors file, read only in the slices asked for; adds the bytes it reads
    to `counter` (a one-element list shared by a load). Each read opens the file anew, so the pages
    of the file it touched leave this process's resident set when the read is done."""

    def __init__(self, file: Path, name: str, shape: list[int], counter: list[int]):
        self.file, self.name, self.shape, self._counter = file, name, torch.Size(shape), counter

    def __getitem__(self, index) -> torch.Tensor:
        with _open_safetensors(self.file) as f:
            tensor = f.get_slice(self.name)[index]
        self._counter[0] += tensor.numel() * tensor.element_size()
        return tensor

    def full(self) -> torch.Tensor:
        return self[...]


def iter_hf_tensors(path: Path, counter: list[int]) -> Iterator[tuple[str, SafetensorsTensor]]:
    """Yield (HF name, unread tensor) file by file."""
    by_file: dict[Path, list[str]] = {}
    for key, file in weight_files(path).items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        if not file.is_file():
            raise UserError(f"{file} is listed in {INDEX_FILE} but missing")
        with _open_safetensors(file) as f:
            shapes = {hf_key: f.get_slice(hf_key).get_shape() for hf_key in keys}
        for hf_key in keys:
            yield hf_key, SafetensorsTensor(file, hf_key, shapes[hf_key], counter)


@torch.no_grad()
def load_hf_weights(model: nn.Module, path: str | os.PathLike, spec: FamilySpec) -> set[str]:
    """Copy the tensors of an HF directory into `model`'s (materialized) parameters, each rank reading
    only its shards (module docstring); returns the names of the parameters it wrote (the others are
    for `init_weights`: adapters, a new score head). Logs the bytes this rank read."""
    path = Path(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    # Saved buffers (DeepSeek's routing bias) load when the checkpoint has them; else init_weights sets them.
    buffers = {name: t for name, t in model.state_dict(keep_vars=True).items() if name not in params}
    adapter = spec.adapter(model.args)
    targets = {**params, **buffers}

    def held(name: str) -> bool:
        return any(target in targets for target in adapter.head_aliases(name))

    loaded, bytes_read = set(), [0]
    try:
        for name, tensor in adapter.from_hf(iter_hf_tensors(path, bytes_read), wanted=held):
            for target in adapter.head_aliases(name):
                if target not in targets:
                    continue  # e.g. a tensor for layers this pipeline stage does not hold
                param = targets[target]
                if tuple(tensor.shape) != tuple(param.shape):
                    raise UserError(f"tensor {adapter.hf_name(name)} in {path} has shape {tuple(tensor.shape)}, "
                                    f"but the config implies {tuple(param.shape)}")
                _copy_into(param, tensor)
                loaded.add(target)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    # LoRA adapters are not part of a base checkpoint.
    missing = sorted(n for n in set(params) - loaded
                     if not adapter.optional(n) and ".lora_A." not in n and ".lora_B." not in n)
    if missing:
        shown = ", ".join(adapter.hf_name(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UserError(f"{path} is missing tensors: {shown}{more}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    log.info("rank %d read %d bytes of weights from %s", rank, bytes_read[0], path)
    return loaded


def _copy_into(param: torch.Tensor, tensor: torch.Tensor | SafetensorsTensor) -> None:
    """`tensor` (full-sized, read or not) into `param`, reading and copying only the local shard."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(param, DTensor):
        param.copy_(tensor[...])
    elif all(type(p) in (Shard, Replicate) for p in param.placements):
        # Plain shards are one block of the global tensor: read just that block.
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        param.to_local().copy_(tensor[tuple(slice(o, o + n) for n, o in zip(shape, offset))])
    else:
        # FSDP's strided shards (dp_shard with tp on the same dim) are not one block: scatter from rank 0.
        full = tensor[...].to(param.device, param.dtype)
        param.to_local().copy_(distribute_tensor(full, param.device_mesh, param.placements).to_local())


def load_hf_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, ModelArgs]:
    """Build the model on the meta device, materialize it on `device` in `dtype`, stream the weights in."""
    spec, _, args = read_hf_config(path)
    model = build_model(args, device="meta")
    model.to_empty(device=device)
    model.to(dtype)
    model.init_weights(skip=load_hf_weights(model, path, spec))
    model.eval()
    return model, args


def save_hf_model(
    state_dict: dict[str, torch.Tensor],
    args: ModelArgs,
    output_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    hf_config_extra: dict | None = None,
) -> Path:
    """Write `state_dict` (our names, full tensors) as an HF directory, atomically.

    Tokenizer, chat template and generation config are copied from `source_dir` when given.
    The directory is written under a temporary name and renamed when complete.
    """
    from safetensors.torch import save_file

    from meshtron.models.registry import get_family

    spec = get_family(args.family)
    output_dir = Path(output_dir)
    with atomic_directory(output_dir) as tmp:
        tensors = {}
        for name, t in spec.adapter(args).to_hf(state_dict).items():
            t = t.detach().to("cpu")
            tensors[name] = (t.to(dtype) if dtype is not None else t).contiguous()
        out_dtype = dtype or next(iter(tensors.values())).dtype
        _write_shards(tensors, tmp, max_shard_bytes, save_file)
        cfg = spec.hf_config_from_args(args)
        head = "ForSequenceClassification" if args.num_labels else "ForCausalLM"
        cfg.architectures = [type(cfg).__name__.replace("Config", head)]
        if args.num_labels:
            cfg.num_labels = args.num_labels
            cfg.tie_word_embeddings = False
        for key, value in (hf_config_extra or {}).items():
            setattr(cfg, key, value)
        cfg.dtype = out_dtype
        cfg.save_pretrained(str(tmp))
        if source_dir is not None:
            for name in SIDE_FILES:
                src = Path(source_dir) / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
    return output_dir


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int, save_file) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=meta)
        return
    weight_map = {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def hf_token_config(cfg) -> dict:
    """bos/eos/pad token ids of a transformers config, to carry into a saved config."""
    return {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k, None) is not None}
