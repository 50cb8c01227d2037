"""Training checkpoints with torch.distributed.checkpoint (DCP): save, find, load, prune.

A checkpoint is `OUTPUT_DIR/checkpoints/step-N/` holding the DCP shards of a dict of Stateful
objects (model, optimizer, lr schedule, data position, train state), one RNG file per rank,
`manifest.json` (what convert, generate and eval need: model args, recipe, step, tokenizer
files under `tokenizer/`; and a checksum of every other file, see integrity.py) and, written last by rank 0 after every shard is on disk, the commit
marker `COMMITTED`. A directory without the marker (a crash mid-save) is never loaded and is
removed by the next save. DCP stores each tensor with its global shape and the offsets of its
shards, so a checkpoint loads at any parallel layout or world size.
"""

import contextlib
import errno
import json
import logging
import re
import shutil
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.stateful import Stateful

from meshtron.checkpoint.reader import first_cause, load_checkpoint, verify_checkpoint
from meshtron.errors import UserError

log = logging.getLogger(__name__)

COMMIT_MARKER = "COMMITTED"
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "meshtron-checkpoint"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelState(Stateful):
    """The model's parameters as a (possibly sharded) state dict; names without wrapper prefixes.

    `part`: "all"; "adapters" (only the trainable LoRA tensors: a LoRA run's checkpoints stay
    small and name their base model in the manifest); "base" (all but LoRA adapters, to load a
    base checkpoint into a model that has adapters).
    `model` may be a rank's pipeline stages (StageParts): their names are the whole model's
    (layers keep their global index), so their state dicts are merged as they are.
    """

    def __init__(self, model: nn.Module, part: str = "all"):
        assert part in ("all", "adapters", "base")
        self.model, self.part = model, part
        self.options = StateDictOptions(ignore_frozen_params=part == "adapters", strict=part == "all")

    def _parts(self) -> list[nn.Module]:
        from meshtron.parallel.pipeline import StageParts

        return list(self.model) if isinstance(self.model, StageParts) else [self.model]

    def _part_state_dict(self, model: nn.Module) -> dict:
        state = get_model_state_dict(model, options=self.options)
        if self.part == "base":
            state = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
        elif self.part == "adapters":
            # ignore_frozen_params keeps the second name of a tied frozen weight (lm_head of tied embeddings).
            trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return state

    def state_dict(self) -> dict:
        return {k: v for part in self._parts() for k, v in self._part_state_dict(part).items()}

    def load_state_dict(self, state_dict: dict) -> None:
        for part in self._parts():
            names = self._part_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in names}, options=self.options)


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter name (not position), so it reshards and survives reordering.

    Flattened (`state.<param>.<name>`, `param_groups.<param>.<hyper>`), so that the keys of a
    pipeline stage's parameters are the same at any pipeline layout. Pipeline stages (StageParts)
    are a ModuleList: its index prefix is removed from the names here and put back on load. A
    stage's copy of a tied embedding (the head) is stored under the embedding's name, as a model
    without pipeline stores the one tied parameter.
    """

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self._stored_key: dict[str, str] | None = None  # torch's flattened key -> the key in the checkpoint

    def _stored_name(self, key: str) -> str:
        from meshtron.parallel.pipeline import StageParts, holds_split_head

        if not isinstance(self.model, StageParts):
            return key
        kind, index, rest = key.split(".", 2)
        name, leaf = rest.rsplit(".", 1)
        if name == "lm_head.weight" and holds_split_head(self.model[int(index)]):
            name = "embed.weight"
        return f"{kind}.{name}.{leaf}"

    def state_dict(self) -> dict:
        state = get_optimizer_state_dict(self.model, self.optimizer, options=self._OPTIONS)
        self._stored_key = {key: self._stored_name(key) for key in state}
        # Where a rank holds both the embedding and its copy, both map to one key with equal values.
        return {self._stored_key[key]: value for key, value in state.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._stored_key is None:
            self.state_dict()
        state = {key: state_dict[stored] for key, stored in self._stored_key.items()}
        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._OPTIONS)


def is_complete(path: Path) -> bool:
    return (path / COMMIT_MARKER).is_file()


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def list_checkpoints(checkpoints_dir: Path, complete_only: bool = True) -> list[Path]:
    """step-N directories, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    dirs = [p for p in checkpoints_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted((p for p in dirs if is_complete(p) or not complete_only), key=step_of)


def latest_loadable(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint whose metadata and shard files are all there (None if there is
    none). A damaged newer one (a lost or truncated file) is passed over, and rank 0 says so."""
    found = list_checkpoints(checkpoints_dir)
    damaged = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except UserError as e:
            damaged.append(str(e))
            continue
        if damaged and _rank() == 0:
            log.warning("falling back to %s, the previous committed checkpoint: %s", path, "; ".join(damaged))
        return path
    if damaged:
        raise UserError(f"no checkpoint in {checkpoints_dir} can be loaded ({'; '.join(damaged[:2])}); restore the "
                        "files, or train into a new train.output_dir")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its newest complete checkpoint) or a step-N directory -> the checkpoint directory."""
    path = Path(path)
    if (path / MANIFEST).is_file() or (path / COMMIT_MARKER).exists():
        if not is_complete(path):
            raise UserError(f"checkpoint {path} is incomplete (no {COMMIT_MARKER} marker: the save was interrupted); "
                            "use an earlier step or the run directory")
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise UserError(f"{path} holds no complete meshtron checkpoint (expected a run directory with "
                    "checkpoints/step-N/ or a step-N directory)")


def read_manifest(checkpoint_dir: Path) -> dict:
    try:
        manifest = json.loads((checkpoint_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {checkpoint_dir / MANIFEST}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{checkpoint_dir / MANIFEST} is not a meshtron checkpoint manifest")
    return manifest


def check_resume_matches(checkpoint_dir: Path, manifest: dict) -> None:
    """Refuse to resume `checkpoint_dir` into a run whose checkpoints would carry `manifest`, when it
    holds another model (a run directory reused for a new model), LoRA adapters into a full run or
    the reverse, or adapters trained on another base model than the one this run loaded."""
    saved = read_manifest(checkpoint_dir)
    args, current = saved.get("model_args", {}), json.loads(json.dumps(manifest["model_args"]))
    differ = [k for k in sorted(args) if k in current and args[k] != current[k]]
    if differ:
        shown = ", ".join(f"{k} = {args[k]} there, {current[k]} here" for k in differ[:3])
        raise UserError(f"{checkpoint_dir} is a checkpoint of another model ({shown}); train this model into a new "
                        "train.output_dir, or resume with the model it was trained with")
    if bool(saved.get("lora")) != bool(manifest.get("lora")):
        kind = "LoRA adapters" if saved.get("lora") else "a full model"
        raise UserError(f"{checkpoint_dir} holds {kind}, this run trains {'LoRA adapters' if manifest.get('lora') else 'a full model'}; "
                        "resume with the lora settings it was trained with, or use a new train.output_dir")
    base, this_base = (saved.get("base_model") or {}).get("path"), (manifest.get("base_model") or {}).get("path")
    if base and base != this_base:
        raise UserError(f"{checkpoint_dir} holds LoRA adapters trained on the base model {base}, but this run loads "
                        f"{this_base}; set model.name_or_path to {base}, or use a new train.output_dir")


def read_chat_template(tokenizer_dir: Path) -> str | None:
    """The chat template a tokenizer directory carries (chat_template.jinja or tokenizer_config.json)."""
    if (tokenizer_dir / "chat_template.jinja").is_file():
        return (tokenizer_dir / "chat_template.jinja").read_text()
    config = tokenizer_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def staging_buffer() -> DefaultStager:
    """The stager of asynchronous saves: copies the state into host memory it keeps from one save to the
    next (pinned on GPUs, for fast device-to-host copies). Without it, each save allocates a fresh,
    pageable copy of the whole state (DCP's default)."""
    return DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=False))


class CheckpointManager:
    """Saves and loads the states of a run under `run_dir/checkpoints`.

    states: name -> Stateful (or plain state dicts). `manifest` is written into each checkpoint
    and `tokenizer_dir`'s files are copied next to it, so the checkpoint is self-describing.
    """

    def __init__(self, run_dir: Path, states: dict[str, Stateful], *, keep: int, async_save: bool,
                 manifest: dict, tokenizer_dir: Path | None):
        self.checkpoints_dir = Path(run_dir) / "checkpoints"
        self.states = states
        self.keep = keep
        self.async_save = async_save
        self.manifest = manifest
        self.tokenizer_dir = tokenizer_dir
        self._pending: tuple[Future, Path, int] | None = None
        # A background save runs its collectives while training runs its own: give it a gloo group
        # of its own so that the two never interleave on one communicator.
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self._stager = staging_buffer() if async_save else None

    def latest(self) -> Path | None:
        found = list_checkpoints(self.checkpoints_dir)
        return found[-1] if found else None

    def load(self, path: Path) -> None:
        """Load every state from `path` (resharding to this run's layout) and this rank's RNG if saved."""
        load_checkpoint(self.states, path)
        rng_file = path / f"rng-rank{_rank()}.safetensors"
        world = dist.get_world_size() if dist.is_initialized() else 1
        # Generator states belong to ranks; at another world size the seeded defaults stay.
        if rng_file.is_file() and read_manifest(path).get("world_size") == world:
            from safetensors.torch import load_file

            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])

    def save(self, step: int) -> Path:
        """Write checkpoint step-`step` (asynchronously if configured); returns its directory."""
        self.wait()
        path = self.checkpoints_dir / f"step-{step}"
        with self._reporting_failure(path):
            if _rank() == 0:
                if path.exists():
                    shutil.rmtree(path)  # a leftover of an interrupted save of the same step
                path.mkdir(parents=True)
            _barrier()
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            from safetensors.torch import save

            # Written by Python (not safetensors' own file writer), so a full disk is an OSError.
            (path / f"rng-rank{_rank()}.safetensors").write_bytes(save(rng))
            if _rank() == 0:
                self._write_manifest(path, step)
            if self.async_save:
                # Staged into the buffer of the previous save: its write has finished (wait() above).
                future = dcp.async_save(self.states, checkpoint_id=str(path), process_group=self._async_group,
                                        async_stager=self._stager)
                self._pending = (future, path, step)
            else:
                dcp.save(self.states, checkpoint_id=str(path))
                self._commit(path)
        return path

    def wait(self) -> None:
        """Finish (and commit) a pending asynchronous save."""
        if self._pending is not None:
            future, path, _ = self._pending
            self._pending = None
            with self._reporting_failure(path):
                future.result()
                self._commit(path)

    @contextlib.contextmanager
    def _reporting_failure(self, path: Path):
        """A save that fails to write (disk full, read-only) ends in one line naming the checkpoint; the
        previous checkpoints are untouched (nothing is pruned before a commit) and stay loadable."""
        try:
            yield
        except (OSError, CheckpointException) as e:
            error = first_cause(e) if isinstance(e, CheckpointException) else e
            if not isinstance(error, OSError):
                raise
            previous = self.latest()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            cause = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error)).lower()
            raise UserError(f"{cause} while saving checkpoint {path} ({error.filename or path}); {kept}; free space "
                            "or fix the folder, then resume (checkpoint.resume = \"auto\")") from None

    def _commit(self, path: Path) -> None:
        from meshtron.checkpoint.integrity import record_checksums

        # Every rank has finished its shards once all pass the barrier; the marker goes last.
        _barrier()
        record_checksums(path)
        if _rank() == 0:
            (path / COMMIT_MARKER).write_text("ok\n")
            self._prune()
            log.info("saved checkpoint %s", path)
        _barrier()

    def _write_manifest(self, path: Path, step: int) -> None:
        manifest = dict(self.manifest, format=FORMAT, version=1, step=step)
        if self.tokenizer_dir is not None:
            from meshtron.checkpoint.hf import SIDE_FILES

            (path / TOKENIZER_DIR).mkdir()
            for name in SIDE_FILES:
                if (self.tokenizer_dir / name).is_file():
                    shutil.copy2(self.tokenizer_dir / name, path / TOKENIZER_DIR / name)
            manifest["tokenizer"] = TOKENIZER_DIR
            manifest["chat_template"] = read_chat_template(self.tokenizer_dir)
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    def _prune(self) -> None:
        """Drop checkpoints beyond the newest `keep`, and incomplete ones older than the newest complete."""
        complete = list_checkpoints(self.checkpoints_dir)
        if not complete:
            return
        newest = step_of(complete[-1])
        doomed = [p for p in list_checkpoints(self.checkpoints_dir, complete_only=False)
                  if not is_complete(p) and step_of(p) < newest]
        if self.keep:
            doomed += complete[: -self.keep]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
