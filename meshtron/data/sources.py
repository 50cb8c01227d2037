"""Input files: discovery, splitting into work units for parallel workers, and streaming records.

Formats, by extension:
    .jsonl / .ndjson   one JSON object per line
    .json              a JSON array of objects (read whole), or JSON lines
    .txt               one document per line, as the field "text" (blank lines ignored)
    .parquet           rows (read one row group at a time)
    .arrow             Arrow IPC file or stream (HF `datasets` cache files), rows

Line-based files larger than a worker's share are split at line boundaries, so
several workers can read one big file. A piece counts the lines before it only
when a message must name a line (an error), so splitting costs no pass over the
data. Everything is streamed: memory does not grow with the size of the input.
"""

import json
import os
from dataclasses import dataclass

from meshtron.errors import UserError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".txt": "txt", ".parquet": "parquet",
           ".arrow": "arrow"}
LINE_FORMATS = ("jsonl", "txt")
_BLOCK = 16 << 20
# Line files are cut into pieces of at most MAX_PIECE (progress advances a piece at a time)
# and at least MIN_PIECE (below it, a worker's start-up costs more than it saves).
MIN_PIECE = 64 << 10
MAX_PIECE = 8 << 20


@dataclass
class Unit:
    """A contiguous piece of one input file: byte range (line formats) or row-group/batch range."""

    path: str
    fmt: str
    start: int
    stop: int
    first_line: int | None  # 1-based line (line formats) or row of the first record; None: not counted yet
    size: int  # bytes, for balancing work between workers

    def start_line(self) -> int:
        if self.first_line is None:
            self.first_line = 1 + _count_newlines(self.path, 0, self.start)
        return self.first_line


class LineLocation:
    """`path:line` of a record; formatting it may count the lines before its piece of the file."""

    __slots__ = ("unit", "offset")

    def __init__(self, unit: Unit, offset: int) -> None:
        self.unit, self.offset = unit, offset

    def __str__(self) -> str:
        return f"{self.unit.path}:{self.unit.start_line() + self.offset}"


def input_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise UserError(f"{path}: unsupported input type {ext or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[ext]


def discover(paths: list[str]) -> list[str]:
    """Expand directories (recursively, sorted, known extensions only) into input files."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if os.path.splitext(name)[1].lower() in FORMATS
            )
            if not found:
                raise UserError(f"{path}: directory holds no input files ({', '.join(FORMATS)})")
            files += found
        elif os.path.isfile(path):
            input_format(path)
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    return files


def _line_units(path: str, fmt: str, size: int, piece: int) -> list[Unit]:
    """Split a line file into pieces of about `piece` bytes, cut after a newline."""
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + piece < size:
            f.seek(cuts[-1] + piece)
            f.readline()
            if f.tell() >= size:
                break
            cuts.append(f.tell())
    cuts.append(size)
    return [Unit(path, fmt, start, stop, 1 if start == 0 else None, stop - start)
            for start, stop in zip(cuts, cuts[1:])]


def _count_newlines(path: str, start: int, stop: int) -> int:
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        while f.tell() < stop:
            count += f.read(min(_BLOCK, stop - f.tell())).count(b"\n")
    return count


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UserError("reading .parquet or .arrow input needs pyarrow: pip install pyarrow") from None
    return pyarrow, pyarrow.parquet


def _row_units(path: str, fmt: str, size: int) -> list[Unit]:
    pa, pq = _import_pyarrow()

    if fmt == "parquet":
        meta = pq.ParquetFile(path).metadata
        rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    else:
        try:
            reader = pa.ipc.open_file(path)
            rows = [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:
            # A stream cannot be seeked into: it is read as one unit.
            return [Unit(path, fmt, 0, -1, 1, size)]
    total = max(sum(rows), 1)
    units, first = [], 1
    for i, n in enumerate(rows):
        units.append(Unit(path, fmt, i, i + 1, first, size * n // total))
        first += n
    return units


def plan_units(files: list[str], num_parts: int) -> tuple[list[Unit], list[str]]:
    """Work units over all files in input order, and the files found empty."""
    sizes = {path: os.path.getsize(path) for path in files}
    piece = min(max(sum(sizes.values()) // max(num_parts, 1), MIN_PIECE), MAX_PIECE)
    units, empty = [], []
    for path in files:
        fmt = input_format(path)
        if sizes[path] == 0:
            empty.append(path)
        elif fmt in LINE_FORMATS:
            units += _line_units(path, fmt, sizes[path], piece)
        elif fmt == "json":
            units.append(Unit(path, fmt, 0, sizes[path], 1, sizes[path]))
        else:
            _import_pyarrow()
            try:
                units += _row_units(path, fmt, sizes[path])
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise UserError(f"{path}: cannot read as {fmt}: {e}") from None
    return units, empty


def split_units(units: list[Unit], num_parts: int) -> list[list[Unit]]:
    """Contiguous groups of units of about equal size (fewer groups if there are fewer units)."""
    total = sum(u.size for u in units) or 1
    groups, current, done = [], [], 0
    for unit in units:
        current.append(unit)
        done += unit.size
        if done * num_parts >= total * (len(groups) + 1) and len(groups) < num_parts - 1:
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


# A record stream yields (where, record, error): where formats as "path:line" (or row/record) with str();
# record is a dict, or None with the reason in error.


def _parse_json_line(raw: bytes):
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON: {e.msg} at column {e.colno}"
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    return record, None


def _read_lines(unit: Unit):
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        position = unit.start
        for offset, raw in enumerate(f):
            if position >= unit.stop:
                break
            position += len(raw)
            where = LineLocation(unit, offset)
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if unit.fmt == "jsonl":
                record, error = _parse_json_line(raw)
                yield where, record, error
            else:
                try:
                    yield where, {"text": raw.decode("utf-8")}, None
                except UnicodeDecodeError as e:
                    yield where, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"


def _read_json(unit: Unit):
    with open(unit.path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_lines(Unit(unit.path, "jsonl", unit.start, unit.stop, 1, unit.size))
        return
    with open(unit.path, "rb") as f:
        data = f.read()
    try:
        records = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        yield f"{unit.path}:{line}", None, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at column {column})"
        return
    except json.JSONDecodeError as e:
        yield f"{unit.path}:{e.lineno}", None, f"malformed JSON: {e.msg} at column {e.colno}"
        return
    if not isinstance(records, list):
        yield f"{unit.path}:1", None, f"expected a JSON array of objects, got {type(records).__name__}"
        return
    for n, record in enumerate(records, 1):
        where = f"{unit.path}:record {n}"
        if isinstance(record, dict):
            yield where, record, None
        else:
            yield where, None, f"expected a JSON object, got {type(record).__name__}"


def _read_rows(unit: Unit):
    pa, pq = _import_pyarrow()

    if unit.fmt == "parquet":
        batches = pq.ParquetFile(unit.path).iter_batches(row_groups=range(unit.start, unit.stop))
    elif unit.stop < 0:
        batches = iter(pa.ipc.open_stream(unit.path))
    else:
        reader = pa.ipc.open_file(unit.path)
        batches = (reader.get_batch(i) for i in range(unit.start, unit.stop))
    row = unit.first_line
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{unit.path}:row {row}", record, None
            row += 1


def read_unit(unit: Unit):
    if unit.fmt in LINE_FORMATS:
        return _read_lines(unit)
    if unit.fmt == "json":
        return _read_json(unit)
    return _read_rows(unit)
