"""csv-stats' numbers: statistics of a block of rows with Arrow compute, no Python step per row.

    string columns ──a value made of number characters only──> float64 (Arrow's
    parser takes exactly the decimal literals) ──> per column: which values are
    integer literals, and the levels of an exact sum
    int64 columns (as csv_read's Arrow inferred them) ──> float64, all integer literals
    float64 columns ──> which values are integral: a group whose every value is
    integral raises NeedsText (`5` and `5.0` read the same; only the text says
    which is an integer literal), as do a NaN, an infinity or a value past 2**53
        ──one group_by(key).aggregate()──> per group: rows, and per column
          count, min, max, level sums ──> {key: (rows, {column: Partial})}

A value is numeric when it is a decimal literal: optional sign, digits with an
optional fraction and exponent, ASCII whitespace around it (`12`, `-3.5`, `1e6`,
` 7 `); not `n/a`, `inf`, `1_000`, `0x1f`, nor one that overflows a float.

Exact sums without a step per value: a float x is split into levels, each
rounded to a grid (`(x + C) - C` with C = 1.5 * 2**52 * grid rounds to the
grid), the next grid 2**(51 - L) times finer (2**L > the number of values), the
last level what is left. Each level's values are multiples of its grid with
few enough bits that every partial sum is exact, in any order: Arrow's float
sum of a level is exact, and the levels' sums add up, as Python ints of
2**-1074 units, to the exact sum. Integer literals beyond 2**53 (rounded as
floats) and values near the float range's end take the Python path, which
converts each value (`_python_stats`).
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

# No pandas in a csv-stats worker: when pandas is installed, pyarrow imports it (~0.2 s, before
# the first worker can start) on importing pyarrow.acero (it imports pyarrow.dataset) and on
# turning a Python value into an Arrow scalar. So the group-by plan is built the way
# Table.group_by builds it, from pyarrow's Acero classes, and constants come from _constant().
try:
    from pyarrow._acero import AggregateNodeOptions, Declaration, TableSourceNodeOptions
except ImportError:  # a pyarrow that moved them: Table.group_by, pandas or not
    Declaration = None

from crawlproc.processors.csv_read import NeedsText
from crawlproc.processors.exact import ColumnStats, float_units

NUMBER_CHARS = " \t\n\x0b\x0c\r0123456789+-.eE"   # the only characters a numeric value holds
_WS = "[ \\t\\n\\x0b\\x0c\\r]*"
_LITERAL = "[-+]?(?:[0-9]+\\.?[0-9]*|\\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_ANCHORED_NUMBER = f"^{_WS}{_LITERAL}{_WS}$"
_is_number = re.compile(f"{_WS}{_LITERAL}{_WS}").fullmatch
_is_int = re.compile(f"{_WS}[-+]?[0-9]+{_WS}").fullmatch
_EXACT_INT = 2.0 ** 53     # integer literals below this are exact as floats
_LARGEST_EXPONENT = 1000   # values past 2**this take the Python path (level constants would overflow)
_INT_CHARS = "0123456789+-"   # all an integer literal holds (once it parses as a number)
_NULL = pa.nulls(1, pa.string())[0]
_NULL_FLOAT = pa.nulls(1, pa.float64())[0]


def _constant(value: float, type_: pa.DataType) -> pa.Scalar:
    """An int32 or float64 Arrow scalar, made from its bytes rather than by pa.scalar()."""
    layout = {pa.int32(): "=i", pa.float64(): "=d"}[type_]
    return pa.Array.from_buffers(type_, 1, [None, pa.py_buffer(struct.pack(layout, value))])[0]


_NO_CHARS = _constant(0, pa.int32())   # the length of an empty string
_ZERO = _constant(0.0, pa.float64())


class Partial(NamedTuple):
    """One column's numbers in one group of one block."""

    count: int
    units: int        # exact sum, in units of 2**-1074
    low: Any
    high: Any
    has_float: bool


