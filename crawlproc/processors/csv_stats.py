"""Built-in `csv-stats`: rows, and count/sum/min/max of every numeric column.

Record of one task (a file, or a byte range of it with --chunk-size):

    {"path": relpath, "offset": 0, "rows": 3, "malformed": 0,
     "columns": {"amount": {"count": 3, "sum": 61.5, "min": 1.5, "max": 50.0,
                            "sum_parts": [61.5, 1.2e-15]}}}

With `--param group_by=COL` the per-column stats are per value of COL:

    {"path": ..., "offset": 0, "rows": 3, "malformed": 0, "group_by": "category",
     "groups": {"books": {"rows": 2, "columns": {...}}, "toys": {...}}}

Rules:
- The header is the file's first line, also for a range that starts mid-file
  (read apart); it is never counted as a row. Blank lines are skipped.
- A row whose number of fields differs from the header's is counted in
  `malformed` (it adds to no statistic); the first few are described in
  `malformed_samples` (`offset` of the line in the file, `line` number when the
  task starts at the top of the file, and what was wrong).
- A value is numeric when it is a decimal literal (csv_numbers.py says which);
  empty and other values are skipped. A column (or group's column) appears once
  it has one numeric value.
- `sum` is an exact `int` while every numeric value of the column is an integer
  literal; otherwise a float: the correctly rounded exact sum of the values
  (not an order-dependent running float sum). `sum_parts`, present when the
  exact sum is not a single float, is that exact sum as a list of floats
  (`sum == math.fsum(sum_parts)`); the reducer uses it so that totals over all
  files and chunks are exactly the sums of a single pass (exact.py).
- `--param delimiter=;` (or `tab`) picks another field delimiter.
- `--param columns=id,amount` keeps to those columns (header names): the others
  are not converted at all, which makes a wide file's task faster.
- With --chunk-size a quoted field holding a newline that a range's edge
  falls in cannot be read: the range that ends inside it fails with that
  reason (an odd number of quotes in the range, and a value holding a line
  break, say so) instead of giving wrong totals; whole files are fine.

How: the task's lines are parsed by pyarrow.csv, the columns that its first
rows hold as numbers straight into int64 or float64, the others into strings
(csv_read.py), and aggregated with one Arrow group_by per block of rows
(csv_numbers.py); Python only sees each block's groups.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from typing import Any

from crawlproc.errors import TaskFailed
from crawlproc.processors.base import processor
from crawlproc.processors.exact import ColumnStats
from crawlproc.task import Span, Task, load_span

REDUCED_SAMPLES = 10          # malformed rows described in the reduced summary
_ARROW_MODULES = ("crawlproc.processors.csv_numbers", "crawlproc.processors.csv_read")


def _read_header(path: str, delimiter: str) -> list[str] | None:
    """The fields of the file's first line, or None for an empty file."""
    with open(path, "rb") as f:
        raw = f.readline()
    if not raw:
        return None
    line = raw.decode("utf-8", "replace").removeprefix("\ufeff")
    try:
        return next(csv.reader([line], delimiter=delimiter), [])
    except csv.Error as exc:
        raise TaskFailed(f"cannot parse the CSV header (first line): {exc}") from None


def _column_names(header: list[str]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(header):
        name = name or f"column{i + 1}"
        unique, n = name, 1
        while unique in seen:
            n += 1
            unique = f"{name}#{n}"
        seen.add(unique)
        names.append(unique)
    return names


def _delimiter(params: Any) -> str:
    value = params.get("delimiter", ",")
    value = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}.get(value, value)
    if len(value) != 1 or value in '"\r\n':
        raise TaskFailed(f"csv-stats: delimiter must be one character, not {value!r}")
    return value


def _wanted_columns(params: Any, header: list[str]) -> set[int] | None:
    """The header positions of `--param columns=a,b` (None: every column)."""
    value = params.get("columns")
    if not value:
        return None
    wanted = [name.strip() for name in value.split(",") if name.strip()]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise TaskFailed(f"csv-stats: columns {missing!r} are not in the header {_shown(header)}")
    return {header.index(name) for name in wanted}


