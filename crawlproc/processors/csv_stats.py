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

Speed: the task's lines are read in blocks of ~64 KiB. A block without quote
characters whose lines all have the header's width is split with str methods
(the very fields the csv module would give); other blocks go through the csv
module. Each column of a block is converted with `map(int, ...)` or
`map(float, ...)` at once, grouped rows are gathered with `itemgetter`, and
exact float sums come from `math.fsum`: no per-cell Python code on the common
path. About 1 µs per row of 5 columns with group_by (a csv.reader loop that
only sums one column per group takes ~0.7 µs; one that computes these stats
per cell takes ~5 µs).
"""

from __future__ import annotations

import csv
import gc
import io
import math
import operator
import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any

from crawlproc.errors import TaskFailed
from crawlproc.processors.base import processor
from crawlproc.task import Task

BLOCK_SIZE = 1 << 16          # bytes per block: small enough to stay in the CPU caches
MAX_SAMPLES = 5               # malformed rows described per task
REDUCED_SAMPLES = 10          # ... and in the reduced summary
_EXACT = float(1 << 53)       # integers below this are exact as floats
_SPAN = float(1 << 54)        # see _expansion
_PENDING_FLUSH = 1 << 20      # values buffered by the many-groups path before folding
_FOLD = 1 << 12               # floats buffered per column before their exact sum is updated

_NUM = r"[ \t\n\x0b\x0c\r]*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?[ \t\n\x0b\x0c\r]*"
_INT = r"[ \t\n\x0b\x0c\r]*[-+]?[0-9]+[ \t\n\x0b\x0c\r]*"
_is_num = re.compile(_NUM).fullmatch
_is_int = re.compile(_INT).fullmatch
_NUMCHARS = " \t\n\x0b\x0c\r0123456789+-.eE"   # the only characters a numeric value can hold
_NUMBYTES = _NUMCHARS.encode()


def _clean(values: Sequence[str], bad: str) -> bool:
    """No value holds a character that int()/float() accept but a decimal literal may not have."""
    joined = "".join(values)
    return joined.isascii() and not any(b in joined for b in bad)


# -- converting one column ------------------------------------------------------

def _convert(values: Sequence[str], clean: bool = False, whole: bool = False) -> tuple[list, list, tuple | None]:
    """The numeric values of `values`: (integer literals as int, other literals as float, bounds).

    `clean` says the values are known to be ASCII without underscores. `bounds`
    is (min, max) of the floats when already computed, else None. With `whole`,
    only the fast paths are tried (every value numeric): else ([], [], None).
    """
    if not values:
        return [], [], None
    try:
        ints = list(map(int, values))
    except ValueError:
        pass
    else:
        if clean or _clean(values, "_"):
            return ints, [], None
        return ([], [], None) if whole else _convert_slow(values)
    try:
        floats = list(map(float, values))
    except ValueError:
        pass
    else:
        # All parse as float and one at least is not an integer literal. Integer
        # literals among them are exact as floats below 2**53; nan and inf are
        # not numbers for us (their sum is not finite).
        if (clean or _clean(values, "_")) and math.isfinite(sum(floats)):
            lo, hi = min(floats), max(floats)
            if -_EXACT < lo and hi < _EXACT or not any(map(_is_int, values)):
                return [], floats, (lo, hi)
        return ([], [], None) if whole else _convert_slow(values)
    if whole:
        return [], [], None
    if "" in values or "\n" in values:
        values = [v for v in values if v and v != "\n"]
        return _convert(values, clean) if values else ([], [], None)
    if _is_text(values):
        return [], [], None
    return _convert_slow(values)


def _convert_slow(values: Iterable[str]) -> tuple[list, list, None]:
    ints: list = []
    floats: list = []
    for text in filter(_is_num, values):
        if _is_int(text):
            try:
                ints.append(int(text))
            except ValueError:  # more digits than int() accepts: not a number for us
                pass
        else:
            value = float(text)
            if math.isfinite(value):
                floats.append(value)
    return ints, floats, None


def _is_text(values: Sequence[str]) -> bool:
    """A quick 'no value of this column is numeric' (False means: some may be)."""
    if not values:
        return True
    first = values[0]
    try:
        float(first)
        return False
    except ValueError:
        pass
    for char in first:
        if char not in _NUMCHARS:
            # a character that no number has, in every value?
            if all(map(operator.contains, values, repeat(char))):
                return True
            break
    # Delete every character a number may hold: a numeric value leaves nothing
    # between its two separators.
    joined = ("\0" + "\0".join(values) + "\0").encode("utf-8", "surrogatepass")
    return b"\0\0" not in joined.translate(None, _NUMBYTES)


def _aligned(values: Sequence[str], clean: bool) -> list:
    """One entry per value: int, float, or None (not numeric). For the many-groups path."""
    try:
        ints = list(map(int, values))
        if clean or _clean(values, "_"):
            return ints
    except ValueError:
        pass
    out: list = []
    append = out.append
    for text in values:
        if not _is_num(text):
            append(None)
        elif _is_int(text):
            try:
                append(int(text))
            except ValueError:
                append(None)
        else:
            value = float(text)
            append(value if math.isfinite(value) else None)
    return out


# -- exact sums -----------------------------------------------------------------

def _expansion(values: list, smallest: float | None = None) -> list[float]:
    """The exact sum of `values` as non-overlapping floats, largest first (consumes `values`).

    `smallest`, when given, is the least non-zero magnitude among `values`: every
    value is then a multiple of q = ulp(smallest), and so is the exact residual
    after the first part; when that residual has at most 53 bits above q it is
    a float, the second fsum returns it exactly and the check for a third part
    (another pass over all values) can be skipped.
    """
    parts: list[float] = []
    while True:
        total = math.fsum(values)
        if not total:
            return parts
        parts.append(total)
        values.append(-total)
        if len(parts) == 2 and smallest and math.ulp(parts[0]) <= _SPAN * math.ulp(smallest):
            return parts


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

    __slots__ = ("count", "isum", "fparts", "pending", "smallest", "has_float", "min", "max", "overflow")

    def __init__(self) -> None:
        self.count = 0
        self.isum = 0
        self.fparts: list[float] = []
        self.pending: list[float] = []
        self.smallest: float | None = None   # least magnitude in `pending`, if known
        self.has_float = False
        self.min: Any = None
        self.max: Any = None
        self.overflow = False

    def add(self, ints: list, floats: list, bounds: tuple | None = None) -> None:
        """Add integer literals and other values; `bounds` is (min, max) of `floats` if known."""
        if ints:
            self.count += len(ints)
            self._bound(min(ints), max(ints))
            self.isum += sum(ints)
        if floats:
            self.count += len(floats)
            lo, hi = bounds or (min(floats), max(floats))
            self._bound(lo, hi)
            self.has_float = True
            # the least magnitude of the floats, known for free when they share a sign
            small = lo if lo > 0 else -hi if hi < 0 else None
            if small is None or self.smallest is None:
                self.smallest = small if not self.pending else None
            elif small < self.smallest:
                self.smallest = small
            self._add_parts(floats)

    def _bound(self, lo: Any, hi: Any) -> None:
        if self.min is None or lo < self.min:
            self.min = lo
        if self.max is None or hi > self.max:
            self.max = hi

    def _add_parts(self, floats: list) -> None:
        # Floats wait in `pending` and are folded into the exact `fparts` in
        # large batches: the same work per value, far fewer calls.
        self.pending.extend(floats)
        if len(self.pending) >= _FOLD:
            self._fold()

    def _fold(self) -> None:
        values, self.pending = self.pending, []
        smallest, self.smallest = self.smallest, None
        if self.overflow or not values:
            return
        if smallest is not None and self.fparts:
            smallest = min(smallest, *(abs(p) for p in self.fparts))
        values.extend(self.fparts)
        try:
            self.fparts = _expansion(values, smallest)
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
            self.smallest = None  # unknown from here on
            self._add_parts(stats.get("sum_parts") or [total])
        else:
            self.isum += total

    def result(self, *, parts: bool = True) -> dict:
        self._fold()
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
        # `+ 0.0` turns -0.0 into 0.0: which zero comes first must not matter
        out = {"count": self.count, "sum": total, "min": float(self.min) + 0.0, "max": float(self.max) + 0.0}
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


def _blocks(path: str, offset: int | None, length: int | None, size: int | None = None) -> Iterator[bytes]:
    """The bytes of the lines that start in the task's range, in blocks of whole lines.

    Exactly `b"".join(task.lines(binary=True))`, without a Python step per line.
    """
    size = size or BLOCK_SIZE
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
        self.groups: dict[str | None, _Group] = {}
        self.malformed = 0
        self.samples: list[dict] = []       # {"line": task line number, "error": ...}
        self.pending: dict[str, dict[int, list]] = {}  # many-groups path: values not yet folded
        self.npending = 0
        self.clean = False                  # the current block is ASCII without underscores

    # -- one block of lines

    def feed(self, data: bytes, first_line: int) -> None:
        """Add a block of whole lines; `first_line` is the task line number of its first line."""
        self.clean = data.isascii() and b"_" not in data
        text = data.decode("utf-8", "replace")
        if '"' not in text:
            cols = self._split(text)
            if cols is not None:
                self._add(cols)
                return
        self._feed_csv(text, first_line)

    def _split(self, text: str) -> list | None:
        """The columns of a block without quotes, if every line is a row of the header's width.

        The csv module would give the same fields; this is several times faster.
        The last column keeps each line's "\n" (int() and float() ignore it).
        """
        if "\r" in text:
            if text.count("\r") != text.count("\r\n"):
                return None  # a lone CR: the csv module decides
            text = text.replace("\r\n", "\n")
        if not text.endswith("\n"):
            text += "\n"
        ncols, delim = self.ncols, self.delimiter
        if ncols == 0 or (ncols == 1 and ("\n\n" in text or text.startswith("\n"))):
            return None  # blank lines: the csv module skips them
        lines = text.count("\n")
        fields = text.replace("\n", "\n" + delim).split(delim)
        fields.pop()  # "" after the last newline
        if len(fields) != lines * ncols:
            return None
        last = fields[ncols - 1::ncols]
        if "".join(last).count("\n") != lines:
            return None  # some line has another width: the csv module decides
        cols = [fields[j::ncols] for j in range(ncols - 1)]
        cols.append(last)
        if self.g == ncols - 1:
            cols[-1] = [v[:-1] for v in last]
        return cols

    def _feed_csv(self, text: str, first_line: int) -> None:
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
            self._add(list(zip(*rows)))

    def _bad(self, line: int | None, error: str) -> None:
        self.malformed += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append({"line": line, "error": error})

    # -- statistics of well-formed rows, column-wise

    def _group(self, key: str | None) -> _Group:
        grp = self.groups.get(key)
        if grp is None:
            grp = self.groups[key] = _Group()
        return grp

    def _add(self, cols: list[Sequence[str]]) -> None:
        n = len(cols[0])
        if self.g is None:
            self._add_group(self._group(None), cols, range(self.ncols), n)
            return
        keys = cols[self.g]
        distinct = set(keys)
        numeric = [j for j in range(self.ncols) if j != self.g and not _is_text(cols[j])]
        if len(distinct) == 1:
            self._add_group(self._group(keys[0]), cols, numeric, n)
        elif len(distinct) <= max(64, n // 16):
            self._add_few_groups(cols, keys, distinct, numeric)
        else:
            self._add_many_groups(cols, keys, numeric)

    def _add_few_groups(self, cols: list[Sequence[str]], keys: Sequence[str], distinct: set,
                        numeric: list[int]) -> None:
        """Few group values: convert each column whole, then gather each group's numbers.

        Converting the block's column in one go is much faster than converting
        each group's share: the strings are read in the order they were made.
        """
        converted = []
        for j in numeric:
            ints, floats, bounds = _convert(cols[j], self.clean, whole=True)
            # every value numeric: gather numbers; else gather strings and convert per group
            converted.append((j, ints or floats or None, bool(floats)))
        index: dict[str, list[int]] = {k: [] for k in distinct}
        appends = {k: v.append for k, v in index.items()}
        for i, key in enumerate(keys):
            appends[key](i)
        for key, rows in index.items():
            grp = self._group(key)
            grp.rows += len(rows)
            take = operator.itemgetter(*rows)
            single = len(rows) == 1
            for j, values, is_float in converted:
                if values is None:
                    strings = (take(cols[j]),) if single else take(cols[j])
                    ints, floats, bounds = _convert(strings, self.clean)
                elif not is_float:
                    ints, floats, bounds = ((take(values),) if single else take(values)), (), None
                else:
                    floats, ints, bounds = ((take(values),) if single else take(values)), (), None
                    col = cols[j]
                    if _is_int(col[rows[0]]) and all(map(_is_int, map(col.__getitem__, rows))):
                        # this group has integer literals only: exact ints, as a lone group would
                        ints, floats = [int(col[i]) for i in rows], ()
                if ints or floats:
                    grp.column(j).add(ints, floats, bounds)

    def _add_group(self, grp: _Group, cols: list[Sequence[str]], numeric: Iterable[int], n: int) -> None:
        grp.rows += n
        for j in numeric:
            ints, floats, bounds = _convert(cols[j], self.clean)
            if ints or floats:
                grp.column(j).add(ints, floats, bounds)

    def _add_many_groups(self, cols: list[Sequence[str]], keys: Sequence[str], numeric: list[int]) -> None:
        """Many distinct group values: convert each column once, then a step per row."""
        values = [(j, _aligned(cols[j], self.clean)) for j in numeric]
        pending = self.pending
        rows: dict[str, int] = {}
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
    if group_by:
        record["group_by"] = group_by
    if header is None:
        record["groups" if group_by else "columns"] = {}
        return record
    group_index = None
    if group_by:
        if group_by not in header:
            raise TaskFailed(f"csv-stats: group_by column {group_by!r} is not in the header {header!r}")
        group_index = header.index(group_by)
    stats = _Stats(len(header), _column_names(header), group_index, delimiter)
    at_top = not task.offset
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived lists: the cyclic GC would only slow us down
    try:
        line = 1
        for data in _whole_records(_blocks(task.path, task.offset, task.length)):
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
        if b'"' not in pending or pending.count(b'"') % 2 == 0:
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
