"""Input discovery, splitting line files between workers, and record streams."""

import json

import pytest

from meshtron.data.sources import discover, plan_units, read_unit, split_units
from meshtron.errors import UserError


def read_all(units):
    return [(str(where), record, error) for unit in units for where, record, error in read_unit(unit)]


def test_split_line_file_keeps_every_line_once_with_its_number(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": "x" * (i % 300), "n": i}) for i in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    whole, _ = plan_units([str(path)], 1)
    units, _ = plan_units([str(path)], 4)
    assert len(whole) == 1 and len(units) >= 4
    assert units[0].first_line == 1 and all(u.first_line is None for u in units[1:])  # counted on demand
    assert read_all(units) == read_all(whole)
    wheres = [where for where, _, _ in read_all(units)]
    assert wheres == [f"{path}:{i}" for i in range(1, 3001)]
    groups = split_units(units, 4)
    assert len(groups) == 4 and [u for g in groups for u in g] == units
    sizes = [sum(u.size for u in g) for g in groups]
    assert max(sizes) < 1.5 * min(sizes)


def test_formats_and_directories(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}"} for i in range(5)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text(json.dumps(rows[:2]))
    (tmp_path / "d" / "b.txt").write_text("row 2\n\nrow 3\n")
    (tmp_path / "d" / "ignored.md").write_text("not data")
    table = pa.Table.from_pylist(rows[4:])
    pq.write_table(table, tmp_path / "d" / "c.parquet")
    with pa.ipc.new_file(str(tmp_path / "d" / "e.arrow"), table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(str(tmp_path / "d" / "f.arrow"), table.schema) as w:
        w.write_table(table)
    files = discover([str(tmp_path / "d")])
    assert [f.rsplit("/", 1)[1] for f in files] == ["a.json", "b.txt", "c.parquet", "e.arrow", "f.arrow"]
    units, empty = plan_units(files, 2)
    items = read_all(units)
    assert [r for _, r, _ in items] == rows + rows[4:] * 2
    assert [w.rsplit("/", 1)[1] for w, _, _ in items][:5] == [
        "a.json:record 1", "a.json:record 2", "b.txt:1", "b.txt:3", "c.parquet:row 1"]
    assert empty == []


def test_bad_lines_are_reported_not_raised(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": \n[1, 2]\n{"text": "caf\xe9"}\n')
    items = read_all(plan_units([str(path)], 1)[0])
    assert items[0][2] is None
    assert items[1][0].endswith(":2") and items[1][2].startswith("malformed JSON")
    assert items[2][2] == "expected a JSON object, got list"
    assert items[3][0].endswith(":4") and "not valid UTF-8 (byte 0xe9" in items[3][2]


def test_discover_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        discover([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="unsupported input type '.csv'"):
        discover([str(tmp_path / "x.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no input files"):
        discover([str(tmp_path / "empty")])


def test_json_array_errors_name_the_line(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n  {"text": "ok"},\n  {"text": "caf\xe9"}\n]\n')
    [(where, record, error)] = read_all(plan_units([str(path)], 1)[0])
    assert where == f"{path}:3" and record is None and error == "not valid UTF-8 (byte 0xe9 at column 16)"
    path.write_text('[\n  {"text": "ok"},\n  {"text": }\n]\n')
    [(where, _, error)] = read_all(plan_units([str(path)], 1)[0])
    assert where == f"{path}:3" and error.startswith("malformed JSON")