# -- the processor --------------------------------------------------------------

class _Group:
    __slots__ = ("rows", "columns")

    def __init__(self) -> None:
        self.rows = 0
        self.columns: dict[int, ColumnStats] = {}

    def add(self, rows: int, partials: dict) -> None:
        self.rows += rows
        for j, p in partials.items():
            stats = self.columns.get(j)
            if stats is None:
                stats = self.columns[j] = ColumnStats()
            stats.add(p.count, p.units, p.low, p.high, p.has_float)

    def stats(self, names: list[str]) -> dict:
        return {names[j]: self.columns[j].result() for j in sorted(self.columns) if self.columns[j].count}


def _odd_quotes(data: Any, span: Span, slice_bytes: int = 1 << 20) -> bool:
    """Whether the span holds an odd number of quote characters (counted a slice at a time: a
    big span is mapped, and must not be copied whole)."""
    start, end = span
    if data.find(b'"', start, end) == -1:
        return False
    view = memoryview(data)
    return sum(bytes(view[at:min(at + slice_bytes, end)]).count(b'"')
               for at in range(start, end, slice_bytes)) % 2 == 1


def _cut_inside_quotes(data: Any, span: Span, names: list[str], delimiter: str) -> bool:
    """Whether a range edge falls inside a quoted field that holds a line break: then the rows
    on either side of it are cut wrong. A range's edges are line starts, so such a field must
    hold one. A doubled quote counts two, so a range whose edges are both outside quotes holds
    an even number of quotes, and the first range of a file whose end is inside such a field an
    odd one; a quote alone inside a field (12" pipe) makes it odd too, and is told apart by
    reading the range: only a quoted field gives a value holding a line break."""
    if not _odd_quotes(data, span):
        return False
    from crawlproc.processors.csv_read import holds_quoted_line_breaks

    return holds_quoted_line_breaks(data, span, names, delimiter)


def _shown(header: list[str], most: int = 12, width: int = 40) -> str:
    """A header for an error line: a file that is not CSV has a first line of any length."""
    cells = [cell if len(cell) <= width else cell[:width] + "..." for cell in header[:most]]
    more = f" and {len(header) - most} more" if len(header) > most else ""
    return f"{cells!r}{more}"


@processor(version="1", imports=_ARROW_MODULES)  # pyarrow: imported by the workers' forkserver, once
def csv_stats(task: Task) -> dict:
    """Rows and count/sum/min/max of each numeric column (--param group_by=COL, columns=A,B); exact totals."""
    delimiter = _delimiter(task.params)
    group_by = task.params.get("group_by") or None
    header = _read_header(task.path, delimiter)
    record: dict[str, Any] = {"path": task.relpath, "offset": task.offset or 0, "rows": 0, "malformed": 0}
    if group_by:
        record["group_by"] = group_by
    if header is None:
        record["groups" if group_by else "columns"] = {}
        return record
    group_index = None
    if group_by:
        if group_by not in header:
            raise TaskFailed(f"csv-stats: group_by column {group_by!r} is not in the header {_shown(header)}")
        group_index = header.index(group_by)
    from crawlproc.processors.csv_numbers import block_stats
    from crawlproc.processors.csv_read import Rows

    names = _column_names(header)
    data, span, base = load_span(task.path, task.offset, task.length)
    at_top = not task.offset
    if at_top:  # the header is not a row
        cut = data.find(b"\n", span.start, span.end)
        span = Span(span.end if cut == -1 else cut + 1, span.end)
    if task.length is not None and _cut_inside_quotes(data, span, names, delimiter):
        raise TaskFailed("csv-stats: a quoted field with a line break crosses an edge of this byte range of the "
                         "file (--chunk-size), so its rows cannot be read apart from the next range's; "
                         "run without --chunk-size")
    key = names[group_index] if group_index is not None else None
    wanted = _wanted_columns(task.params, header)
    numeric = {j: name for j, name in enumerate(names) if j != group_index and (wanted is None or j in wanted)}
    only = None if wanted is None else [*([key] if key is not None else []), *numeric.values()]
    rows = Rows(data, span, names, delimiter, text=[key] if key is not None else [], only=only)
    groups: dict[str | None, _Group] = {}
    for block in rows.collect(lambda table: block_stats(table, key, numeric)):
        for raw, (n, partials) in block.items():
            name = None if key is None else (raw or b"").decode("utf-8", "replace")
            group = groups.get(name)
            if group is None:
                group = groups[name] = _Group()
            group.add(n, partials)
    record["rows"] = sum(group.rows for group in groups.values())
    record["malformed"] = rows.malformed
    if rows.samples:
        record["malformed_samples"] = [
            {"offset": None if offset is None else base + offset,
             **({"line": None if line is None else line + 1} if at_top else {}), "error": error}
            for offset, line, error in rows.located()]
    if group_by:
        record["groups"] = {name: {"rows": group.rows, "columns": group.stats(names)}
                            for name, group in sorted(groups.items())}
    else:
        group = groups.get(None)
        record["columns"] = group.stats(names) if group else {}
    return record