class _Column(NamedTuple):
    """A column ready for the group_by: its values, integer-literal flags, exact-sum levels."""

    index: int
    values: pa.Array          # float64, null where not numeric
    int_flags: pa.Array | None  # int8 1 for an integer literal; None when all or none are
    all_ints: bool
    levels: list[pa.Array]
    integral_only: bool = False  # int_flags mark integral values (the column was read as floats)


BlockStats = dict[Any, tuple[int, dict[int, Partial]]]   # key (bytes, or None) -> rows, partials


def block_stats(table: pa.Table, key: str | None, columns: dict[int, str]) -> BlockStats:
    """Rows per group and the partials of each of `columns` (index in the header: name) that
    holds numbers, for a table of string, int64 or float64 columns."""
    keys = table[key].cast(pa.binary()) if key is not None else None
    arrays: dict[str, Any] = {"__key": keys} if keys is not None else {"__rows": pa.nulls(table.num_rows)}
    aggregates: list[tuple] = [(next(iter(arrays)), "count", pc.CountOptions(mode="all"))]
    prepared: list[_Column] = []
    slow: BlockStats = {}
    for j, name in columns.items():
        column = _prepare(j, table.column(name).combine_chunks())
        if column is None:
            continue
        if isinstance(column, pa.Array):  # values the Arrow path cannot sum exactly
            _python_stats(j, column, keys, slow)
            continue
        prepared.append(column)
        arrays[f"v{j}"] = column.values
        if column.values.null_count:  # else each group's count is its rows
            aggregates.append((f"v{j}", "count"))
        aggregates.append((f"v{j}", "min_max"))
        if column.int_flags is not None:
            arrays[f"i{j}"] = column.int_flags
            aggregates.append((f"i{j}", "sum"))
        for n, level in enumerate(column.levels):
            arrays[f"l{j}_{n}"] = level
            aggregates.append((f"l{j}_{n}", "sum"))
    out: BlockStats = {}
    for row in _group_by(pa.table(arrays), ["__key"] if keys is not None else [], aggregates).to_pylist():
        group = row.get("__key")
        rows = row.get("__key_count", row.get("__rows_count"))
        partials = {c.index: p for c in prepared if (p := _partial(c, row, rows)) is not None}
        out[group] = (rows, partials)
    for group, (_, partials) in slow.items():
        out[group][1].update(partials)
    return out


def _group_by(table: pa.Table, keys: list[str], aggregates: list[tuple]) -> pa.Table:
    """`table.group_by(keys).aggregate(aggregates)`, one thread, without pyarrow.acero."""
    if Declaration is None:
        return table.group_by(keys, use_threads=False).aggregate(aggregates)
    prefix = "hash_" if keys else ""
    named = [([target], prefix + func, options[0] if options else None, f"{target}_{func}")
             for target, func, *options in aggregates]
    plan = Declaration.from_sequence([Declaration("table_source", TableSourceNodeOptions(table)),
                                      Declaration("aggregate", AggregateNodeOptions(named, keys=keys))])
    return plan.to_table(use_threads=False)


def _partial(column: _Column, row: dict, rows: int) -> Partial | None:
    j = column.index
    count = row.get(f"v{j}_count", rows)
    if not count:
        return None
    bounds = row[f"v{j}_min_max"]
    units = sum(float_units(row[f"l{j}_{n}_sum"] or 0.0) for n in range(len(column.levels)))
    all_ints = column.all_ints or (column.int_flags is not None and row[f"i{j}_sum"] == count)
    if all_ints and column.integral_only:
        raise NeedsText(f"column {j}: a group of integral values, integer literals or not")
    if all_ints:
        return Partial(count, units, int(bounds["min"]), int(bounds["max"]), False)
    return Partial(count, units, bounds["min"], bounds["max"], True)


