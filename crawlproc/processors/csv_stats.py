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
- A value is numeric when it is a decimal literal: optional sign, digits with an
  optional fraction and exponent, ASCII spaces around it (`12`, `-3.5`, `1e6`,
  ` 7 `). Empty and other values (`n/a`, `inf`, `1_000`, `0x1f`) are skipped. A
  column (or group's column) appears once it has one numeric value.
- `sum` is an exact `int` while every numeric value of the column is an integer
  literal; otherwise a float: the correctly rounded exact sum of the values
  (not an order-dependent running float sum). `sum_parts`, present when the
  exact sum is not a single float, is that exact sum as a list of floats
  (`sum == math.fsum(sum_parts)`); the reducer uses it so that totals over all
  files and chunks are exactly the sums of a single pass.
- `--param delimiter=;` (or `tab`) picks another field delimiter.
- Records are read line by line: with --chunk-size a quoted field holding a
  newline, split by a chunk boundary, is not supported (whole files are fine).

Speed: a block of lines without quote characters is split with bytes methods
(the same fields the csv module would give), other blocks go through the csv
module; each column is converted with `map(int, ...)` / `map(float, ...)` over
the whole block, so there is no per-cell Python code on the common path.
"""

from __future__ import annotations

import csv
import gc
import io
import math
import operator
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import count, islice, repeat
from typing import Any

from crawlproc.errors import TaskFailed
from crawlproc.processors.base import processor
from crawlproc.task import Task

BLOCK_SIZE = 1 << 17          # bytes per block: small enough to stay in the CPU caches
MAX_SAMPLES = 5               # malformed rows described per task
REDUCED_SAMPLES = 10          # ... and in the reduced summary
_EXACT = float(1 << 53)       # integers below this are exact as floats
_PENDING_FLUSH = 1 << 20      # values buffered by the many-groups path before folding

_WS = " \t\n\x0b\x0c\r"      # what int() and float() strip, among ASCII characters
_NUM = r"[ \t\n\x0b\x0c\r]*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[ \t\n\x0b\x0c\r]*"
_INT = r"[ \t\n\x0b\x0c\r]*[-+]?[0-9]+[ \t\n\x0b\x0c\r]*"
_START = r"(?:^|\n)[ \t\n\x0b\x0c\r0-9+.\-]"
_NUMCHARS = set(_WS + "0123456789+-.eE")


class _Kind:
    """Helpers for one value type: the fast path splits `bytes`, the csv module gives `str`."""

    def __init__(self, empty: Any, encode: Any) -> None:
        self.empty = empty
        self.nl = encode("\n")
        self.num = re.compile(encode(_NUM)).fullmatch
        self.int = re.compile(encode(_INT)).fullmatch
        self.start = re.compile(encode(_START)).search
        self.bad_int = [encode("_")]
        self.bad_float = [encode(c) for c in "_nN"]
        self.numchars = {encode(c) for c in _NUMCHARS}
        self.is_bytes = isinstance(empty, bytes)

    def clean(self, values: Sequence, bad: list) -> bool:
        """True if `values` has no character that int()/float() accept but a literal may not have."""
        joined = self.empty.join(values)
        if not self.is_bytes and not joined.isascii():
            return False
        return not any(b in joined for b in bad)

    def chars(self, value: Any) -> Iterator[Any]:
        return (value[i:i + 1] for i in range(len(value))) if self.is_bytes else iter(value)


_BYTES = _Kind(b"", str.encode)
_STR = _Kind("", str)


def _kind(values: Sequence) -> _Kind:
    return _BYTES if isinstance(values[0], bytes) else _STR


# -- converting one column ------------------------------------------------------

def _convert(values: Sequence, kind: _Kind) -> tuple[list, list]:
    """The numeric values of `values`: (integer literals as int, other literals as float)."""
    if not values:
        return [], []
    try:
        ints = list(map(int, values))
    except ValueError:
        pass
    else:
        if kind.clean(values, kind.bad_int):
            return ints, []
        return _convert_slow(values, kind)
    try:
        floats = list(map(float, values))
    except ValueError:
        pass
    else:
        # All parse as float and one at least is not an integer literal. Integer
        # literals among them are exact as floats below 2**53.
        if kind.clean(values, kind.bad_float):
            if -_EXACT < min(floats) and max(floats) < _EXACT:
                return [], floats
            if math.isfinite(sum(floats)) and not any(map(kind.int, values)):
                return [], floats  # large, but no integer literal that a float would round
        return _convert_slow(values, kind)
    if kind.empty in values:
        values = list(filter(None, values))
        return _convert(values, kind) if values else ([], [])
    if _is_text(values, kind):
        return [], []
    return _convert_slow(values, kind)


def _convert_slow(values: Iterable, kind: _Kind) -> tuple[list, list]:
    ints: list = []
    floats: list = []
    for text in filter(kind.num, values):
        if kind.int(text):
            try:
                ints.append(int(text))
            except ValueError:  # more digits than int() accepts: not a number for us
                pass
        else:
            value = float(text)
            if math.isfinite(value):
                floats.append(value)
    return ints, floats


def _is_text(values: Sequence, kind: _Kind) -> bool:
    """A quick 'no value of this column is numeric' (False means: maybe some are)."""
    if not values:
        return True
    try:
        float(values[0])
        return False
    except ValueError:
        pass
    if not kind.start(kind.nl.join(values)):
        return True  # no value starts like a number
    for char in kind.chars(values[0]):
        if char not in kind.numchars:
            # every value holding a character a number cannot have
            return all(map(operator.contains, values, repeat(char)))
    return False


def _aligned(values: Sequence, kind: _Kind) -> list:
    """One entry per value: int, float, or None (not numeric). For the many-groups path."""
    try:
        ints = list(map(int, values))
        if kind.clean(values, kind.bad_int):
            return ints
    except ValueError:
        pass
    out: list = []
    append = out.append
    for text in values:
        if not kind.num(text):
            append(None)
        elif kind.int(text):
            try:
                append(int(text))
            except ValueError:
                append(None)
        else:
            value = float(text)
            append(value if math.isfinite(value) else None)
    return out


# -- exact sums -----------------------------------------------------------------

def _expansion(values: list) -> list[float]:
    """The exact sum of `values` as non-overlapping floats, largest first (consumes `values`)."""
    parts: list[float] = []
    while True:
        total = math.fsum(values)
        if not total:
            return parts
        parts.append(total)
        values.append(-total)


def _int_parts(n: int) -> list[float]:
    """An int as floats whose exact sum is `n`."""
    parts = []
    while n:
        f = float(n)
        parts.append(f)
        n -= int(f)
    return parts


class _Column:
    """count/sum/min/max of one column (of one group), exact whatever the order of adds."""

    __slots__ = ("count", "isum", "fparts", "has_float", "min", "max", "overflow")

    def __init__(self) -> None:
        self.count = 0
        self.isum = 0
        self.fparts: list[float] = []
        self.has_float = False
        self.min: Any = None
        self.max: Any = None
        self.overflow = False

    def add(self, ints: list, floats: list) -> None:
        for values in (ints, floats):
            if not values:
                continue
            self.count += len(values)
            lo, hi = min(values), max(values)
            if self.min is None or lo < self.min:
                self.min = lo
            if self.max is None or hi > self.max:
                self.max = hi
        if ints:
            self.isum += sum(ints)
        if floats:
            self.has_float = True
            self._add_parts(floats)

    def _add_parts(self, floats: list) -> None:
        if self.overflow:
            return
        try:
            self.fparts.extend(_expansion(floats))
        except OverflowError:
            self.overflow = True

    def merge(self, stats: dict) -> None:
        """Add a column of a record (as written by `result`)."""
        self.count += stats["count"]
        lo, hi, total = stats["min"], stats["max"], stats["sum"]
        if self.min is None or lo < self.min:
            self.min = lo
        if self.max is None or hi > self.max:
            self.max = hi
        if total is None:
            self.has_float = self.overflow = True
        elif isinstance(total, float) or "sum_parts" in stats:
            self.has_float = True
            if not self.overflow:
                self.fparts.extend(stats.get("sum_parts") or [total])
        else:
            self.isum += total

    def result(self, *, parts: bool = True) -> dict:
        if not self.has_float:
            return {"count": self.count, "sum": self.isum, "min": self.min, "max": self.max}
        total: float | None
        exact: list[float] = []
        if self.overflow:
            total = None
        else:
            try:
                exact = _expansion(self.fparts + _int_parts(self.isum))
                total = exact[0] if exact else 0.0
            except OverflowError:
                total = None
        out = {"count": self.count, "sum": total, "min": float(self.min), "max": float(self.max)}
        if total is None:
            out["overflow"] = True
        elif parts and len(exact) > 1:
            out["sum_parts"] = exact
        return out


class _Group:
    __slots__ = ("rows", "columns")

    def __init__(self) -> None:
        self.rows = 0
        self.columns: dict[int, _Column] = {}

    def column(self, index: int) -> _Column:
        col = self.columns.get(index)
        if col is None:
            col = self.columns[index] = _Column()
        return col


# -- reading the task's lines in blocks ----------------------------------------

def _span_start(f: Any, offset: int | None) -> int:
    """Position of the first line that starts at or after `offset` (Task.lines() semantics)."""
    if not offset:
        return 0
    f.seek(offset - 1)
    if f.read(1) == b"\n":
        return offset
    return offset + len(f.readline())


def _blocks(path: str, offset: int | None, length: int | None, size: int = BLOCK_SIZE) -> Iterator[bytes]:
    """The bytes of the lines that start in the task's range, in blocks of whole lines.

    Exactly `b"".join(task.lines(binary=True))`, without a Python step per line.
    """
    with open(path, "rb") as f:
        start = _span_start(f, offset)
        f.seek(start)
        remaining = None if length is None else offset + length - start  # type: ignore[operator]
        if remaining is not None and remaining <= 0:
            return
        carry = b""
        while True:
            buf = f.read(size if remaining is None else min(size, remaining))
            if not buf:
                break
            if remaining is not None:
                remaining -= len(buf)
                if remaining <= 0:
                    if not buf.endswith(b"\n"):
                        buf += f.readline()  # the last line that starts in the range
                    yield carry + buf
                    return
            data = carry + buf if carry else buf
            cut = data.rfind(b"\n") + 1
            if cut:
                yield data[:cut]
                carry = data[cut:]
            else:
                carry = data
        if carry:
            yield carry


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


# -- the processor --------------------------------------------------------------

class _Stats:
    """Statistics of one task, fed block by block."""

    def __init__(self, ncols: int, names: list[str], group_index: int | None, delimiter: str) -> None:
        self.ncols = ncols
        self.names = names
        self.g = group_index
        self.delimiter = delimiter
        self.bdelim = delimiter.encode()
        self.groups: dict[Any, _Group] = {}
        self.malformed = 0
        self.samples: list[dict] = []       # {"line": task line number, "error": ...}
        self.pending: dict[str, dict[int, list]] = {}  # many-groups path: values not yet folded
        self.npending = 0

    # -- one block of lines

    def feed(self, data: bytes, first_line: int) -> None:
        """Add a block of whole lines; `first_line` is the task line number of its first line."""
        if b'"' not in data and b"\x00" not in data:
            cols, n = self._split(data)
            if cols is not None:
                self._add(cols, n)
                return
        self._feed_csv(data, first_line)

    def _split(self, data: bytes) -> tuple[list | None, int]:
        """Fields of a quote-free block with bytes methods, if every line is a well-formed row."""
        if b"\r" in data:
            if data.count(b"\r") != data.count(b"\r\n"):
                return None, 0  # a lone CR: the csv module decides
            data = data.replace(b"\r\n", b"\n")
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        ncols = self.ncols
        if not lines or ncols == 0:
            return None, 0
        counts = set(map(bytes.count, lines, repeat(self.bdelim)))
        if counts != {ncols - 1} or (ncols == 1 and b"" in lines):
            return None, 0  # blank lines or rows of another width: the csv module decides
        flat = self.bdelim.join(lines).split(self.bdelim)
        return [flat[j::ncols] for j in range(ncols)], len(lines)

    def _feed_csv(self, data: bytes, first_line: int) -> None:
        text = data.decode("utf-8", "replace")
        reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=self.delimiter)
        rows: list[list[str]] = []
        segments: list[tuple[int, int, bool]] = []  # (first row index, first line, one line per row)
        while True:
            start_row, start_line = len(rows), reader.line_num
            try:
                rows.extend(reader)
                error = None
            except csv.Error as exc:
                error = exc
            used = reader.line_num - start_line - (1 if error else 0)
            segments.append((start_row, start_line, used == len(rows) - start_row))
            if error is None:
                break
            self._bad(first_line + reader.line_num - 1, f"csv: {error}")
        ncols = self.ncols
        if ncols == 0 or set(map(len, rows)) - {ncols}:
            good = []
            for i, row in enumerate(rows):
                if len(row) == ncols and ncols:
                    good.append(row)
                elif row:  # [] is a blank line
                    line = None
                    for seg_row, seg_line, exact in reversed(segments):
                        if seg_row <= i:
                            line = first_line + seg_line + (i - seg_row) if exact else None
                            break
                    self._bad(line, f"{len(row)} fields, expected {ncols}")
            rows = good
        if rows:
            self._add(list(zip(*rows)), len(rows))

    def _bad(self, line: int | None, error: str) -> None:
        self.malformed += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append({"line": line, "error": error})

    # -- statistics of well-formed rows, column-wise

    def _group(self, key: Any) -> _Group:
        if isinstance(key, bytes):
            key = key.decode("utf-8", "replace")
        grp = self.groups.get(key)
        if grp is None:
            grp = self.groups[key] = _Group()
        return grp

    def _add(self, cols: list[Sequence], n: int) -> None:
        kind = _kind(cols[0])
        if self.g is None:
            self._add_group(self._group(None), cols, range(self.ncols), n, kind)
            return
        keys = cols[self.g]
        distinct = set(keys)
        numeric = [j for j in range(self.ncols) if j != self.g and not _is_text(cols[j], kind)]
        if len(distinct) == 1:
            self._add_group(self._group(keys[0]), cols, numeric, n, kind)
        elif len(distinct) <= max(64, n // 16):
            index: dict[Any, list[int]] = {k: [] for k in distinct}
            appends = {k: v.append for k, v in index.items()}
            deque(map(operator.call, map(appends.__getitem__, keys), count()), 0)
            for key, rows in index.items():
                take = operator.itemgetter(*rows)
                if len(rows) == 1:
                    sub = [(take(col),) if j in numeric else () for j, col in enumerate(cols)]
                else:
                    sub = [take(col) if j in numeric else () for j, col in enumerate(cols)]
                self._add_group(self._group(key), sub, numeric, len(rows), kind)
        else:
            self._add_many_groups(cols, keys, numeric, kind)

    def _add_group(self, grp: _Group, cols: list[Sequence], numeric: Iterable[int], n: int, kind: _Kind) -> None:
        grp.rows += n
        for j in numeric:
            if j == self.g:
                continue
            ints, floats = _convert(cols[j], kind)
            if ints or floats:
                grp.column(j).add(ints, floats)

    def _add_many_groups(self, cols: list[Sequence], keys: Sequence, numeric: list[int], kind: _Kind) -> None:
        """Many distinct group values: convert each column once, then a step per row."""
        values = [(j, _aligned(cols[j], kind)) for j in numeric]
        pending = self.pending
        rows: dict[Any, int] = {}
        for i, key in enumerate(keys):
            rows[key] = rows.get(key, 0) + 1
            lists = pending.get(key)
            if lists is None:
                lists = pending[key] = {}
            for j, column in values:
                v = column[i]
                if v is not None:
                    lst = lists.get(j)
                    if lst is None:
                        lists[j] = [v]
                    else:
                        lst.append(v)
        for key, n in rows.items():
            self._group(key).rows += n
        self.npending += len(keys) * len(values)
        if self.npending > _PENDING_FLUSH:
            self.flush()

    def flush(self) -> None:
        for key, lists in self.pending.items():
            grp = self._group(key)
            for j, lst in lists.items():
                ints = [v for v in lst if type(v) is int]
                floats = [v for v in lst if type(v) is float] if len(ints) < len(lst) else []
                grp.column(j).add(ints, floats)
        self.pending.clear()
        self.npending = 0

    # -- the record

    def columns(self, grp: _Group) -> dict:
        return {self.names[j]: grp.columns[j].result() for j in sorted(grp.columns) if grp.columns[j].count}


@processor(version="1")
def csv_stats(task: Task) -> dict:
    """Rows and count/sum/min/max of each numeric column (--param group_by=COL); exact totals."""
    delimiter = _delimiter(task.params)
    group_by = task.params.get("group_by") or None
    header = _read_header(task.path, delimiter)
    record: dict[str, Any] = {"path": task.relpath, "offset": task.offset or 0, "rows": 0, "malformed": 0}
    if header is None:
        if group_by:
            record["group_by"] = group_by
            record["groups"] = {}
        else:
            record["columns"] = {}
        return record
    names = _column_names(header)
    group_index = None
    if group_by:
        if group_by not in header:
            raise TaskFailed(f"csv-stats: group_by column {group_by!r} is not in the header {header!r}")
        group_index = header.index(group_by)
    stats = _Stats(len(header), names, group_index, delimiter)
    at_top = not task.offset
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived lists: the cyclic GC would only slow us down
    try:
        line = 1
        blocks = _blocks(task.path, task.offset, task.length)
        for data in _whole_records(blocks):
            if at_top and line == 1:
                cut = data.find(b"\n") + 1 or len(data)  # the header is not a row
                data, line = data[cut:], 2
                if not data:
                    continue
            stats.feed(data, line)
            line += data.count(b"\n")
        stats.flush()
    finally:
        if gc_was_enabled:
            gc.enable()
    record["rows"] = sum(grp.rows for grp in stats.groups.values())
    record["malformed"] = stats.malformed
    if stats.samples:
        record["malformed_samples"] = _locate(task, stats.samples, at_top)
    if group_by:
        record["group_by"] = group_by
        record["groups"] = {
            key: {"rows": grp.rows, "columns": stats.columns(grp)}
            for key, grp in sorted(stats.groups.items())
        }
    else:
        grp = stats.groups.get(None)
        record["columns"] = stats.columns(grp) if grp else {}
    return record


def _whole_records(blocks: Iterator[bytes]) -> Iterator[bytes]:
    """Join blocks while a quoted field (odd number of quotes so far) runs past a block's end."""
    pending = b""
    for data in blocks:
        pending = pending + data if pending else data
        if pending.count(b'"') % 2 == 0:
            yield pending
            pending = b""
    if pending:
        yield pending


def _locate(task: Task, samples: list[dict], at_top: bool) -> list[dict]:
    """Turn task line numbers into byte offsets in the file (and file line numbers at the top)."""
    wanted = sorted({s["line"] for s in samples if s["line"] is not None})
    offsets: dict[int, int] = {}
    if wanted:
        with open(task.path, "rb") as f:
            pos = _span_start(f, task.offset)
            f.seek(pos)
            targets = iter(wanted)
            target = next(targets)
            for number, raw in enumerate(f, 1):
                while number == target:
                    offsets[number] = pos
                    target = next(targets, None)
                if target is None:
                    break
                pos += len(raw)
    out = []
    for s in samples:
        item: dict[str, Any] = {"offset": offsets.get(s["line"]) if s["line"] is not None else None}
        if at_top:
            item["line"] = s["line"]
        item["error"] = s["error"]
        out.append(item)
    return out


# -- the reducer -----------------------------------------------------------------

@csv_stats.reducer
def csv_totals(records: Iterable[dict]) -> dict:
    """Exact totals over every file and chunk: rows, malformed, per column (and group) stats."""
    paths: set[str] = set()
    tasks = rows = malformed = 0
    samples: list[dict] = []
    columns: dict[str, _Column] = {}
    groups: dict[str, tuple[list[int], dict[str, _Column]]] = {}
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


def _merge_columns(into: dict[str, _Column], stats: dict[str, dict]) -> None:
    for name, col in stats.items():
        acc = into.get(name)
        if acc is None:
            acc = into[name] = _Column()
        acc.merge(col)
