"""The built-in processors csv-stats, jsonl-count and cmd, and processor plugins (entry points).

The central property: whatever the byte ranges a file is cut into (mid-line,
lines longer than a range, CRLF, no final newline), the reducer over the
records of all ranges equals the reducer over the whole file's record, exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crawlproc.processors.command as command_mod
import crawlproc.processors.csv_read as csv_read
from conftest import REPO, make_tree, query_ledger, run_cli
from crawlproc.errors import ProcessorLoadError, TaskFailed, UsageError
from crawlproc.processors import BUILTINS, describe_builtins
from crawlproc.processors.base import load, normalise_spec
from crawlproc.processors.command import CommandFailed, build_argv, check_template, run_command
from crawlproc.processors.csv_stats import csv_stats, csv_totals
from crawlproc.processors.jsonl_count import jsonl_count, jsonl_totals
from crawlproc.task import Span, Task


# -- helpers --------------------------------------------------------------------

def whole(path: Path, **params: str) -> Task:
    return Task(1, str(path), path.name, params=params)


def ranged(path: Path, cuts: list[int], **params: str) -> list[Task]:
    """Tasks for [0, c1), [c1, c2), ..., [ck, size): cut points anywhere, mid-line included."""
    size = path.stat().st_size
    edges = [0, *sorted(set(c for c in cuts if 0 < c < size)), size]
    return [Task(i, str(path), path.name, start, end - start, params)
            for i, (start, end) in enumerate(zip(edges, edges[1:]))]


def cut_sets(size: int, seed: int = 7) -> list[list[int]]:
    """Many ways to cut a file: fixed chunk sizes (tiny ones too) and random cut points."""
    rng = random.Random(seed)
    steps = (1, 2, 3, 5, 7, 16, 41, 100, 1000) if size <= 1500 else (7, 16, 41, 100, 1000)
    sets = [list(range(step, size, step)) for step in steps if step < size]
    sets += [sorted(rng.sample(range(1, size), min(size - 1, k))) for k in (1, 2, 5, 20) if size > 1]
    return sets or [[]]


def json_roundtrip(record: dict) -> dict:
    """What the reducer sees: the record as written to and read back from merged.jsonl."""
    return json.loads(json.dumps(record, allow_nan=False))


def reduce_csv(tasks: list[Task]) -> dict:
    return csv_totals(json_roundtrip(csv_stats(t)) for t in tasks)


def assert_same(a, b):
    """Equal, with the same int/float types (1 == 1.0 would hide a type change)."""
    assert a == b
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few bytes, so that every file spans many blocks (and a long row, several)."""
    monkeypatch.setattr(csv_read, "BLOCK_SIZE", 37)


# -- a reference csv-stats: the csv module row by row, exact sums with Fraction ----------

_NUM = re.compile(r"[ \t\n\x0b\x0c\r]*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[ \t\n\x0b\x0c\r]*")
_INT = re.compile(r"[ \t\n\x0b\x0c\r]*[-+]?[0-9]+[ \t\n\x0b\x0c\r]*")


def reference(path: Path, group_by: str | None = None, delimiter: str = ",") -> dict:
    import csv

    raw_lines = _split_nl(path.read_bytes())
    if not raw_lines:
        return {"header": None}
    lines = [line.decode("utf-8", "replace") for line in raw_lines]
    header = next(csv.reader([lines[0].removeprefix("\ufeff")], delimiter=delimiter), [])
    n = len(header)
    g = header.index(group_by) if group_by else None
    groups: dict = {}
    rows = malformed = 0
    for line in lines[1:]:
        try:
            parsed = list(csv.reader([line], delimiter=delimiter))
        except csv.Error:
            malformed += 1
            continue
        row = parsed[0] if parsed else []
        if not row:
            continue
        if len(row) != n or n == 0:
            malformed += 1
            continue
        rows += 1
        key = row[g] if g is not None else None
        grp = groups.setdefault(key, {"rows": 0, "columns": {}})
        grp["rows"] += 1
        for j, value in enumerate(row):
            if j == g or not _NUM.fullmatch(value):
                continue
            if _INT.fullmatch(value):
                try:
                    number = int(value)
                except ValueError:  # beyond int()'s digit limit: not a number
                    continue
            else:
                number = float(value)
                if not math.isfinite(number):
                    continue
            col = grp["columns"].setdefault(header[j], {"count": 0, "sum": Fraction(0), "min": None,
                                                       "max": None, "float": False})
            col["count"] += 1
            col["sum"] += Fraction(number)
            col["float"] |= isinstance(number, float)
            col["min"] = number if col["min"] is None or number < col["min"] else col["min"]
            col["max"] = number if col["max"] is None or number > col["max"] else col["max"]

    def finish(cols):
        out = {}
        for name, c in cols.items():
            if c["float"]:
                out[name] = {"count": c["count"], "sum": None, "min": float(c["min"]) + 0.0,
                             "max": float(c["max"]) + 0.0}
                try:
                    out[name]["sum"] = float(c["sum"])
                except OverflowError:  # past the float range: no sum, and a flag that says so
                    out[name]["overflow"] = True
            else:
                out[name] = {"count": c["count"], "sum": int(c["sum"]), "min": c["min"], "max": c["max"]}
        return out

    result = {"rows": rows, "malformed": malformed}
    if group_by:
        result["groups"] = {k: {"rows": v["rows"], "columns": finish(v["columns"])}
                            for k, v in sorted(groups.items())}
    else:
        result["columns"] = finish(groups[None]["columns"]) if None in groups else {}
    return result


def _split_nl(line: bytes) -> list[bytes]:
    """Lines ending at \n only (bytes.splitlines would also split at \r, \x0b, ...)."""
    out, start = [], 0
    while (i := line.find(b"\n", start)) != -1:
        out.append(line[start:i + 1])
        start = i + 1
    if start < len(line):
        out.append(line[start:])
    return out


def comparable(reduced: dict) -> dict:
    keep = {k: reduced[k] for k in ("rows", "malformed")}
    for k in ("columns", "groups"):
        if k in reduced:
            keep[k] = reduced[k]
    return keep


# -- csv-stats --------------------------------------------------------------------

SALES = (
    "id,user,amount,category,ts\n"
    "1,ann,12.50,books,1700000000\n"
    "2,bob,3,toys,1700000001\n"
    "3,cy,,books,1700000002\n"
    "4,dee,7.25,garden,1700000003\n"
    "5,ed,n/a,toys,1700000004\n"
    "6,flo,100,books,1700000005\n"
)


