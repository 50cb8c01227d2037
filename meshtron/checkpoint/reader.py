"""Reading DCP checkpoints without executing code from them.

torch's FileSystemReader unpickles `.metadata` with `pickle.load` and the non-tensor entries of a
checkpoint (step counters, schedule and data-loader states) with `torch.load(weights_only=False)`:
a crafted file in a run directory would run code in whatever command loads it. `SafeReader`
unpickles `.metadata` with an allowlist of the classes DCP writes there (its metadata
dataclasses, torch.Size, dtypes, paths) and every non-tensor entry with torch's weights-only
unpickler (plain containers and numbers); anything else is refused with one line naming the file.
Tensors are already read with `weights_only=True` by torch itself. Before any data is read it also
checks that every file the metadata names is there and long enough, so a damaged checkpoint is
reported by name instead of failing deep inside torch.

`load_checkpoint` is the one way meshtron loads a DCP checkpoint.
"""

import contextlib
import io
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from meshtron.errors import UserError

METADATA_FILE = ".metadata"

# (module, name) that DCP's own metadata pickles reference (as torch 2.13 writes them; older releases a subset).
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and torch's dtype / layout / memory-format constants."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_CLASSES or (module == "torch" and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        raise UserError(f"{self.path}: refusing to load this checkpoint: its metadata references {module}.{name}, "
                        "which a checkpoint never needs (the file may have been tampered with)")


class _WeightsOnlyBytes:
    """A load planner seen through this reader: non-tensor entries are unpickled weights-only."""

    def __init__(self, planner, reader: "SafeReader"):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name):
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            file = self._reader.path / self._reader.storage_data[read_item.storage_index].relative_path
            reason = str(e).strip().splitlines()[0]
            raise UserError(f"{file}: refusing to load entry {read_item.dest_index.fqn!r} of this checkpoint: it is "
                            f"not plain data ({reason})") from None
        # Hand the planner bytes of what was loaded safely: it unpickles them with weights_only=False.
        safe = io.BytesIO()
        torch.save(loaded, safe)
        safe.seek(0)
        self._planner.load_bytes(read_item, safe)


class SafeReader(FileSystemReader):
    """A FileSystemReader that never unpickles anything but plain data and DCP's metadata."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.path = Path(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args, **kwargs):
        # meshtron never writes rank-local metadata (`__N.metadata`); torch asks for it only after
        # the global file failed, whose error then stands.
        if self._metadata is None or kwargs.get("rank") is not None:
            self._metadata = self._read_metadata()
        return self._metadata

    def _read_metadata(self) -> Metadata:
        path = self.path / METADATA_FILE
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f, path).load()
        except FileNotFoundError:
            raise UserError(f"{path} is missing: {self.path} is not a complete checkpoint") from None
        except UserError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
            raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); {self.path} cannot be loaded") from None
        if not isinstance(metadata, Metadata):
            raise UserError(f"{path} is not a checkpoint's metadata")
        check_files(self.path, metadata)
        # As torch's reader does after unpickling: checkpoints of older releases have no storage_meta.
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        return super().read_data(plan, _WeightsOnlyBytes(planner, self))


def check_files(checkpoint_dir: Path, metadata) -> None:
    """Every file the metadata names exists and holds the bytes it is said to hold."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = checkpoint_dir / name
        if not file.is_file():
            raise UserError(f"{file} is missing: the checkpoint {checkpoint_dir} is damaged")
        actual = file.stat().st_size
        if actual < size:
            raise UserError(f"{file} is truncated ({actual} bytes, its metadata needs {size}): the checkpoint "
                            f"{checkpoint_dir} is damaged")


def verify_checkpoint(checkpoint_dir: Path) -> None:
    """Raise a UserError naming the file if the checkpoint's metadata or shard files are unusable."""
    SafeReader(checkpoint_dir).read_metadata()


@contextlib.contextmanager
def single_process(enabled: bool = True):
    """Silence torch's warning that it assumes a single-process load or save: where meshtron asks
    for one (`no_dist`), that is the intent, and the warning would only worry the user."""
    with warnings.catch_warnings():
        if enabled:
            warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)", category=UserWarning)
        yield


def load_checkpoint(state_dict: dict, checkpoint_dir: str | os.PathLike, no_dist: bool = False) -> None:
    """`dcp.load` through SafeReader. A failure on any rank is raised as the UserError that caused it.

    `no_dist`: this process reads the whole checkpoint itself (torch's warning that it assumes so is
    silenced: here it is the intent)."""
    with single_process(no_dist):
        reader = SafeReader(checkpoint_dir)
        # Read and check the metadata here, so that its errors are raised as they are (torch would
        # log them with a traceback and retry with a rank-local file).
        reader.read_metadata()
        try:
            dcp.load(state_dict, storage_reader=reader, no_dist=no_dist)
        except CheckpointException as e:
            raise first_cause(e) from None


def first_cause(e: CheckpointException) -> BaseException:
    """The first rank's own error (a UserError or an OSError) out of DCP's per-rank wrapper."""
    for rank in sorted(e.failures):
        error, _traceback = e.failures[rank]
        if isinstance(error, (UserError, OSError)):
            return error
    return e