PARAMS = ("delimiter", "group_by", "columns")


def _check_params(params: Any) -> None:
    """At the start of a run: a --param name csv-stats does not take (a typo would be ignored,
    and the run go on with the default), a delimiter it cannot use, or an empty column name."""
    from crawlproc.errors import UsageError

    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], PARAMS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UsageError(f"csv-stats has no --param {unknown[0]!r} ({hint}it takes {', '.join(PARAMS)})")
    try:
        _delimiter(params)
    except TaskFailed as exc:
        raise UsageError(str(exc)) from None
    for name in ("group_by", "columns"):
        if name in params and not params[name].strip(" ,"):
            raise UsageError(f"csv-stats: --param {name}= needs a column name (or leave it out)")


csv_stats.check_params = _check_params


# -- the reducer -----------------------------------------------------------------

@csv_stats.reducer
def csv_totals(records: Iterable[dict]) -> dict:
    """Exact totals over every file and chunk: rows, malformed, per column (and group) stats."""
    paths: set[str] = set()
    tasks = rows = malformed = 0
    samples: list[dict] = []
    columns: dict[str, ColumnStats] = {}
    groups: dict[str, tuple[list[int], dict[str, ColumnStats]]] = {}
    group_by = None
    for record in records:
        tasks += 1
        paths.add(record["path"])
        rows += record["rows"]
        malformed += record["malformed"]
        for sample in record.get("malformed_samples", ()):
            if len(samples) < REDUCED_SAMPLES:
                samples.append({"path": record["path"], **sample})
        if "groups" in record:
            group_by = record.get("group_by", group_by)
            for key, grp in record["groups"].items():
                count_cols = groups.get(key)
                if count_cols is None:
                    count_cols = groups[key] = ([0], {})
                count_cols[0][0] += grp["rows"]
                _merge_columns(count_cols[1], grp["columns"])
        else:
            _merge_columns(columns, record.get("columns", {}))
    out: dict[str, Any] = {"files": len(paths), "tasks": tasks, "rows": rows, "malformed": malformed}
    if group_by is not None or groups:
        out["group_by"] = group_by
        out["groups"] = {
            key: {"rows": n[0], "columns": {c: col.result(parts=False) for c, col in cols.items()}}
            for key, (n, cols) in sorted(groups.items())
        }
    else:
        out["columns"] = {c: col.result(parts=False) for c, col in columns.items()}
    if samples:
        out["malformed_samples"] = samples
    return out


def _merge_columns(into: dict[str, ColumnStats], stats: dict[str, dict]) -> None:
    for name, col in stats.items():
        acc = into.get(name)
        if acc is None:
            acc = into[name] = ColumnStats()
        acc.merge(col)
