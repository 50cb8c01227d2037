"""The indexed dataset writer, reader and shard merge (layout checked byte by byte)."""

import struct

import numpy as np
import pytest

from meshtron.data import indexed
from meshtron.errors import UserError


def write(prefix, documents, dtype=np.uint16):
    with indexed.IndexedWriter(prefix, dtype) as w:
        for doc in documents:
            w.add_document(doc)


def test_roundtrip_documents_and_sequences(tmp_path):
    docs = [[[1, 2, 3]], [[4], [5, 6]], [[7, 8, 9, 10]]]
    write(str(tmp_path / "d"), docs)
    ds = indexed.IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 4 and ds.num_documents == 3
    assert [ds[i].tolist() for i in range(4)] == [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    assert ds.document(1).tolist() == [4, 5, 6]
    assert list(ds.document_sequences(1)) == [1, 2]
    assert ds.get(3, offset=1, length=2).tolist() == [8, 9]
    assert ds.document_indices.tolist() == [0, 1, 3, 4]
    # zero-copy: a view into the memory map, not a copy
    assert not ds[0].flags.owndata


def test_index_layout_is_mmidx_v1(tmp_path):
    write(str(tmp_path / "d"), [[[1, 2, 3]], [[4, 5]]], dtype=np.int32)
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<Q", raw[9:17]) == (1,)
    assert raw[17] == 4  # int32
    n, d = struct.unpack("<QQ", raw[18:34])
    assert (n, d) == (2, 3)
    body = raw[34:]
    assert np.frombuffer(body[:8], np.int32).tolist() == [3, 2]
    assert np.frombuffer(body[8:24], np.int64).tolist() == [0, 12]  # byte pointers
    assert np.frombuffer(body[24:48], np.int64).tolist() == [0, 1, 2]
    assert len(body) == 48
    assert np.fromfile(tmp_path / "d.bin", np.int32).tolist() == [1, 2, 3, 4, 5]


def test_merge_appends_shards_in_order(tmp_path):
    write(str(tmp_path / "a"), [[[1, 2]], [[3]]])
    write(str(tmp_path / "b"), [[[4], [5, 6]]])
    with indexed.IndexedWriter(str(tmp_path / "m"), np.uint16) as w:
        w.merge(str(tmp_path / "a"))
        w.merge(str(tmp_path / "b"))
    m = indexed.IndexedDataset(str(tmp_path / "m"))
    assert [m.document(i).tolist() for i in range(m.num_documents)] == [[1, 2], [3], [4, 5, 6]]
    assert m.document_indices.tolist() == [0, 1, 2, 4]
    assert m.sequence_pointers.tolist() == [0, 4, 6, 8]


def test_writer_rejects_values_that_do_not_fit(tmp_path):
    with pytest.raises(AssertionError):
        write(str(tmp_path / "d"), [[[-100]]], dtype=np.uint16)
    assert not (tmp_path / "d.bin").exists()  # an aborted writer leaves nothing behind


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="no indexed dataset"):
        indexed.IndexedDataset(str(tmp_path / "missing"))
    (tmp_path / "bad.bin").write_bytes(b"")
    (tmp_path / "bad.idx").write_bytes(b"NOTMEGATRON" + bytes(40))
    with pytest.raises(UserError, match="bad.idx"):
        indexed.IndexedDataset(str(tmp_path / "bad"))


def test_token_dtype_follows_megatron():
    assert indexed.token_dtype(49152) is np.uint16
    assert indexed.token_dtype(128256) is np.int32
