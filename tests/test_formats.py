"""--format jsonl|csv|parquet and --output: the merged records, atomically, in each format."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from conftest import make_tree, run_cli

FILES = {
    "a.txt": "one two\n",
    "b/c.txt": "x\ny\n",
    "d.csv": "id,amount,category\n1,2.5,books\n2,4,music\n",
}


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    tree = make_tree(tmp_path / "data", FILES)
    (tree / b"caf\xe9.txt".decode("utf-8", "surrogateescape")).write_bytes(b"latin-1 name\n")
    return tree


def test_csv_format_has_the_union_of_keys_in_first_seen_order(data, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert not (out / "merged.jsonl").exists()
    text = (out / "merged.csv").read_bytes().decode("utf-8")  # valid UTF-8 even for a Latin-1 name
    rows = list(csv.DictReader(text.splitlines()))
    assert list(rows[0]) == ["path", "lines", "words", "bytes"]
    assert [r["path"] for r in rows] == ["a.txt", "b/c.txt", "caf\\udce9.txt", "d.csv"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reduced"]["files"] == 4  # the reducer still ran


def test_csv_format_with_records_of_different_shapes(tmp_path):
    data = make_tree(tmp_path / "data", {"a.csv": "id,amount\n1,2\n", "b.csv": "id,name\n1,x\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "-p", "csv-stats", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((out / "merged.csv").read_text().splitlines()))
    assert [r["path"] for r in rows] == ["a.csv", "b.csv"]
    assert json.loads(rows[0]["columns"])["amount"]["sum"] == 2  # nested values as JSON text


def test_parquet_format_matches_the_jsonl_records(data, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    jsonl_out, parquet_out = tmp_path / "j", tmp_path / "p"
    assert run_cli("run", str(data), "-o", str(jsonl_out), "-w", "1", "-q").returncode == 0
    result = run_cli("run", str(data), "-o", str(parquet_out), "-w", "1", "-q", "--format", "parquet")
    assert result.returncode == 0, result.stderr
    table = pq.read_table(parquet_out / "merged.parquet").to_pylist()
    expected = records_of(jsonl_out)
    expected[2]["path"] = "caf\\udce9.txt"
    assert table == expected


def test_output_file_elsewhere_and_no_temp_left(data, tmp_path):
    target = tmp_path / "exports" / "all.jsonl"
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "2", "-q", "--output", str(target))
    assert result.returncode == 0, result.stderr
    assert len(target.read_text().splitlines()) == 4
    assert not (out / "merged.jsonl").exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]


def test_merge_command_writes_another_format(data, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-w", "1", "-q").returncode == 0
    result = run_cli("merge", "-o", str(out), "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert (out / "merged.csv").read_text().splitlines()[0] == "path,lines,words,bytes"


# -- Parquet, streamed -------------------------------------------------------------------

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_parquet_streams_blocks_into_row_groups_and_widens(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import crawlproc.parquet as parquet_mod

    monkeypatch.setattr(parquet_mod, "BLOCK_BYTES", 64)  # a few records per block
    records = [{"path": f"f{i}", "n": i, "s": {"a": i}} for i in range(20)]
    records += [{"path": "late", "n": 2.5, "s": {"a": 1, "b": "x"}, "new": [1, 2]},  # widen n, s; add new
                {"path": "when", "n": 3, "stamp": "2024-01-01T00:00:00"}]  # a string stays a string
    target = tmp_path / "out.parquet"
    parquet_mod.write_parquet(write_jsonl(tmp_path / "m.jsonl", records), target, lambda n: f"task of {n}")
    parquet = pq.ParquetFile(target)
    assert parquet.metadata.num_row_groups > 1
    rows = parquet.read().to_pylist()
    assert [r["path"] for r in rows] == [r["path"] for r in records]
    assert parquet.schema_arrow.field("n").type == "double" and rows[3]["n"] == 3.0 and rows[20]["n"] == 2.5
    assert rows[0]["s"] == {"a": 0, "b": None} and rows[20]["s"] == {"a": 1, "b": "x"}
    assert rows[0]["new"] is None and rows[20]["new"] == [1, 2]
    assert rows[21]["stamp"] == "2024-01-01T00:00:00" and rows[21]["s"] is None


def test_parquet_of_a_block_arrow_refuses_keeps_every_field(tmp_path):
    # A lone surrogate (a name that is not UTF-8) makes pyarrow.json refuse the block: Python
    # reads it, and the fields only later records have must not be dropped on that path either.
    import pyarrow.parquet as pq

    from crawlproc.parquet import write_parquet

    records = [{"path": "a"}, {"path": "b\udcff", "w": 2.5}, {"path": "c", "s": {"x": 1}}]
    target = tmp_path / "out.parquet"
    write_parquet(write_jsonl(tmp_path / "m.jsonl", records), target, str)
    assert pq.read_table(target).to_pylist() == [{"path": "a", "w": None, "s": None},
                                                  {"path": "b\\udcff", "w": 2.5, "s": None},
                                                  {"path": "c", "w": None, "s": {"x": 1}}]


def test_parquet_of_no_records(tmp_path):
    import pyarrow.parquet as pq

    from crawlproc.parquet import write_parquet

    target = tmp_path / "out.parquet"
    write_parquet(write_jsonl(tmp_path / "m.jsonl", []), target, str)
    assert pq.read_table(target).num_rows == 0


def test_parquet_record_that_does_not_fit_names_its_task(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "1\n", "b.txt": "x\n", "c.txt": "3\n"})
    proc = tmp_path / "proc.py"
    proc.write_text("def kind(task):\n"
                    "    text = task.read_bytes().strip().decode()\n"
                    "    return {'path': task.relpath, 'v': int(text) if text.isdigit() else {'text': text}}\n")
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", f"{proc}:kind", "-w", "1", "-q", "--format", "parquet")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "cannot write Parquet: record 2 (task" in message and "b.txt)" in message, message
    assert "use --format jsonl or csv" in message
    assert not (out / "merged.parquet").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".merged")]  # no temp left


def test_parquet_conflict_in_a_later_block_names_that_record(tmp_path, monkeypatch):
    import crawlproc.parquet as parquet_mod

    monkeypatch.setattr(parquet_mod, "BLOCK_BYTES", 64)
    records = [{"v": i} for i in range(30)] + [{"v": "text"}] + [{"v": 1}] * 5
    with pytest.raises(parquet_mod.ParquetSchemaError, match=r"record 31 \(the task of record 30\)"):
        parquet_mod.write_parquet(write_jsonl(tmp_path / "m.jsonl", records), tmp_path / "out.parquet",
                                  lambda n: f"the task of record {n}")


def run_to_parquet(tmp_path: Path, record: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A run over a.txt and b.txt into OUT, --format parquet, whose processor returns `record` (an expression)."""
    data = make_tree(tmp_path / "data", {"a.txt": "1\n", "b.txt": "2\n"})
    proc = tmp_path / "proc.py"
    proc.write_text(f"def proc(task):\n    return {record}\n")
    out = tmp_path / "out"
    return run_cli("run", str(data), "-o", str(out), "-p", f"{proc}:proc", "-w", "1", "-q", "--format", "parquet"), out


