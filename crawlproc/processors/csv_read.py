"""csv-stats' reading: a task's rows as Arrow tables; malformed rows counted, not fatal.

    the task's lines (task.load_span: mapped, not copied; the header line left out)
        ──pyarrow.csv.open_csv, in blocks of BLOCK_SIZE──> Table ──fold──> kept
          first with the column types Arrow infers from the first block (numbers
          parsed once, in the parser, is the fast path), the `text` columns strings;
          again with every column a string when a later value does not fit its
          column's type, when the task holds `0x` and a column is int64, or when
          the fold raises NeedsText (it cannot tell `5` from `5.0`)
          a row of another width: invalid_row_handler counts it (and keeps a few for samples)
        a lone CR, or what Arrow will not parse ──> the csv module, row by row, then one Table

Rows follow the csv module's rules: quoted fields may hold the delimiter,
quotes and newlines; blank lines are skipped. The csv module reads a lone CR
outside quotes as an error, Arrow as a line end: a task that holds one is read
by the csv module, so both give the same rows. pyarrow hands a malformed row
to the handler decoded as UTF-8: a task that is not UTF-8 is parsed without
it, and read by the csv module if a row turns out malformed. Samples of
malformed rows are located afterwards (file offset, and line number in the
task) by a scan that stops at the last one.
"""

from __future__ import annotations

import csv
import io
import re
import struct
from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from crawlproc.task import Span

BLOCK_SIZE = 4 << 20      # bytes Arrow parses at once: a block's columns stay in the CPU caches (16 MB: 5-8% slower)
MAX_SAMPLES = 5           # malformed rows described per task
_LONE_CR = re.compile(rb"\r(?!\n)")
T = TypeVar("T")


class NeedsText(Exception):
    """Raised by a fold that cannot work from the columns read as numbers: the task is read
    again with every column a string."""


class Sample(NamedTuple):
    """A malformed row: where it is (a record number or a line number, from `start`) and why."""

    record: int | None    # n-th non-blank record (Arrow's count)
    line: int | None      # or n-th line (the csv module's)
    error: str
    text: bytes = b""     # the record as Arrow read it


