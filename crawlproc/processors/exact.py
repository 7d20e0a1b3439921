"""Exact sums of numbers, and the count/sum/min/max of one column that csv-stats reports.

Every finite float is an integer multiple of 2**-1074, so an exact sum of
floats (and integers) is one Python int of such units: no rounding happens
until the sum is shown, as the correctly rounded float of that exact value.
Integer columns stay Python ints, however large.

A record carries a float sum that one float cannot hold exactly as
`sum_parts`: floats, largest first, whose exact sum is the exact sum
(`math.fsum(sum_parts) == sum`). Merging records through their parts keeps
totals over files and chunks exactly those of a single pass.
"""

from __future__ import annotations

from typing import Any

UNIT_BITS = 1074             # a unit is 2**-1074, the smallest float's spacing
_ONE = 1 << UNIT_BITS


def float_units(value: float) -> int:
    """`value` (finite) as an exact number of units."""
    numerator, denominator = value.as_integer_ratio()  # denominator: a power of 2, at most 2**1074
    return numerator * (_ONE // denominator)


def units_to_float(units: int) -> float:
    """The correctly rounded float of `units` (OverflowError when out of range)."""
    return units / _ONE  # int / int rounds correctly


def float_parts(units: int) -> list[float]:
    """`units` as non-overlapping floats, largest first, whose exact sum it is."""
    parts: list[float] = []
    while units:
        part = units_to_float(units)
        parts.append(part)
        units -= float_units(part)
    return parts


class ColumnStats:
    """count/sum/min/max of one column (of one group), exact whatever the order of adds."""

    __slots__ = ("count", "units", "has_float", "min", "max", "overflow")

    def __init__(self) -> None:
        self.count = 0
        self.units = 0            # the exact sum, in units
        self.has_float = False    # some value was not an integer literal: sums and bounds are floats
        self.min: Any = None
        self.max: Any = None
        self.overflow = False     # a merged record had no finite sum

    def add(self, count: int, units: int, low: Any, high: Any, has_float: bool) -> None:
        """Add `count` values whose exact sum is `units`, bounded by `low` and `high`."""
        if not count:
            return
        self.count += count
        self.units += units
        self.has_float |= has_float
        if self.min is None or low < self.min:
            self.min = low
        if self.max is None or high > self.max:
            self.max = high

    def add_values(self, ints: list[int], floats: list[float]) -> None:
        """Add Python numbers: integer literals as ints, other literals as finite floats."""
        if ints:
            self.add(len(ints), sum(ints) << UNIT_BITS, min(ints), max(ints), False)
        if floats:
            self.add(len(floats), sum(map(float_units, floats)), min(floats), max(floats), True)

    def merge(self, stats: dict) -> None:
        """Add a column of a record (as written by `result`)."""
        total = stats["sum"]
        if total is None:
            self.has_float = self.overflow = True
            units = 0
        elif isinstance(total, float) or "sum_parts" in stats:
            self.has_float = True
            units = sum(map(float_units, stats.get("sum_parts") or [total]))
        else:
            units = total << UNIT_BITS
        self.add(stats["count"], units, stats["min"], stats["max"], self.has_float)

    def result(self, *, parts: bool = True) -> dict:
        if not self.has_float:
            return {"count": self.count, "sum": self.units >> UNIT_BITS, "min": self.min, "max": self.max}
        total: float | None = None
        if not self.overflow:
            try:
                total = units_to_float(self.units)
            except OverflowError:
                pass
        # `+ 0.0` turns -0.0 into 0.0: which zero comes first must not matter
        out: dict[str, Any] = {"count": self.count, "sum": None if total is None else total + 0.0,
                               "min": float(self.min) + 0.0, "max": float(self.max) + 0.0}
        if total is None:
            out["overflow"] = True
        elif parts and float_units(total) != self.units:
            out["sum_parts"] = float_parts(self.units)
        return out