def test_csv_stats_whole_file(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text(SALES)
    record = csv_stats(whole(path))
    assert record["path"] == "sales.csv" and record["offset"] == 0
    assert record["rows"] == 6 and record["malformed"] == 0
    cols = record["columns"]
    assert set(cols) == {"id", "amount", "ts"}  # user and category have no numeric value
    assert cols["id"] == {"count": 6, "sum": 21, "min": 1, "max": 6}
    assert isinstance(cols["id"]["sum"], int)
    amount = cols["amount"]
    assert (amount["count"], amount["sum"], amount["min"], amount["max"]) == (4, 122.75, 3.0, 100.0)
    assert isinstance(amount["min"], float)  # a float column reports floats
    assert cols["ts"]["sum"] == 6 * 1700000000 + 15


def test_csv_stats_group_by(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text(SALES)
    record = csv_stats(whole(path, group_by="category"))
    assert record["group_by"] == "category"
    groups = record["groups"]
    assert list(groups) == ["books", "garden", "toys"]
    assert groups["books"]["rows"] == 3
    assert groups["books"]["columns"]["amount"] == {"count": 2, "sum": 112.5, "min": 12.5, "max": 100.0}
    # toys: "3" and "n/a": one integer literal only, so an exact int
    assert groups["toys"]["columns"]["amount"] == {"count": 1, "sum": 3, "min": 3, "max": 3}
    assert "category" not in groups["books"]["columns"]
    reduced = csv_totals([json_roundtrip(record)])
    assert reduced["rows"] == 6 and reduced["files"] == 1
    assert reduced["groups"]["garden"]["columns"]["amount"]["sum"] == 7.25


def test_csv_stats_group_by_missing_column_fails_the_task(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text(SALES)
    with pytest.raises(TaskFailed, match="group_by column 'nope'"):
        csv_stats(whole(path, group_by="nope"))
    text = tmp_path / "notes.txt"  # not a CSV: its first line is all the header there is
    text.write_text("x" * 5000 + "," + ",".join(f"c{i}" for i in range(30)) + "\n")
    with pytest.raises(TaskFailed) as failed:
        csv_stats(whole(text, group_by="category"))
    message = str(failed.value)
    assert len(message) < 600 and "'" + "x" * 40 + "...'" in message and message.endswith(" and 19 more"), message


def test_csv_stats_malformed_rows_are_counted_with_samples(tmp_path):
    path = tmp_path / "bad.csv"
    content = "a,b,c\n1,2,3\n4,5\n\n6,7,8,9\n10,11,12\n13,\"x\ry\",14\n"
    path.write_bytes(content.encode())
    record = csv_stats(whole(path))
    assert record["rows"] == 3  # 1,2,3 / 10,11,12 / 13,"x\ry",14 (a quoted CR is data)
    assert record["malformed"] == 2
    samples = record["malformed_samples"]
    assert [s["line"] for s in samples] == [3, 5]
    assert [s["offset"] for s in samples] == [content.index("4,5"), content.index("6,7,8,9")]
    assert "2 fields, expected 3" in samples[0]["error"]
    assert record["columns"]["a"] == {"count": 3, "sum": 24, "min": 1, "max": 13}


def test_csv_stats_csv_errors_count_as_malformed(tmp_path):
    path = tmp_path / "cr.csv"
    content = b"a,b\n1,2\n3\r4,5\n6,7\n"  # a lone CR inside an unquoted field
    path.write_bytes(content)
    record = csv_stats(whole(path))
    assert record["malformed"] == 1
    assert record["rows"] == 2
    assert record["malformed_samples"][0]["offset"] == content.index(b"3\r4")
    assert record["malformed_samples"][0]["error"].startswith("csv:")


def test_csv_stats_range_mid_file_reads_the_header(tmp_path):
    path = tmp_path / "sales.csv"
    path.write_text(SALES)
    offset = SALES.index("4,dee")
    task = Task(1, str(path), "sales.csv", offset, len(SALES) - offset)
    record = csv_stats(task)
    assert record["offset"] == offset
    assert record["rows"] == 3
    assert record["columns"]["id"] == {"count": 3, "sum": 15, "min": 4, "max": 6}
    first = Task(2, str(path), "sales.csv", 0, offset)
    assert csv_stats(first)["rows"] == 3  # the header is not a row


def test_csv_stats_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    assert csv_stats(whole(empty)) == {"path": "empty.csv", "offset": 0, "rows": 0, "malformed": 0,
                                       "columns": {}}
    only = tmp_path / "only.csv"
    only.write_bytes(b"a,b")
    record = csv_stats(whole(only, group_by="a"))
    assert record["rows"] == 0 and record["groups"] == {}


def test_csv_stats_values_that_are_not_numbers(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text("v\n1_000\nnan\ninf\n-Infinity\n0x10\n1e999\n\n  \n 7 \n+2.5e1\n.5\n5.\n١٢\n"
                    + "1" * 5000 + "\n")
    record = csv_stats(whole(path))
    assert record["columns"]["v"] == {"count": 4, "sum": 37.5, "min": 0.5, "max": 25.0}
    assert record["rows"] == 13  # the blank line is skipped; "  " is a row without a number
    # the same values one group each (the many-groups path), and all in one group
    keyed = tmp_path / "keyed.csv"
    values = path.read_text().split("\n")[1:-1]
    keyed.write_text("k,v\n" + "".join(f"{r}-{i},{v}\n" for r in range(10) for i, v in enumerate(values) if v)
                     + "z,3\nz,4.5\n")
    reduced = csv_totals([json_roundtrip(csv_stats(whole(keyed, group_by="k")))])
    flat = csv_totals([json_roundtrip(csv_stats(whole(keyed)))])
    assert reduced["rows"] == flat["rows"] == 132
    counts = [g["columns"]["v"]["count"] for g in reduced["groups"].values() if "v" in g["columns"]]
    assert sum(counts) == flat["columns"]["v"]["count"] == 42
    assert reduced["groups"]["3-8"]["columns"]["v"] == {"count": 1, "sum": 7, "min": 7, "max": 7}
    assert reduced["groups"]["z"]["columns"]["v"] == {"count": 2, "sum": 7.5, "min": 3.0, "max": 4.5}
    assert "v" not in reduced["groups"]["3-1"]["columns"]
    assert_same(comparable(reduced), reference(keyed, "k"))


def test_csv_stats_big_integers_stay_exact(tmp_path):
    path = tmp_path / "big.csv"
    big = 2**70 + 1
    path.write_text(f"x,y\n{big},{big}\n1,0.5\n")
    cols = csv_stats(whole(path))["columns"]
    assert cols["x"]["sum"] == big + 1 and isinstance(cols["x"]["sum"], int)
    assert cols["y"]["sum"] == float(Fraction(big) + Fraction(1, 2))
    assert cols["y"]["max"] == float(big)


def test_csv_stats_float_sums_are_exactly_rounded(tmp_path):
    path = tmp_path / "f.csv"
    values = ["0.1"] * 10 + ["1e16", "1", "-1e16"]
    path.write_text("v\n" + "\n".join(values) + "\n")
    exact = sum(Fraction(float(v)) for v in values)
    record = csv_stats(whole(path))
    assert record["columns"]["v"]["sum"] == float(exact)
    assert math.fsum(record["columns"]["v"]["sum_parts"]) == float(exact)


def test_csv_stats_sum_parts_only_where_the_float_sum_is_not_exact(tmp_path):
    # As the README says: a record holds sum_parts only then; the totals hold none, and are exact.
    inexact, exact = tmp_path / "a.csv", tmp_path / "b.csv"
    inexact.write_text("amount\n0.1\n0.3\n")
    exact.write_text("amount\n0.5\n0.25\n")
    records = [json_roundtrip(csv_stats(whole(inexact))), json_roundtrip(csv_stats(whole(exact)))]
    assert records[0]["columns"]["amount"]["sum_parts"] == [0.4, -2.7755575615628914e-17]
    assert "sum_parts" not in records[1]["columns"]["amount"]
    total = sum(map(Fraction, (0.1, 0.3, 0.5, 0.25)))
    assert csv_totals(records)["columns"]["amount"] == {"count": 4, "sum": float(total), "min": 0.1, "max": 0.5}


def test_csv_stats_group_by_the_last_column(tmp_path):
    path = tmp_path / "last.csv"
    path.write_text("v,k\n1,a\n2,b\n3,a\n")
    record = csv_stats(whole(path, group_by="k"))
    assert record["groups"] == {"a": {"rows": 2, "columns": {"v": {"count": 2, "sum": 4, "min": 1, "max": 3}}},
                                "b": {"rows": 1, "columns": {"v": {"count": 1, "sum": 2, "min": 2, "max": 2}}}}
    path.write_text("v,k\r\n1,a\r\n2,b\r\n3,a")
    assert list(csv_stats(whole(path, group_by="k"))["groups"]) == ["a", "b"]


def test_csv_stats_rows_whose_widths_balance_out_are_still_malformed(tmp_path):
    path = tmp_path / "w.csv"
    path.write_text("a,b,c\n1,2\n3,4,5,6\n7,8,9\n")  # 2 + 4 fields = two rows' worth
    record = csv_stats(whole(path))
    assert (record["rows"], record["malformed"]) == (1, 2)
    assert record["columns"]["a"] == {"count": 1, "sum": 7, "min": 7, "max": 7}


def test_csv_stats_sum_overflow_is_reported_not_raised(tmp_path):
    path = tmp_path / "o.csv"
    path.write_text("x,k\n1e308,a\n1.5e308,a\n1,b\n")
    record = csv_stats(whole(path))
    assert record["columns"]["x"]["sum"] is None and record["columns"]["x"]["overflow"] is True
    assert record["columns"]["x"]["max"] == 1.5e308
    reduced = csv_totals([json_roundtrip(record), json_roundtrip(record)])
    assert reduced["columns"]["x"]["sum"] is None and reduced["columns"]["x"]["count"] == 6
    grouped = csv_stats(whole(path, group_by="k"))
    assert grouped["groups"]["b"]["columns"]["x"]["sum"] == 1


def test_csv_stats_header_names(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("a,a,,b\n1,2,3,4\n")
    assert list(csv_stats(whole(path))["columns"]) == ["a", "a#2", "column3", "b"]
    path.write_bytes(b"a\rb,c\n1,2\n")
    with pytest.raises(TaskFailed, match="cannot parse the CSV header"):
        csv_stats(whole(path))


def test_csv_stats_unterminated_quote_does_not_crash(tmp_path, small_blocks):
    path = tmp_path / "q.csv"
    path.write_text('a,b\n1,"x\n2,3\n4,5\n')
    record = csv_stats(whole(path))
    assert record["rows"] == 1  # the open quote runs to the end of the file, as in the csv module
    refused = []
    for task in ranged(path, [5, 9, 12]):
        try:
            csv_stats(task)
        except TaskFailed as exc:  # the range whose quoted field is still open at its end: a reason, not a crash
            assert "a quoted field with a line break crosses an edge" in str(exc)
            refused.append(task.offset)
    assert refused == [0]  # its first line is 1,"x


@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_csv_stats_exact_sums_over_wide_ranges(tmp_path, monkeypatch, signs):
    rng = random.Random(11)
    values = []
    for _ in range(1000):
        v = rng.random() * 10 ** rng.randint(-40, 40)
        values.append(repr(-v if signs == "mixed" and rng.random() < 0.5 else v))
    values += ["0.1", "0.2", "0.3", "1e16", "-1e16"] if signs == "mixed" else ["0.1", "1e-300", "3e300"]
    path = tmp_path / "wide.csv"
    path.write_text("v,k\n" + "".join(f"{v},{i % 3}\n" for i, v in enumerate(values)))
    exact = float(sum(Fraction(float(v)) for v in values))
    for block_size in (64, 1 << 16):  # rows summed in many blocks, or in one
        monkeypatch.setattr(csv_read, "BLOCK_SIZE", block_size)
        assert reduce_csv([whole(path)])["columns"]["v"]["sum"] == exact
        assert reduce_csv(ranged(path, list(range(999, 100000, 1999))))["columns"]["v"]["sum"] == exact
        assert_same(comparable(reduce_csv([whole(path, group_by="k")])), reference(path, "k"))


def test_csv_stats_delimiter_param(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("a;b\n1;2\n3;4\n")
    assert csv_stats(whole(path, delimiter=";"))["columns"]["b"]["sum"] == 6
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tb\n1\t2\n")
    assert csv_stats(whole(tsv, delimiter="tab"))["columns"]["a"]["sum"] == 1
    with pytest.raises(TaskFailed, match="delimiter"):
        csv_stats(whole(path, delimiter=";;"))


def _csv_corpus() -> dict[str, bytes]:
    rng = random.Random(3)
    cats = ["books", "toys", "garden", "caf\u00e9", ""]
    rows = []
    for i in range(120):
        amount = rng.choice([f"{rng.randrange(1, 10**6) / 100:.2f}", str(rng.randrange(-50, 50)), "",
                             "n/a", f"{rng.random():.17g}", "1e3", " 8 "])
        rows.append(f"{i},u{rng.randrange(30)},{amount},{rng.choice(cats)},{1700000000 + i}")
    plain = "id,user,amount,category,ts\n" + "\n".join(rows) + "\n"
    long_line = "id,user,amount,category,ts\n1,u,2.5,books,3\n" + f"2,{'x' * 300},4.25,toys,5\n" * 3
    quoted = 'id,user,amount,category,ts\n1,"a, b",2.5,books,3\n2,"say ""hi""",4,toys,5\n3,c,"6.5",books,7\n'
    messy = ("id,user,amount,category,ts\n1,a,2,books,3\n\n4,b,5\n6,c,7,toys,8,9\n"
             "10,d,11.5,toys,12\n13,e\r14,garden,15\n16,f,17,garden,18")
    return {
        "plain.csv": plain.encode(),
        "crlf.csv": plain.replace("\n", "\r\n").encode(),
        "no-final-newline.csv": plain.rstrip("\n").encode(),
        "long-lines.csv": long_line.encode(),
        "quoted.csv": quoted.encode(),
        "messy.csv": messy.encode(),
        "latin1-bytes.csv": "id,user,amount,category,ts\n1,\xe9,2,books,3\n".encode("latin-1"),
        "bom.csv": ("\ufeff" + plain[:200].rsplit("\n", 1)[0] + "\n").encode(),
    }


@pytest.mark.parametrize("name", sorted(_csv_corpus()))
@pytest.mark.parametrize("group_by", [None, "category"])
def test_csv_stats_ranges_reduce_to_the_whole_file(tmp_path, name, group_by, small_blocks):
    path = tmp_path / name
    path.write_bytes(_csv_corpus()[name])
    params = {"group_by": group_by} if group_by else {}
    whole_record = json_roundtrip(csv_stats(whole(path, **params)))
    expected = csv_totals([whole_record])
    assert_same(comparable(expected), reference(path, group_by))
    bad_offsets = [s["offset"] for s in whole_record.get("malformed_samples", ())]
    for cuts in cut_sets(path.stat().st_size):
        records = [json_roundtrip(csv_stats(t)) for t in ranged(path, cuts, **params)]
        got = csv_totals(records)
        assert_same(comparable(got), comparable(expected))
        assert got["files"] == 1 and got["tasks"] == len(records)
        # each malformed row is reported at the same place, whatever the cut
        offsets = sorted(s["offset"] for r in records for s in r.get("malformed_samples", ()))
        assert offsets[:len(bad_offsets)] == bad_offsets[:len(offsets)]


def test_csv_stats_block_size_does_not_change_the_record(tmp_path, monkeypatch):
    path = tmp_path / "plain.csv"
    path.write_bytes(_csv_corpus()["plain.csv"] + _csv_corpus()["quoted.csv"].split(b"\n", 1)[1])
    records = []
    for size in (1, 10, 64, 4096, 1 << 16):
        monkeypatch.setattr(csv_read, "BLOCK_SIZE", size)
        records.append(csv_stats(whole(path, group_by="category")))
    for record in records[1:]:
        assert_same(record, records[0])


def test_csv_stats_many_groups_path(tmp_path):
    # more distinct keys than rows/16 in a block: the per-row path (ranges of ~60 rows: the other)
    lines = ["k,v,w"] + [f"g{i % 500},{i},{i / 4}" for i in range(2000)]
    path = tmp_path / "many.csv"
    path.write_text("\n".join(lines) + "\n")
    record = csv_stats(whole(path, group_by="k"))
    assert len(record["groups"]) == 500
    assert_same(comparable(csv_totals([json_roundtrip(record)])), reference(path, "k"))
    cuts = list(range(500, path.stat().st_size, 777))
    assert_same(comparable(reduce_csv(ranged(path, cuts, group_by="k"))), reference(path, "k"))


def test_csv_stats_reducer_merges_files(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("x,y\n1,2.5\n3,4\n")
    b = tmp_path / "b.csv"
    b.write_text("x,z\n-7,1\n\n1,2\n")
    reduced = reduce_csv([whole(a), whole(b)])
    assert reduced["files"] == 2 and reduced["rows"] == 4
    assert reduced["columns"]["x"] == {"count": 4, "sum": -2, "min": -7, "max": 3}
    assert reduced["columns"]["y"] == {"count": 2, "sum": 6.5, "min": 2.5, "max": 4.0}
    assert reduced["columns"]["z"] == {"count": 2, "sum": 3, "min": 1, "max": 2}


def test_csv_stats_chunked_run_end_to_end(tmp_path):
    data = make_tree(tmp_path / "data", {"sales.csv": _csv_corpus()["plain.csv"] * 1,
                                         "more/crlf.csv": _csv_corpus()["crlf.csv"]})
    summaries = []
    for extra in ([], ["--chunk-size", "300"]):
        out = tmp_path / f"out{len(extra)}"
        result = run_cli("run", str(data), "-o", str(out), "-p", "csv-stats", "--param", "group_by=category",
                         "-w", "2", "--no-progress", *extra)
        assert result.returncode == 0, result.stderr
        summaries.append(json.loads((out / "summary.json").read_text())["reduced"])
    assert summaries[1]["tasks"] > summaries[0]["tasks"] == 2
    assert_same({k: v for k, v in summaries[1].items() if k != "tasks"},
                {k: v for k, v in summaries[0].items() if k != "tasks"})


def test_csv_stats_refuses_a_range_cut_inside_a_quoted_line_break(tmp_path):
    """A quoted field holding a line break, that a --chunk-size edge fell in: the ranges on either
    side counted cut rows as malformed, dropped others, and the totals came out wrong, exit 0.
    Quoted fields without line breaks (doubled quotes too), and quotes alone inside a field
    (12" pipe: the csv module and Arrow read them as they are), are cut as before."""
    multi = "id,comment,amount\n" + "".join(f'{i},"line one\nline, two ""q""",{i % 7}\n' for i in range(300))
    single = "id,comment,amount\n" + "".join(f'{i},"one line, ""q""",{i % 7}\n' for i in range(300))
    inches = "id,comment,amount\n" + "".join(f'{i},{i}" pipe,{i % 7}\n' for i in range(300))
    data = make_tree(tmp_path / "data", {"multi.csv": multi, "single.csv": single, "inches.csv": inches})
    summaries = []
    for extra in ([], ["--chunk-size", "500"]):
        out = tmp_path / f"out{len(extra)}"
        result = run_cli("run", str(data), "-o", str(out), "-p", "csv-stats", "--retries", "0", "--no-progress",
                         *extra)
        summaries.append((result, out))
    (whole_run, whole_out), (cut_run, cut_out) = summaries
    assert whole_run.returncode == 0, whole_run.stderr
    assert cut_run.returncode == 1, cut_run.stderr
    failed = query_ledger(cut_out, "SELECT relpath, error FROM tasks WHERE state = 'failed'")
    assert failed and {relpath for relpath, _ in failed} == {"multi.csv"}
    assert all("a quoted field with a line break crosses an edge" in error for _, error in failed)
    records = [json.loads(line) for line in (cut_out / "merged.jsonl").read_text().splitlines()]
    for name in ("single.csv", "inches.csv"):
        cut = [r for r in records if r["path"] == name]
        assert len(cut) > 1 and sum(r["rows"] for r in cut) == 300 and not any(r["malformed"] for r in cut), name
        assert sum(r["columns"]["amount"]["sum"] for r in cut) == sum(i % 7 for i in range(300)), name


# -- jsonl-count ------------------------------------------------------------------

JSONL = (b'{"a": 1}\n[1, 2]\n\n  \n"str"\n{bad json}\n\xff\xfe\n{"b": {"c": null}}\r\n'
         b'{"long": "' + b"y" * 500 + b'"}\n42\nnot json\n{"last": true}')


def test_jsonl_count_whole_file(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(JSONL)
    record = jsonl_count(whole(path))
    assert (record["records"], record["invalid"], record["blank"]) == (7, 3, 2)
    offsets = [s["offset"] for s in record["invalid_samples"]]
    assert offsets == [JSONL.index(b"{bad"), JSONL.index(b"\xff"), JSONL.index(b"not json")]
    assert "not UTF-8" in record["invalid_samples"][1]["error"]


@pytest.mark.parametrize("content", [JSONL, JSONL + b"\n", JSONL.replace(b"\n", b"\r\n"), b"", b"\n", b"{}"])
def test_jsonl_count_ranges_reduce_to_the_whole_file(tmp_path, content):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    expected = jsonl_totals([jsonl_count(whole(path))])
    size = path.stat().st_size
    for cuts in cut_sets(size) if size else [[]]:
        tasks = ranged(path, cuts) if size else [whole(path)]
        records = [jsonl_count(t) for t in tasks]
        got = jsonl_totals(records)
        assert {k: got[k] for k in ("records", "invalid", "blank")} == \
               {k: expected[k] for k in ("records", "invalid", "blank")}
        # every invalid line is reported at the same offset, whatever the cut
        if expected["invalid"]:
            assert sorted(s["offset"] for r in records for s in r.get("invalid_samples", ()))[:3] == \
                   [s["offset"] for s in expected["invalid_samples"]][:3]


# -- cmd (--cmd) --------------------------------------------------------------------

def cmd_task(path: Path, template: str, relpath: str | None = None) -> Task:
    return Task(1, str(path), relpath or path.name, params={"cmd": template})


def test_cmd_captures_stdout_and_exit_code(tmp_path):
    path = tmp_path / "hello.txt"
    path.write_text("hello\nworld\n")
    record = run_command(cmd_task(path, "cat {}"))
    assert record == {"path": "hello.txt", "exit_code": 0, "stdout": "hello\nworld\n", "stderr": ""}


def test_cmd_placeholder_inside_a_word_and_appended_when_absent(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("")
    assert run_command(cmd_task(path, "echo --in={} '{}'"))["stdout"] == f"--in={path} {path}\n"
    assert run_command(cmd_task(path, "echo 'a b'"))["stdout"] == f"a b {path}\n"
    assert build_argv("prog -x {}.out", "/d/f") == ["prog", "-x", "/d/f.out"]


def test_cmd_hostile_file_names_are_just_names(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "sentinel").write_text("still here")
    monkeypatch.setenv("HOME", str(home))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("x; rm -rf ~", "-rf", "$(touch pwned)", "a b\nc"):
        path = data / name
        path.write_text(f"content of {name}")
        record = run_command(cmd_task(path, "cat {}", relpath=name))
        assert record["stdout"] == f"content of {name}"
        assert record["path"] == name
    assert (home / "sentinel").read_text() == "still here"
    assert sorted(os.listdir(data)) == sorted(["x; rm -rf ~", "-rf", "$(touch pwned)", "a b\nc"])


def test_cmd_non_zero_exit_fails_the_attempt(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    with pytest.raises(CommandFailed, match=r"^command exited with code 3: boom") as info:
        run_command(cmd_task(path, "sh -c 'echo boom >&2; echo more >&2; exit 3' sh {}"))
    assert isinstance(info.value, TaskFailed)
    assert str(info.value) == "command exited with code 3: boom"  # one line; the rest in details
    assert "boom\nmore" in info.value.details
    with pytest.raises(CommandFailed, match="command exited with code 1$"):
        run_command(cmd_task(path, "false {}"))
    with pytest.raises(CommandFailed, match="killed by SIGKILL"):
        run_command(cmd_task(path, "sh -c 'kill -9 $$' sh {}"))


def test_cmd_missing_program(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    with pytest.raises(CommandFailed, match="command not found: 'no-such-program-xyz'"):
        run_command(cmd_task(path, "no-such-program-xyz {}"))
    with pytest.raises(CommandFailed, match="not executable"):
        run_command(cmd_task(path, f"{path} {{}}"))
    with pytest.raises(CommandFailed, match="--cmd needs a command"):
        run_command(Task(1, str(path), "f.txt", params={}))


def test_cmd_template_errors_are_usage_errors():
    with pytest.raises(UsageError, match="No closing quotation"):
        check_template("echo 'unterminated {}")
    with pytest.raises(UsageError):
        check_template("   ")
    assert check_template("wc -l {}") == ["wc", "-l", "{}"]


def test_cmd_stdin_is_closed(tmp_path):
    """`cat` without a file reads stdin: it must see EOF at once, even if our stdin stays open."""
    path = tmp_path / "f.txt"
    path.write_text("x")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from crawlproc.task import Task
        from crawlproc.processors.command import run_command
        task = Task(1, {str(path)!r}, "f.txt", params={{"cmd": "sh -c 'cat; echo done' sh {{}}"}})
        print(run_command(task)["stdout"], end="")
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        proc.wait(timeout=30)  # our end of its stdin stays open all along
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the command read the worker's stdin")
    finally:
        proc.stdin.close()
    assert proc.stdout.read() == b"done\n"
    proc.stdout.close()


def test_cmd_runs_in_the_callers_process_group(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    record = run_command(cmd_task(path, f"{sys.executable} -c 'import os; print(os.getpgrp(), os.getsid(0))' {{}}"))
    assert record["stdout"].split() == [str(os.getpgrp()), str(os.getsid(0))]


def test_cmd_output_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(command_mod, "MAX_OUTPUT", 10)
    path = tmp_path / "f.txt"
    path.write_text("x")
    record = run_command(cmd_task(
        path, f"{sys.executable} -c 'import sys; print(\"a\" * 100); print(\"e\" * 5, file=sys.stderr)' {{}}"))
    assert record["stdout"] == "a" * 10 and record["stdout_truncated"] == 91
    assert record["stderr"] == "eeeee\n" and "stderr_truncated" not in record


def test_cmd_on_a_range_passes_the_file_and_records_the_range(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("0123456789")
    record = run_command(Task(1, str(path), "f.txt", 4, 3, params={"cmd": "cat {}"}))
    assert record["stdout"] == "0123456789"
    assert (record["offset"], record["length"]) == (4, 3)


def test_cmd_through_the_cli_as_processor_cmd(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "one\n", "-rf": "two\n", "x; rm -rf ~": "three\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", "cmd", "--param", "cmd=cat {}",
                     "-w", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert {r["path"]: r["stdout"] for r in records} == {"a.txt": "one\n", "-rf": "two\n",
                                                         "x; rm -rf ~": "three\n"}


# -- registry and plugins ------------------------------------------------------------

def test_builtins_are_registered_and_described():
    assert {"csv-stats", "jsonl-count", "cmd", "linecount", "sha256"} <= set(BUILTINS)
    names = [row[0] for row in describe_builtins()]
    assert {"csv-stats", "jsonl-count", "cmd"} <= set(names)
    assert load("csv-stats").reduce is not None
    assert load("jsonl-count").reduce is not None


def test_builtin_names_do_not_read_entry_points(monkeypatch):
    import importlib.metadata

    def boom(**kwargs):
        raise AssertionError("entry points scanned for a built-in name")

    monkeypatch.setattr(importlib.metadata, "entry_points", boom)
    assert normalise_spec("csv-stats") == "csv-stats"
    assert load("linecount").version == "1"
    assert load("crawlproc.processors.sha256:sha256").version == "1"


def make_plugin(root: Path, name: str = "wordy", module: str = "crawlproc_test_plugin",
                extra_entries: str = "") -> Path:
    """A tiny installed distribution: a module and its *.dist-info with entry_points.txt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent('''
        from crawlproc import processor

        @processor(version="3")
        def words(task):
            """Words per file (a test plugin)."""
            return {"path": task.relpath, "words": len(task.read_bytes().split())}

        @words.reducer
        def total(records):
            return {"words": sum(r["words"] for r in records)}

        def shadow(task):
            """A plugin that tries to replace a built-in."""
            return {"shadow": True}
    '''))
    info = root / "crawlproc_test_plugin-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: crawlproc-test-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[crawlproc.processors]\n{name} = {module}:words\nlinecount = {module}:shadow\n{extra_entries}")
    return root


def test_plugin_loads_by_name_in_process(tmp_path, monkeypatch):
    root = make_plugin(tmp_path / "site", extra_entries="broken = crawlproc_no_such_module:f\n")
    monkeypatch.syspath_prepend(str(root))
    proc = load("wordy")
    assert proc.version == "3" and proc.reduce is not None
    assert normalise_spec("wordy") == "wordy"
    rows = {row[0]: row for row in describe_builtins()}
    assert "plugin" in rows["wordy"][2] and rows["wordy"][1] == "3"
    assert rows["broken"][1] == "?" and "cannot be loaded" in rows["broken"][2]
    # a built-in wins over a plugin of the same name
    assert load("linecount") is load("crawlproc.processors.linecount:linecount")
    with pytest.raises(ProcessorLoadError, match="cannot load plugin processor 'broken'"):
        load("broken")
    with pytest.raises(ProcessorLoadError, match="not a built-in or plugin name"):
        normalise_spec("no-such-processor")


def test_plugin_through_the_cli(tmp_path):
    root = make_plugin(tmp_path / "site")
    env = {"PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    listing = run_cli("processors", env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert any(line.startswith("wordy") and "Words per file" in line for line in lines)
    assert sum(line.startswith("linecount ") for line in lines) == 1
    data = make_tree(tmp_path / "data", {"a.txt": "one two three\n", "b.txt": "four\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", "wordy", "-w", "1", "--no-progress", env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reduced"] == {"words": 4}
    assert summary["processor"] == "wordy" and summary["processor_version"] == "3"


# -- the README's processors on Arrow and polars ------------------------------------------

def readme_example(name: str) -> str:
    """The README's python block that starts with `# NAME`."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(block for block in blocks if block.startswith(f"# {name}\n"))


def test_the_readmes_processor_decorators_are_valid():
    from crawlproc import processor

    written = re.findall(r"`@processor\((.*?)\)`", (REPO / "README.md").read_text())
    assert written
    for arguments in written:
        decorate = eval(f"processor({arguments})", {"processor": processor})  # noqa: S307 - our README

        def f(task):
            return None

        assert decorate(f).version == "1", arguments


@pytest.mark.parametrize("example", ["by_category.py", "by_category_polars.py"])
def test_readme_buffer_processors_run_and_agree_with_csv_stats(tmp_path, example):
    if "polars" in example:
        pytest.importorskip("polars")
    data = make_tree(tmp_path / "data", {"a.csv": "id,amount,category\n1,2.5,books\n2,4,toys\n3,1.5,books\n",
                                         "b/c.csv": "id,amount,category\n4,10,toys\n"})
    (tmp_path / example).write_text(readme_example(example))
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", f"{tmp_path / example}:amount_by_category",
                     "-w", "2", "-q")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert [(r["path"], r["category"], r["amount_sum"]) for r in rows] == [
        ("a.csv", "books", 4.0), ("a.csv", "toys", 4.0), ("b/c.csv", "toys", 10)]


def test_readme_words_example_counts_the_same_with_chunks(tmp_path):
    """It read task.read_bytes(): a range's raw bytes, whose edges cut words in two, so a run
    with --chunk-size counted more words than there are."""
    import random

    rng = random.Random(1)
    text = "".join(" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(rng.randint(1, 12))) + "\n"
                   for _ in range(400))
    data = make_tree(tmp_path / "data", {"t.txt": text})
    (tmp_path / "words.py").write_text(readme_example("words.py"))
    totals = []
    for extra in ([], ["--chunk-size", "1KB"]):
        out = tmp_path / f"out{len(extra)}"
        result = run_cli("run", str(data), "-o", str(out), "-p", f"{tmp_path / 'words.py'}:words", "-q", *extra)
        assert result.returncode == 0, result.stderr
        totals.append(json.loads((out / "summary.json").read_text())["reduced"]["words"])
    assert totals == [len(text.split())] * 2


def test_jsonl_count_blocks_with_and_without_invalid_lines(tmp_path, monkeypatch):
    import crawlproc.processors.jsonl_count as jsonl_mod

    monkeypatch.setattr(jsonl_mod, "BLOCK", 40)  # many blocks: most all valid, a few not
    good = b'{"a": 1}\n[1, 2]\n\n"s"\r\n  NaN  \n'
    content = b"\xef\xbb\xbf" + good * 20 + b"1 2\n" + good * 5 + b"{\n" + b'{"x": "\xe9"}\n' + good
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    record = jsonl_count(whole(path))
    assert (record["records"], record["invalid"], record["blank"]) == (4 * 26, 3, 26)
    assert [s["offset"] for s in record["invalid_samples"]] == [
        content.index(b"1 2\n"), content.index(b"{\n"), content.index(b'{"x"')]
    monkeypatch.setattr(jsonl_mod, "BLOCK", 1 << 20)  # one block
    assert jsonl_count(whole(path)) == record


# -- linecount --------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\n", b"one", b"a b\tc\n\x0bd\x0ce  f\r\ng\n\n", b" lead\n trail \n",
                                     bytes(range(256)) * 3])
def test_linecount_counts_like_split_in_blocks_and_ranges(tmp_path, monkeypatch, content):
    import crawlproc.processors.linecount as linecount_mod
    from crawlproc.processors.linecount import linecount, totals

    path = tmp_path / "t.txt"
    path.write_bytes(content)
    lines = content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
    expected = {"path": "t.txt", "lines": lines, "words": len(content.split()), "bytes": len(content)}
    for block in (1, 3, 1 << 20):  # a word or a line across blocks
        monkeypatch.setattr(linecount_mod, "BLOCK", block)
        assert linecount(whole(path)) == expected
        for cuts in cut_sets(len(content))[:6] if content else []:
            got = totals(linecount(t) for t in ranged(path, cuts))
            assert (got["lines"], got["words"], got["bytes"]) == (lines, expected["words"], len(content))


# -- csv-stats' numbers on Arrow: the same values as Python's rules --------------------------

# values only the Python path sums exactly (an overflow to inf, integers past 2**53, near the float range's end)
_PYTHON_PATH = ["1e999", "-1e999", "9007199254740993", "-9007199254740993", "1" * 30, "1.5e300"]


def _fuzz_values(rng: random.Random, n: int, python_path: bool) -> list[str]:
    """Strings near the edge of a decimal literal: number characters, spaces, signs, letters."""
    alphabet = "0123456789+-.eE \t" + "x_naif\u0661"
    specials = ["0x1f", "1_000", "nan", "inf", "-Infinity", "5e-324", "-0", "+0.0", ".5", "5.", "+", "-", ".", "e5",
                "1e", " 7 ", "\t-3.25\t", "2.2250738585072014e-308", "\u0661\u0662", "0.1", "00012", "+12"]
    specials += _PYTHON_PATH if python_path else []
    values = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.3:
            values.append(rng.choice(specials))
        elif roll < 0.6:
            # up to 4 characters ("9e99" at most) keep to the Arrow path; 8 reach overflows ("1e999")
            values.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8 if python_path else 4))))
        elif roll < 0.8:
            values.append(repr(rng.uniform(-1e6, 1e6)))
        else:
            values.append(str(rng.randint(-10**6, 10**6)))
    return values


@pytest.mark.parametrize("python_path", [False, True], ids=["arrow", "arrow+python"])
@pytest.mark.parametrize("seed", range(3))
def test_csv_stats_arrow_numbers_follow_the_decimal_literal_rules(tmp_path, monkeypatch, seed, python_path):
    import crawlproc.processors.csv_numbers as numbers_mod

    if not python_path:
        def unexpected(*args):
            raise AssertionError("the Python path was taken")
        monkeypatch.setattr(numbers_mod, "_python_stats", unexpected)
    rng = random.Random(seed)
    values = _fuzz_values(rng, 3000, python_path)
    path = tmp_path / "fuzz.csv"
    lines = [f"k,v,w\n"] + [f"g{rng.randrange(4)},{v.replace(',', '')},{rng.choice(values)}\n" for v in values]
    path.write_text("".join(line for line in lines if '"' not in line))
    assert_same(comparable(reduce_csv([whole(path)])), reference(path))
    assert_same(comparable(reduce_csv([whole(path, group_by="k")])), reference(path, "k"))


def test_csv_stats_integer_and_decimal_columns_per_group(tmp_path):
    # a group whose values are all integer literals sums to an int, beside groups of decimals;
    # integers past 2**53 beside decimals are exact (the Python path)
    path = tmp_path / "g.csv"
    path.write_text("k,v\n" + "a,1\na,2.50\nb,3\nb,+4\nc,1.0\nd,9007199254740993\nd,0.5\n" * 3)
    record = csv_stats(whole(path, group_by="k"))
    assert record["groups"]["b"]["columns"]["v"] == {"count": 6, "sum": 21, "min": 3, "max": 4}
    assert record["groups"]["c"]["columns"]["v"] == {"count": 3, "sum": 3.0, "min": 1.0, "max": 1.0}
    assert record["groups"]["d"]["columns"]["v"]["sum"] == float(3 * (Fraction(9007199254740993) + Fraction(1, 2)))
    assert_same(comparable(csv_totals([json_roundtrip(record)])), reference(path, "k"))


# -- numbers read as numbers by the parser, or as text: the same records ------------------

def _typed_corpus() -> dict[str, str]:
    """Columns that the first rows show as int64 or float64, and that later rows may not fit."""
    rng = random.Random(5)
    clean = "id,amount,k\n" + "".join(f"{i},{rng.randrange(1, 10**7) / 100:.2f},{'abc'[i % 3]}\n"
                                       for i in range(400))
    late = lambda value: clean + f"401,{value},a\n402,2.5,b\n"  # noqa: E731
    return {
        "clean": clean,
        "hex-int": clean.replace("\n7,", "\n0x1f,"),                 # Arrow reads 0x1f as 31; it is text
        "nan": late("nan"), "inf": late("inf"), "overflow": late("1e400"),
        "text-later": late("n/a"),
        "int-literal-later": late("12"),                             # 12 beside 12.00: only the text tells
        "integral-group": clean + "".join(f"{500 + i},{v},z\n" for i, v in enumerate(["5.0", "7", "1e2"])),
        "big-ints": "id,k\n" + "".join(f"{2**53 + i},{'ab'[i % 2]}\n" for i in range(50)),
        "big-floats": "v,k\n1.5,a\n" + "".join(f"{2.0**60 * (i + 1)!r},{'ab'[i % 2]}\n" for i in range(50)),
        "spaces": "id,amount,k\n" + "".join(f" {i} ,\t{i / 8}, k{i % 2}\n" for i in range(100)),
        "zeros": "id,amount,k\n" + "0,0.0,a\n-0,-0.0,b\n" * 20,
        "int-then-float": "id,k\n" + "".join(f"{i},a\n" for i in range(300)) + "2.5,b\n",
        "words-and-digits": "flag,k\n" + "true,a\n1,b\nfalse,a\n0,b\n" * 10,  # not a bool column
    }


@pytest.mark.parametrize("name", sorted(_typed_corpus()))
@pytest.mark.parametrize("group_by", [None, "k"])
def test_csv_stats_typed_columns_give_the_records_of_text_columns(tmp_path, monkeypatch, name, group_by):
    path = tmp_path / f"{name}.csv"
    path.write_text(_typed_corpus()[name])
    params = {"group_by": group_by} if group_by else {}
    monkeypatch.setattr(csv_read, "BLOCK_SIZE", 256)  # the later rows are past the first block
    typed = [csv_stats(t) for t in [whole(path, **params), *ranged(path, [300, 1200, 3000], **params)]]
    as_text = csv_read.Rows._arrow_tables
    monkeypatch.setattr(csv_read.Rows, "_arrow_tables",
                        lambda self, block_size, count_bad, infer=False: as_text(self, block_size, count_bad))
    text = [csv_stats(t) for t in [whole(path, **params), *ranged(path, [300, 1200, 3000], **params)]]
    for a, b in zip(typed, text):
        assert_same(a, b)
    assert_same(comparable(csv_totals([json_roundtrip(typed[0])])), reference(path, group_by))


_CELLS = {  # what a numeric column of an export holds, and what spoils it
    "int": lambda draw: str(draw(st.integers(-10**12, 10**12))),
    "big int": lambda draw: str(draw(st.integers(2**53 - 3, 2**64))),
    "decimal": lambda draw: f"{draw(st.integers(-10**9, 10**9)) / 100:.2f}",
    "float": lambda draw: repr(draw(st.floats(allow_nan=False, allow_infinity=False))),
    "exponent": lambda draw: f"{draw(st.integers(1, 99))}e{draw(st.integers(-30, 30))}",
    "integral": lambda draw: f"{draw(st.integers(-99, 99))}.0",
    "spaced": lambda draw: f" {draw(st.integers(0, 99))} ",
    "empty": lambda draw: "",
    "hex": lambda draw: f"{draw(st.sampled_from(['0x', '0X']))}{draw(st.integers(0, 255)):x}",  # an int to Arrow
    "word": lambda draw: draw(st.sampled_from(["n/a", "nan", "inf", "-Infinity", "true", "1e999", "-"])),
}


@st.composite
def _numeric_csv(draw) -> str:
    kinds = [draw(st.lists(st.sampled_from(sorted(_CELLS)), min_size=1, max_size=3)) for _ in range(2)]
    spoil_at = draw(st.integers(0, 40))   # where a cell of another kind appears, if one does
    rows = []
    for i in range(draw(st.integers(1, 60))):
        cells = [_CELLS[draw(st.sampled_from(k if i != spoil_at else sorted(_CELLS)))](draw) for k in kinds]
        rows.append(",".join([*cells, draw(st.sampled_from(["a", "b", "c"]))]))
    return "x,y,k\n" + "\n".join(rows) + "\n"


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(content=_numeric_csv(), block_size=st.sampled_from([64, 1 << 20]))
def test_csv_stats_typed_read_equals_text_read_on_generated_columns(content, block_size):
    import tempfile

    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as monkeypatch:
        path = Path(folder) / "g.csv"
        path.write_text(content)
        monkeypatch.setattr(csv_read, "BLOCK_SIZE", block_size)
        typed = [csv_stats(whole(path, **p)) for p in ({}, {"group_by": "k"})]
        as_text = csv_read.Rows._arrow_tables
        monkeypatch.setattr(csv_read.Rows, "_arrow_tables",
                            lambda self, size, count_bad, infer=False: as_text(self, size, count_bad))
        for params, record in zip(({}, {"group_by": "k"}), typed):
            assert_same(record, csv_stats(whole(path, **params)))
        assert_same(comparable(csv_totals([json_roundtrip(typed[1])])), reference(path, "k"))


def test_csv_stats_reads_clean_numeric_columns_as_numbers_in_one_pass(tmp_path):
    def read(content: str, **how) -> list[dict]:
        data = content.encode()
        names = content.split("\n", 1)[0].split(",")
        rows = csv_read.Rows(data, Span(data.index(b"\n") + 1, len(data)), names, ",", **how)
        return rows.collect(lambda table: {f.name: str(f.type) for f in table.schema})

    clean = _typed_corpus()["clean"]
    assert read(clean, text=["k"]) == [{"id": "int64", "amount": "double", "k": "string"}]
    assert read(clean, text=["k"], only=["amount", "k"]) == [{"amount": "double", "k": "string"}]
    # 0x in the task: read again, every column a string
    assert read(_typed_corpus()["hex-int"], text=["k"]) == [{"id": "string", "amount": "string", "k": "string"}]
    # dates and timestamps, and words for booleans, are never numbers; 1 and 0 are
    when = "d,t,b,n\n2024-01-02,2024-01-02T03:04:05Z,true,1\n2024-02-03,2024-02-03T00:00:00Z,false,0\n"
    assert read(when) == [{"d": "date32[day]", "t": "timestamp[s, tz=UTC]", "b": "bool", "n": "int64"}]
    path = tmp_path / "when.csv"
    path.write_text(when)
    assert csv_stats(whole(path))["columns"] == {"n": {"count": 2, "sum": 1, "min": 0, "max": 1}}


def test_csv_stats_columns_param_keeps_to_the_columns_named(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("id,user,amount,k,note\n1,ann,2.5,a,7\n2,bob,3,b,x\n3,cy,4.25,a,9\n")
    everything = csv_stats(whole(path, group_by="k"))
    some = csv_stats(whole(path, group_by="k", columns="amount, id"))
    assert some["rows"] == everything["rows"] == 3
    for name, group in everything["groups"].items():
        assert some["groups"][name]["columns"] == {c: group["columns"][c] for c in ("id", "amount")}
    assert list(csv_stats(whole(path, columns="note"))["columns"]) == ["note"]
    # ranges, and a task that the csv module reads (a lone CR), agree
    assert_same(reduce_csv(ranged(path, [10, 25], group_by="k", columns="amount,id"))["groups"],
                csv_totals([json_roundtrip(some)])["groups"])
    cr = tmp_path / "cr.csv"
    cr.write_bytes(b"a,b,c\n1,x\ry,3\n4,5,6\n")
    by_csv_module = csv_stats(whole(cr, columns="c"))
    assert by_csv_module["columns"] == {"c": csv_stats(whole(cr))["columns"]["c"]}
    assert (by_csv_module["rows"], by_csv_module["malformed"]) == (1, 1)
    with pytest.raises(TaskFailed, match=r"columns \['nope'\] are not in the header"):
        csv_stats(whole(path, columns="id,nope"))


def test_csv_stats_keys_that_are_not_utf8_merge_as_people_read_them(tmp_path):
    path = tmp_path / "k.csv"
    path.write_bytes(b"k,v\n\xff,1\n\xfe,2\nok,3\n,4\n")
    groups = csv_stats(whole(path, group_by="k"))["groups"]
    assert list(groups) == ["", "ok", "\ufffd"]
    assert groups["\ufffd"] == {"rows": 2, "columns": {"v": {"count": 2, "sum": 3, "min": 1, "max": 2}}}
    assert groups[""]["rows"] == 1
    assert_same(comparable(csv_totals([json_roundtrip(csv_stats(whole(path, group_by="k")))])),
                reference(path, "k"))


def test_csv_stats_reads_a_task_with_a_lone_cr_as_the_csv_module_does(tmp_path):
    path = tmp_path / "cr.csv"
    content = b'a,b\n1,"x\ry"\n2\r3,4\n5,6\r\n'
    path.write_bytes(content)
    record = csv_stats(whole(path))
    assert (record["rows"], record["malformed"]) == (2, 1)
    assert record["malformed_samples"][0]["offset"] == content.index(b"2\r3")
    assert_same(comparable(csv_totals([json_roundtrip(record)])), reference(path))


def test_csv_stats_malformed_rows_beside_bytes_that_are_not_utf8(tmp_path, capfd):
    # pyarrow hands a malformed row to its handler as text: such a task is read without it
    path = tmp_path / "latin.csv"
    content = b"a,b\n1,\xe9\n2\n3,4,5\n\xe9,6\n"
    path.write_bytes(content)
    record = csv_stats(whole(path))
    assert (record["rows"], record["malformed"]) == (2, 2)
    assert [s["offset"] for s in record["malformed_samples"]] == [content.index(b"2\n"), content.index(b"3,4,5")]
    assert_same(comparable(csv_totals([json_roundtrip(record)])), reference(path))
    assert capfd.readouterr().err == ""


def test_csv_stats_a_malformed_record_over_two_lines_is_located_at_its_first(tmp_path):
    # with quotes, Arrow's records are not lines: the row's text is found where a line starts
    path = tmp_path / "q.csv"
    path.write_bytes(b'a,b\n1,"x\n"y,z\n2,3\n1,"x\n"y,z\n')
    record = csv_stats(whole(path))
    assert (record["rows"], record["malformed"]) == (1, 2)
    assert [(s["offset"], s["line"], s["error"]) for s in record["malformed_samples"]] == [
        (4, 2, "3 fields, expected 2"), (18, 5, "3 fields, expected 2")]


# -- imports: heavy imports made once, by the workers' forkserver ---------------------------

def test_loading_csv_stats_does_not_import_pyarrow():
    code = ("import sys\nfrom crawlproc.processors.base import load\nproc = load('csv-stats')\n"
            "print(sorted(proc.imports), 'pyarrow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split("]")[-1].strip() == "False", result.stdout + result.stderr
    assert "crawlproc.processors.csv_numbers" in result.stdout


@pytest.mark.parametrize("group_by", [None, "category"])
def test_csv_stats_group_by_plan_gives_what_table_group_by_gives(tmp_path, monkeypatch, group_by):
    import crawlproc.processors.csv_numbers as numbers_mod

    path = tmp_path / "plain.csv"
    path.write_bytes(_csv_corpus()["plain.csv"])
    params = {"group_by": group_by} if group_by else {}
    ours = csv_stats(whole(path, **params))
    monkeypatch.setattr(numbers_mod, "Declaration", None)  # as with a pyarrow that moved pyarrow._acero
    assert_same(csv_stats(whole(path, **params)), ours)


def test_csv_stats_imports_neither_pandas_nor_pyarrow_dataset(tmp_path):
    # pyarrow imports pandas (when installed: the test extras install it) with pyarrow.dataset and
    # at the first Python value it turns into an Arrow scalar: ~0.2 s before a worker can start
    path = tmp_path / "mixed.csv"
    path.write_text("id,amount,k,note\n" + "".join(f"{i},{i / 8},{'ab'[i % 2]},{' 7 ' if i % 5 else 'x'}\n"
                                                    for i in range(300)) + "9,1.0,b,2\n9,,a,0.5\n")
    code = textwrap.dedent(f"""
        import sys
        from crawlproc.processors.csv_stats import csv_stats
        from crawlproc.task import Task
        for params in ({{}}, {{"group_by": "k"}}, {{"group_by": "k", "columns": "amount"}}):
            record = csv_stats(Task(1, {str(path)!r}, "mixed.csv", params=params))
        print(sorted(m for m in ("pandas", "pyarrow.dataset", "pyarrow.acero") if m in sys.modules), record["rows"])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.stdout.split() == ["[]", "302"], result.stdout + result.stderr


@pytest.mark.parametrize("imports", [True, False])
def test_the_forkserver_imports_what_a_processor_imports(tmp_path, imports):
    data = make_tree(tmp_path / "data", {"a.txt": "x\n"})
    proc = tmp_path / "proc.py"
    proc.write_text("import sys\nfrom crawlproc import processor\n\n"
                    f"@processor(version='1', imports={['colorsys'] if imports else []!r})\n"
                    "def seen(task):\n"
                    "    return {'path': task.relpath, 'preloaded': 'colorsys' in sys.modules}\n")
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", f"{proc}:seen", "-w", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "merged.jsonl").read_text())["preloaded"] is imports


@pytest.mark.parametrize("param, said", [
    ("delimter=;", "csv-stats has no --param 'delimter' (did you mean 'delimiter'?"),
    ("delimiter=ab", "delimiter must be one character, not 'ab'"),
    ("group_by=", "--param group_by= needs a column name"),
    ("columns= , ", "--param columns= needs a column name"),
])
def test_csv_stats_params_are_checked_at_the_start(tmp_path, param, said):
    """A misspelled name was ignored (the run went on with a comma); a bad delimiter failed
    every file three times; an empty group_by ran ungrouped. One line, exit 2, before OUT exists."""
    data = make_tree(tmp_path / "data", {"s.csv": "id;amount\n1;2\n"})
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        result = run_cli("run", str(data), "-o", str(out), "-p", "csv-stats", "--param", param, *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0 and said in result.stderr, result.stderr
        assert not out.exists()
    ok = run_cli("run", str(data), "-o", str(out), "-p", "csv-stats", "--param", "delimiter=;", "-q")
    assert ok.returncode == 0, ok.stderr