class Rows:
    """The rows of `data[span]` in tables (of the types Arrow infers, or of strings), with the
    malformed ones counted."""

    def __init__(self, data: bytes, span: Span, names: list[str], delimiter: str,
                 text: Collection[str] = (), only: Collection[str] | None = None) -> None:
        self.data, self.span, self.names, self.delimiter = data, span, names, delimiter
        self.text = text          # columns always read as strings (a group key)
        self.only = only          # the columns the tables hold (None: all); Arrow converts no other
        self.malformed = 0
        self.samples: list[Sample] = []

    def collect(self, fold: Callable[[pa.Table], T]) -> list[T]:
        """`fold` of each table of rows, in order. Tables are made one block at a time, and
        only what `fold` returns is kept; a read that fails part way is started again."""
        start, end = self.span
        if start >= end:
            return []
        attempts: list[Callable[[], Iterator[pa.Table]]] = [self._csv_module_tables]
        if self.names and not (self.data.find(b"\r", start, end) != -1
                               and _LONE_CR.search(memoryview(self.data)[start:end])):
            # pyarrow hands a malformed row to the handler as text: it must be UTF-8. Without
            # the handler, a malformed row stops the read, and the csv module reads the task.
            count_bad = _is_utf8(memoryview(self.data)[start:end])
            # a record longer than a block, or a parse error: once more as one block, then the csv module
            whole = [lambda: self._arrow_tables(end - start + 1, count_bad)] if end - start > BLOCK_SIZE else []
            attempts[:0] = [lambda: self._arrow_tables(BLOCK_SIZE, count_bad, infer=True),
                            lambda: self._arrow_tables(BLOCK_SIZE, count_bad), *whole]
        for attempt in attempts[:-1]:
            try:
                return [fold(table) for table in attempt()]
            except (pa.ArrowInvalid, NeedsText):
                continue
        return [fold(table) for table in attempts[-1]()]

    # -- Arrow

    def _holds_hex_prefix(self, look_at: int = 64) -> bool:
        """Whether `0x` or `0X` occurs in the span. An x is rare: the first `look_at` of each
        are found byte by byte (memchr); only past them is the slower search for two bytes made."""
        start, end = self.span
        for x in (b"x", b"X"):
            at = self.data.find(x, start + 1, end)
            for _ in range(look_at):
                if at == -1:
                    break
                if self.data[at - 1] == ord("0"):
                    return True
                at = self.data.find(x, at + 1, end)
            else:
                if self.data.find(b"0" + x, at - 1, end) != -1:
                    return True
        return False

    def _arrow_tables(self, block_size: int, count_bad: bool, infer: bool = False) -> Iterator[pa.Table]:
        """Tables of the span's rows: every column a string, or (`infer`) of the types Arrow
        infers from the first block, but for the `text` columns."""
        start, end = self.span
        self.malformed, self.samples = 0, []
        text = self.text if infer else self.names
        quoted = self.data.find(b'"', start, end) != -1
        reader = pcsv.open_csv(
            pa.BufferReader(memoryview(self.data)[start:end]),
            read_options=pcsv.ReadOptions(column_names=self.names, block_size=block_size, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=self.delimiter, newlines_in_values=quoted,
                                            invalid_row_handler=self._bad_row if count_bad else None),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in text}, include_columns=self.only,
                # only an empty value is null ("NA" and "nan" are text, as to the csv module),
                # and only words are booleans: 1 and 0 are numbers
                null_values=[""], strings_can_be_null=True, check_utf8=False,
                true_values=["true", "True", "TRUE"], false_values=["false", "False", "FALSE"]),
        )
        if infer and pa.int64() in reader.schema.types and self._holds_hex_prefix():
            raise NeedsText("0x in the task: Arrow reads 0x1f as the integer 31, csv-stats as text")
        for batch in reader:
            if batch.num_rows:
                yield pa.Table.from_batches([batch])

    def _bad_row(self, row: pcsv.InvalidRow) -> str:
        error = f"{row.actual_columns} fields, expected {row.expected_columns}"
        self._bad(Sample(row.number, None, error, row.text.encode()))
        return "skip"

    def _bad(self, sample: Sample) -> None:
        self.malformed += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(sample)

    # -- the csv module

    def _csv_module_tables(self) -> Iterator[pa.Table]:
        start, end = self.span
        self.malformed, self.samples = 0, []
        text = bytes(memoryview(self.data)[start:end]).decode("utf-8", "replace")
        reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=self.delimiter)
        ncols = len(self.names)
        good: list[list[str]] = []
        while True:
            first_line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                self._bad(Sample(None, first_line, f"csv: {exc}"))
                continue
            if len(row) == ncols and ncols:
                good.append(row)
            elif row:  # [] is a blank line
                self._bad(Sample(None, first_line, f"{len(row)} fields, expected {ncols}"))
        columns = [pa.array([v or None for v in values], pa.string()) for values in zip(*good)] if good else \
            [pa.array([], pa.string()) for _ in self.names]
        yield pa.table(columns, names=self.names)

    # -- where the samples are

    def located(self) -> list[tuple[int | None, int | None, str]]:
        """(offset in `data`, line number counted from the span's start, error) of each sample;
        None and None for a row that cannot be told apart (its text also opens an earlier line)."""
        lines = self._line_starts({s.line for s in self.samples if s.line is not None})
        records = self._record_starts()
        out = []
        for s in self.samples:
            if s.line is not None:
                out.append((lines.get(s.line), s.line, s.error))
                continue
            offset = records.get(s.record)
            out.append((offset, None if offset is None else self._line_of(offset), s.error))
        return out

    def _lines(self) -> Iterator[tuple[int, int]]:
        """(start, end) of each line of the span, ends included."""
        pos, end = self.span
        while pos < end:
            stop = self.data.find(b"\n", pos, end)
            stop = end if stop == -1 else stop + 1
            yield pos, stop
            pos = stop

    def _line_starts(self, wanted: set[int]) -> dict[int, int]:
        found: dict[int, int] = {}
        for number, (start, _) in enumerate(self._lines(), 1):
            if len(found) == len(wanted):
                break
            if number in wanted:
                found[number] = start
        return found

    def _record_starts(self) -> dict[int, int]:
        """Where Arrow's malformed records start. Without quotes, a record is a line that is not
        blank; with quotes, the row's own text is looked for at a line start (the first after
        the previous sample)."""
        wanted = {s.record: s.text for s in self.samples if s.record is not None}
        found: dict[int, int] = {}
        if not wanted:
            return found
        if self.data.find(b'"', *self.span) == -1:
            record = 0
            for start, stop in self._lines():
                if len(found) == len(wanted):
                    break
                if self.data[start:stop].strip(b"\r\n"):
                    record += 1
                    if record in wanted:
                        found[record] = start
            return found
        pos = self.span.start
        for record, text in sorted(wanted.items()):
            at = self.data.find(text, pos, self.span.end)
            while at not in (-1, self.span.start) and self.data[at - 1:at] != b"\n":
                at = self.data.find(text, at + 1, self.span.end)
            if at == -1:
                break  # not found: this one and the later ones stay unknown
            found[record] = at
            pos = at + len(text)
        return found

    def _line_of(self, offset: int) -> int:
        """The line number, from the span's start, of the line that starts at `offset`."""
        return bytes(memoryview(self.data)[self.span.start:offset]).count(b"\n") + 1


def holds_quoted_line_breaks(data: bytes, span: Span, names: list[str], delimiter: str) -> bool:
    """Whether a value of `data[span]` holds a line break: only a quoted field can, and one
    still open at the span's end runs to it (a quote alone inside a field is a plain character
    to Arrow, as to the csv module). Every column is read as text; a read Arrow refuses counts
    as yes."""
    start, end = span
    try:
        reader = pcsv.open_csv(
            pa.BufferReader(memoryview(data)[start:end]),
            read_options=pcsv.ReadOptions(column_names=names, block_size=BLOCK_SIZE, use_threads=False),
            parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                            invalid_row_handler=lambda row: "skip"),
            convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()), check_utf8=False))
        return any(pc.any(pc.match_substring_regex(column, "[\\r\\n]")).as_py()
                   for batch in reader for column in batch.columns)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return True


def _is_utf8(data: memoryview) -> bool:
    """Whether `data` is valid UTF-8, checked by Arrow (a string array over it, not a copy)."""
    offsets = pa.py_buffer(struct.pack("=2q", 0, len(data)))   # not pa.array(): see csv_numbers' imports
    text = pa.Array.from_buffers(pa.large_string(), 1, [None, offsets, pa.py_buffer(data)])
    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True