def _prepare(j: int, column: pa.Array) -> _Column | pa.Array | None:
    """The column's numbers, ready to aggregate; None if it has none; its literals (strings,
    null where not numeric) when they need the Python path."""
    if column.type == pa.int64():
        return _from_integers(j, column)
    if column.type == pa.float64():
        return _from_floats(j, column)
    if column.type == pa.string():
        return _from_text(j, column)
    return None  # all empty (null), true/false, dates, times, timestamps: none is a decimal literal


def _from_integers(j: int, ints: pa.Array) -> _Column | pa.Array | None:
    if ints.null_count == len(ints):
        return None
    bounds = pc.min_max(ints).as_py()
    largest = max(-bounds["min"], bounds["max"])
    if largest >= _EXACT_INT:  # not exact as floats: the Python path, from the digits
        return pc.cast(ints, pa.string())
    values = pc.cast(ints, pa.float64())
    return _Column(j, values, None, True, _levels(values, largest, 0) if largest else [])


def _from_floats(j: int, values: pa.Array) -> _Column | None:
    if values.null_count == len(values):
        return None
    bounds = pc.min_max(values).as_py()
    largest = max(-bounds["min"], bounds["max"])
    if not math.isfinite(pc.sum(values).as_py()) or largest >= _EXACT_INT:
        # "nan" and "inf" are text to csv-stats; and an integer literal past 2**53 was rounded
        raise NeedsText(f"column {j}: a value that is not finite, or an integral one past 2**53")
    integral = pc.equal(pc.floor(values), values)
    int_flags = pc.cast(integral, pa.int8()) if pc.any(integral).as_py() else None
    if not largest:
        return _Column(j, values, int_flags, False, [], integral_only=True)
    finest = _exponent(math.ulp(bounds["min"] if bounds["min"] > 0 else _smallest_nonzero(values)))
    return _Column(j, values, int_flags, False, _levels(values, largest, finest), integral_only=True)


def _from_text(j: int, strings: pa.Array) -> _Column | pa.Array | None:
    # an integer column costs one trim: every value made of digits and signs
    all_ints = _starts_like_integers(strings) and _all_empty(pc.ascii_ltrim(strings, characters=_INT_CHARS))
    if not all_ints:
        trimmed = pc.ascii_ltrim(strings, characters=NUMBER_CHARS)  # nothing left: only number characters
        found = _empty(trimmed)
        if not found:
            return None
        if found < len(strings) - strings.null_count:
            strings = pc.if_else(pc.equal(pc.binary_length(trimmed), _NO_CHARS), strings, _NULL)
    try:
        values = pc.cast(strings, pa.float64())
    except pa.ArrowInvalid:  # some value only looks numeric ("1.2.3", "-", " 7 ")
        strings, all_ints = _literals_only(strings), False
        values = pc.cast(strings, pa.float64())
    if values.null_count == len(values):
        return None
    bounds = pc.min_max(values).as_py()
    largest = max(-bounds["min"], bounds["max"])
    if not math.isfinite(largest) or math.frexp(largest)[1] > _LARGEST_EXPONENT:
        return strings
    int_flags, largest_int = None, largest if all_ints else 0.0
    if not all_ints:
        int_flags, all_ints, largest_int = _integer_literals(strings, values)
    if largest_int >= _EXACT_INT:
        return strings  # an integer literal may have been rounded
    if not largest:
        return _Column(j, values, int_flags, all_ints, [])
    # every value is a multiple of 2**finest: 1 for integers, else the least value's spacing
    finest = 0 if all_ints else _exponent(math.ulp(bounds["min"] if bounds["min"] > 0 else _smallest_nonzero(values)))
    return _Column(j, values, int_flags, all_ints, _levels(values, largest, finest))


def _starts_like_integers(strings: pa.Array) -> bool:
    """Whether the first values are integer literals: then the whole column is worth trying as one."""
    head = [v for v in strings.slice(0, 16).cast(pa.binary()).to_pylist() if v is not None]
    return bool(head) and all(v.lstrip(b"+-").isdigit() for v in head)