def test_parquet_of_a_field_that_is_always_an_empty_object(tmp_path):
    # Parquet has no struct without fields: such a field is a column of nulls, at any depth.
    import pyarrow.parquet as pq

    empty_inside = "{'path': task.relpath, 'meta': {}, 'deep': {'e': {}, 'n': 1}, 'many': [{}]}"
    result, out = run_to_parquet(tmp_path, empty_inside)
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out / "merged.parquet").to_pylist() == [
        {"path": p, "meta": None, "deep": {"e": None, "n": 1}, "many": [None]} for p in ("a.txt", "b.txt")]
    assert not [p.name for p in out.iterdir() if p.name.startswith(("ledger.db-", ".merged"))]


def test_parquet_struct_empty_in_one_block_gets_the_fields_of_another(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import crawlproc.parquet as parquet_mod

    monkeypatch.setattr(parquet_mod, "BLOCK_BYTES", 64)
    records = [{"m": {}, "s": {"e": {}}} for _ in range(10)] + [{"m": {"x": 1}, "s": {"e": {"y": "z"}}}]
    records += [{"m": {}, "s": {"e": {}}, "l": [{}]}, {"m": {}, "s": {"e": {}}, "l": [{"k": 2}]}]
    target = tmp_path / "out.parquet"
    parquet_mod.write_parquet(write_jsonl(tmp_path / "m.jsonl", records), target, str)
    rows = pq.read_table(target).to_pylist()
    assert rows[0] == {"m": {"x": None}, "s": {"e": {"y": None}}, "l": None}
    assert rows[10] == {"m": {"x": 1}, "s": {"e": {"y": "z"}}, "l": None}
    assert rows[11]["l"] == [{"k": None}] and rows[12]["l"] == [{"k": 2}]


def test_parquet_refuses_an_integer_beyond_64_bits_naming_field_and_record(tmp_path):
    result, out = run_to_parquet(tmp_path, "{'path': task.relpath, 'n': 2**70 if task.relpath == 'b.txt' else 1.5}")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message == ("crawlproc: cannot write Parquet: record 2 (task 2, b.txt) has an integer beyond 64 bits "
                       "in field 'n' (1180591620717411303424), which Parquet cannot hold; use --format jsonl or csv")
    assert not [p.name for p in out.iterdir() if p.name.startswith(("ledger.db-", ".merged", "merged"))]


@pytest.mark.parametrize("name", ["plain", "not UTF-8\udcff"])  # read by pyarrow.json, or by Python
def test_parquet_integer_beyond_64_bits_in_a_nested_field(tmp_path, name):
    from crawlproc.parquet import ParquetSchemaError, write_parquet

    records = [{"name": name, "m": {"sizes": [1, 2**63 - 1]}}, {"name": name, "m": {"sizes": [0.5, -2**63 - 1]}}]
    expected = (r"^cannot write Parquet: record 2 \(the task of record 1\) has an integer beyond 64 bits "
                r"in field 'm.sizes\[1\]' \(-9223372036854775809\), which Parquet cannot hold")
    with pytest.raises(ParquetSchemaError, match=expected):
        write_parquet(write_jsonl(tmp_path / "m.jsonl", records), tmp_path / "out.parquet",
                      lambda n: f"the task of record {n}")


def test_parquet_keeps_large_numbers_that_fit(tmp_path):
    import pyarrow.parquet as pq

    from crawlproc.parquet import write_parquet

    records = [{"ns": 1_700_000_000_123_456_789, "ends": [2**63 - 1, -2**63], "x": 1e20, "id": "1" * 30},
               {"ns": 1_700_000_000_123_456_790, "ends": [0], "x": 0.5, "id": "2"}]
    write_parquet(write_jsonl(tmp_path / "m.jsonl", records), tmp_path / "out.parquet", str)
    assert pq.read_table(tmp_path / "out.parquet").to_pylist() == records
