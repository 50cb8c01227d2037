"""Checkpoint integrity: a CRC-32 and size per file, recorded in the manifest at save and checked by
`meshtron checkpoint verify PATH` and before a resume.

CRC-32 (zlib) rather than a cryptographic hash: it guards against torn writes, truncation and bit
rot, not against tampering, and reads at memory speed. At save each rank checksums the files it
wrote (`__R_*.distcp`, `rng-rankR.safetensors`) and rank 0 the rest, so the cost is spread like
the writing was; the manifest (which holds the list) is the one file not covered.
"""

import json
import logging
import re
import zlib
from pathlib import Path

import torch.distributed as dist

from meshtron.checkpoint.manager import COMMIT_MARKER, MANIFEST
from meshtron.errors import UserError

log = logging.getLogger(__name__)

_NOT_COVERED = {MANIFEST, COMMIT_MARKER}
_RANK_OF_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng-rank(\d+)\.safetensors)$")
_CHUNK = 1 << 22


def crc32_of(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _files(checkpoint_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(checkpoint_dir)) for p in checkpoint_dir.rglob("*")
                  if p.is_file() and p.name not in _NOT_COVERED)


def _writer_rank(name: str) -> int:
    """The rank that wrote a file (0 for the files rank 0 writes alone: .metadata, tokenizer, ...)."""
    match = _RANK_OF_FILE.match(name)
    return int(match.group(1) or match.group(2)) if match else 0


def _entry(checkpoint_dir: Path, name: str) -> dict:
    return {"crc32": crc32_of(checkpoint_dir / name), "size": (checkpoint_dir / name).stat().st_size}


def record_checksums(checkpoint_dir: Path) -> None:
    """Add {"files": {name: {crc32, size}}} to the manifest once every rank's files are on disk.

    Collective when a process group is up: every rank calls it; rank 0 writes the manifest.
    """
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = {name: _entry(checkpoint_dir, name) for name in _files(checkpoint_dir)
            if _writer_rank(name) % world == rank}
    gathered = [None] * world if rank == 0 else None
    if distributed:
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if rank == 0:
        manifest_path = checkpoint_dir / MANIFEST
        manifest = json.loads(manifest_path.read_text())
        manifest["files"] = {name: entry for part in gathered for name, entry in sorted(part.items())}
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def find_problems(checkpoint_dir: Path, names: list[str] | None = None) -> list[str]:
    """What is wrong with a checkpoint's files (missing, wrong size, wrong checksum); [] when intact.

    `names` restricts the check to some of the recorded files (ranks share the work at resume).
    """
    try:
        recorded = json.loads((checkpoint_dir / MANIFEST).read_text()).get("files")
    except (OSError, json.JSONDecodeError) as e:
        return [f"cannot read {checkpoint_dir / MANIFEST}: {e}"]
    if recorded is None:
        raise UserError(f"{checkpoint_dir} records no checksums (saved by an older meshtron); nothing to verify")
    problems = []
    for name in recorded if names is None else names:
        path, entry = checkpoint_dir / name, recorded[name]
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, expected {entry['size']}")
        elif crc32_of(path) != entry["crc32"]:
            problems.append(f"{name}: checksum {crc32_of(path)} does not match the recorded {entry['crc32']}")
    return problems


def verify_before_resume(checkpoint_dir: Path) -> None:
    """Every rank checks a share of the files; any problem anywhere stops every rank with a UserError."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    recorded = json.loads((checkpoint_dir / MANIFEST).read_text()).get("files")
    if recorded is None:
        log.info("%s records no checksums (saved by an older meshtron): resuming without verifying it", checkpoint_dir)
        return
    recorded = sorted(recorded)
    problems = find_problems(checkpoint_dir, recorded[rank::world])
    if distributed:
        everyone = [None] * world
        dist.all_gather_object(everyone, problems)
        problems = [p for part in everyone for p in part]
    if problems:
        raise UserError(f"checkpoint {checkpoint_dir} failed verification ({'; '.join(problems[:3])}); resume from "
                        "an earlier checkpoint (checkpoint.resume = PATH) or skip the check with "
                        "checkpoint.verify = false")