def _empty(strings: pa.Array) -> int:
    """How many values are empty strings."""
    lengths = pc.binary_length(strings)
    if (pc.min(lengths).as_py() or 0) > 0:
        return 0
    return pc.sum(pc.equal(lengths, _NO_CHARS)).as_py() or 0


def _all_empty(strings: pa.Array) -> bool:
    return not pc.max(pc.binary_length(strings)).as_py()


def _literals_only(strings: pa.Array) -> pa.Array:
    valid = pc.match_substring_regex(strings, _ANCHORED_NUMBER)
    return pc.if_else(valid, pc.ascii_trim_whitespace(strings), _NULL)


def _integer_literals(strings: pa.Array, values: pa.Array) -> tuple[pa.Array | None, bool, float]:
    """(int8 flags of the integer literals, or None when all or none are; whether all are; the
    largest magnitude of one).

    Only integral values can be integer literals: those are looked at first (few,
    in a column of decimals), the whole column only when some are.
    """
    integral = pc.equal(pc.floor(values), values)
    if not pc.any(integral).as_py():
        return None, False, 0.0
    if not _empty(pc.ascii_ltrim(pc.filter(strings, integral), characters=_INT_CHARS)):
        return None, False, 0.0
    digits_only = pc.equal(pc.binary_length(pc.ascii_ltrim(strings, characters=_INT_CHARS)), _NO_CHARS)
    largest = pc.max(pc.abs(pc.filter(values, digits_only))).as_py()
    if pc.sum(digits_only).as_py() == len(values) - values.null_count:
        return None, True, largest
    return pc.cast(digits_only, pa.int8()), False, largest


def _smallest_nonzero(values: pa.Array) -> float:
    magnitudes = pc.abs(values)
    return pc.min(pc.if_else(pc.equal(magnitudes, _ZERO), _NULL_FLOAT, magnitudes)).as_py()


def _exponent(power_of_two: float) -> int:
    return math.frexp(power_of_two)[1] - 1


def _levels(values: pa.Array, largest: float, finest: int) -> list[pa.Array]:
    """Arrays that add up, value by value, to `values`, each with an exact float sum.

    Level k holds multiples of 2**grid_k below 2**(grid_k + 51 - spare) in
    magnitude, so n < 2**spare of them add up exactly; what is left after a
    level is at most half its grid, the next grid is `step` bits finer. Once
    the grid reaches 2**finest, what is left is summed as it is.
    """
    spare = (len(values) + 1).bit_length()       # 2**spare > n
    step = 51 - spare
    grid = math.frexp(largest)[1] + spare - 51   # |x| < 2**(grid + 51 - spare)
    levels, rest = [], values
    while grid > finest:
        magic = _constant(1.5 * 2.0 ** (52 + grid), pa.float64())
        level = pc.subtract(pc.add(rest, magic), magic)
        levels.append(level)
        rest = pc.subtract(rest, level)
        grid -= step
    levels.append(rest)
    return levels


def _python_stats(j: int, strings: pa.Array, keys: pa.Array | None, into: BlockStats) -> None:
    """The exact, slow path: each literal converted by Python (ints of any size)."""
    values = strings.to_pylist()
    groups = keys.to_pylist() if keys is not None else [None] * len(values)
    found: dict[Any, tuple[list, list]] = {}
    for group, text in zip(groups, values):
        if text is None or not _is_number(text):
            continue
        ints, floats = found.setdefault(group, ([], []))
        if _is_int(text):
            try:
                ints.append(int(text))
            except ValueError:  # more digits than int() accepts: not a number for us
                pass
        elif math.isfinite(number := float(text)):
            floats.append(number)
    for group, (ints, floats) in found.items():
        stats = ColumnStats()
        stats.add_values(ints, floats)
        if stats.count:
            partial = Partial(stats.count, stats.units, stats.min, stats.max, stats.has_float)
            into.setdefault(group, (0, {}))[1][j] = partial
