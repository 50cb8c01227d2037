"""Megatron-compatible indexed dataset: a `.bin` file of tokens and an `.idx` index.

The layout is Megatron-LM's `IndexedDataset` (MMIDIDX, version 1), byte for byte:

    .idx  header b"MMIDIDX\\x00\\x00", version <Q = 1, dtype code <B,
          sequence count <Q, document count <Q,
          sequence lengths int32[S], sequence byte pointers int64[S],
          document indices int64[D]  (sequence index where each document ends, starting with 0)
    .bin  the tokens of every sequence, back to back, in the index dtype

A document is one or more sequences. meshtron writes one sequence per document,
except for packed SFT data, where a document is a pack and its sequences are the
samples inside it (so sample boundaries stay recoverable from the index alone).

`IndexedWriter` streams sequences to disk and keeps only the small index in memory;
`IndexedWriter.merge` appends whole datasets written by parallel workers;
`IndexedDataset` memory-maps both files and returns zero-copy numpy views.
"""

import os
import shutil
import struct
from array import array

import numpy as np

from meshtron.errors import UserError

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """The dtype Megatron picks for token ids: uint16 below 65500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def exists(prefix: str) -> bool:
    return os.path.isfile(bin_path(prefix)) and os.path.isfile(idx_path(prefix))


class IndexedWriter:
    """Writes `prefix.bin` and, on `finalize()`, `prefix.idx`.

    Use as a context manager: an exception removes the partial files.
    """

    def __init__(self, prefix: str, dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        assert self.dtype in CODE_OF_DTYPE, f"unsupported dtype {self.dtype}"
        # array() keeps the index compact (4 or 8 bytes per entry) for corpora of many documents.
        self._lengths = array("i")
        self._document_indices = array("q", [0])
        self._bin = open(bin_path(prefix), "wb")

    @property
    def num_sequences(self) -> int:
        return len(self._lengths)

    def add_sequence(self, tokens) -> None:
        """Append one sequence to the current document (close it with `end_document`)."""
        tokens = np.asarray(tokens)
        # A cast that changes a value (e.g. -100 into uint16) would corrupt the data silently.
        cast = tokens.astype(self.dtype, copy=False)
        assert tokens.size == 0 or np.array_equal(cast, tokens), f"values do not fit {self.dtype}"
        self._bin.write(np.ascontiguousarray(cast).tobytes())
        self._lengths.append(int(tokens.size))

    def end_document(self) -> None:
        self._document_indices.append(len(self._lengths))

    def add_document(self, sequences) -> None:
        """Append a document made of one or more sequences."""
        for tokens in sequences:
            self.add_sequence(tokens)
        self.end_document()

    def merge(self, prefix: str) -> None:
        """Append every document of the indexed dataset at `prefix` (same dtype)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"cannot merge {prefix} ({other.dtype}) into {self.prefix} ({self.dtype})")
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._document_indices.extend((other.document_indices[1:] + offset).tolist())
        other.close()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, 16 << 20)

    def finalize(self) -> None:
        """Close the `.bin` and write the `.idx`."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        with open(idx_path(self.prefix), "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self._document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(np.frombuffer(self._document_indices, dtype=np.int64).tobytes())

    def abort(self) -> None:
        self._bin.close()
        remove(self.prefix)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def remove(prefix: str) -> None:
    """Delete `prefix.bin` and `prefix.idx` where they exist."""
    for path in (bin_path(prefix), idx_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


def rename(src_prefix: str, dst_prefix: str) -> None:
    """Move a finished dataset into place; the `.idx` goes last so a half-moved pair is never readable."""
    os.replace(bin_path(src_prefix), bin_path(dst_prefix))
    os.replace(idx_path(src_prefix), idx_path(dst_prefix))


class IndexedDataset:
    """Memory-mapped reader; `ds[i]` is a zero-copy numpy view of sequence i."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        path = idx_path(prefix)
        if not exists(prefix):
            raise UserError(f"no indexed dataset at {prefix} (expected {prefix}.bin and {prefix}.idx)")
        with open(path, "rb") as f:
            header = f.read(len(INDEX_HEADER))
            if header != INDEX_HEADER:
                raise UserError(f"{path} is not a Megatron indexed dataset index (bad header {header!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != INDEX_VERSION:
                raise UserError(f"{path}: index version {version} is not supported (only {INDEX_VERSION})")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in DTYPE_CODES:
                raise UserError(f"{path}: unknown dtype code {code}")
            self.dtype = np.dtype(DTYPE_CODES[code])
            num_sequences, num_document_indices = struct.unpack("<QQ", f.read(16))
            offset = f.tell()
        self._idx = np.memmap(path, mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(self._idx, np.int32, num_sequences, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(self._idx, np.int64, num_sequences, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(self._idx, np.int64, num_document_indices, offset)
        if os.path.getsize(bin_path(prefix)) == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bin_path(prefix), mode="r", dtype=self.dtype)
        assert self.document_indices[-1] == num_sequences, f"{path}: document index does not end at {num_sequences}"

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def _start(self, sequence: int) -> int:
        return int(self.sequence_pointers[sequence]) // self.dtype.itemsize

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range ({len(self)} sequences)")
        i %= len(self)
        start = self._start(i)
        return self.tokens[start : start + int(self.sequence_lengths[i])]

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """A slice of sequence i, without reading the rest of it."""
        seq = self[i]
        end = len(seq) if length is None else offset + length
        return seq[offset:end]

    def document_sequences(self, doc: int) -> range:
        """The sequence indices of document `doc`."""
        return range(int(self.document_indices[doc]), int(self.document_indices[doc + 1]))

    def document(self, doc: int) -> np.ndarray:
        """All tokens of document `doc` (its sequences are contiguous in the `.bin`)."""
        seqs = self.document_sequences(doc)
        if len(seqs) == 0:
            return self.tokens[:0]
        start = self._start(seqs.start)
        return self.tokens[start : start + int(self.sequence_lengths[seqs.start : seqs.stop].sum())]

    def close(self) -> None:
        # Dropping the memmaps lets the files be renamed or deleted (matters on some filesystems).
        self.sequence_lengths = self.sequence_pointers = self.document_indices = None
        self.tokens = self._idx = None
