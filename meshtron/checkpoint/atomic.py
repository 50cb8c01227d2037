"""Writing outputs: never over something by surprise (`check_output`), and a directory so that
readers see either the old complete one or the new complete one (`atomic_directory`)."""

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from meshtron.errors import UserError


def check_output(output: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = (), force: bool = False,
                 existing: list[Path] | None = None, flag: str = "--output") -> None:
    """Refuse an output that is, contains or lies inside one of `inputs` (always), and one that
    already holds something (unless `force`): a non-empty directory or a file at `output`, or the
    `existing` files the caller names (a prefix's files). The one rule of every command that writes."""
    out = Path(output).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or out.is_relative_to(src) or src.is_relative_to(out):
            raise UserError(f"{flag} {output} is, contains or lies inside the input {given}; "
                            "write outside the input")
    if existing is None:
        existing = [out] if out.is_file() or (out.is_dir() and any(out.iterdir())) else []
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UserError(f"{flag} {output}: {shown} already exists and would be replaced; choose another output, "
                        "or pass --force to replace it")


def _apply_umask(root: Path) -> None:
    """Give `root` and what it holds the modes of ordinary new files: mkdtemp makes the directory
    private (0700) and safetensors writes its files 0600, where every other tool follows the umask."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for path in root.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(output_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir`; when the block completes it takes the place
    of `output_dir` (an existing one is moved aside first and removed only after the swap). On
    error or interruption the temporary directory is removed and `output_dir` is left as it was."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        old = None
        if output_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, old / "dir")
        os.replace(tmp, output_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
