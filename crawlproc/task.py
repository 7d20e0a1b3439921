"""`Task`: what a processor sees — one input file, or one byte range of it.

A range owns the lines that *start* inside it: `owned_span` is the one
definition of that rule. It skips a partial first line (unless the range starts
at 0 or right after a newline) and reads past the range's end to finish its last
line, so that whatever the ranges of a file are, every line belongs to exactly
one task. `lines()` yields those lines one by one; `line_buffer()` gives them as
one buffer (a view of the file mapped in memory, not a copy), for parsers such
as pyarrow or polars that take a whole buffer at once.
"""

from __future__ import annotations

import io
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, NamedTuple

_READ_BLOCK = 1 << 16
_MAP_AT_LEAST = 1 << 20   # smaller spans are read into memory: a mapping costs more than the copy


class Span(NamedTuple):
    """Bytes [start, end) of a file: the lines a task owns."""

    start: int
    end: int


def owned_span(f: BinaryIO, offset: int | None, length: int | None, size: int) -> Span:
    """The lines that start in [offset, offset + length) of the open file `f` of `size` bytes.

    A whole file (offset None) owns everything. The file position is left anywhere.
    """
    if offset is None:
        return Span(0, size)
    limit = offset + (length or 0)
    start = _line_start_at_or_after(f, offset, stop=limit)
    if start >= limit or start >= size:
        return Span(start, start)
    return Span(start, _line_start_at_or_after(f, limit) if limit < size else size)


class LoadedSpan(NamedTuple):
    """Bytes holding a task's lines: `data[span.start:span.end]`; `data[0]` is at file offset `base`."""

    data: bytes | mmap.mmap
    span: Span
    base: int


def load_span(path: str, offset: int | None, length: int | None) -> LoadedSpan:
    """The bytes of the lines a task owns. A small span is read (a mapping costs more than
    the copy); a larger one is the whole file, mapped read-only."""
    with open(path, "rb", buffering=0) as f:
        start, end = owned_span(f, offset, length, os.fstat(f.fileno()).st_size)
        if end - start < _MAP_AT_LEAST:
            f.seek(start)
            data = f.read(end - start)
            return LoadedSpan(data, Span(0, len(data)), start)
        return LoadedSpan(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), Span(start, end), 0)


def _line_start_at_or_after(f: BinaryIO, pos: int, *, stop: int | None = None) -> int:
    """The first position >= pos where a line starts (or the end of the file). With `stop`,
    no byte at or past it is read: `stop` when no line starts before it (a range inside one
    long line owns nothing, and must not read that line's megabytes to learn so, each range
    of it again)."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    at = pos - 1  # blocks, not readline(): on an unbuffered file that reads a byte per system call
    while stop is None or at < stop:
        block = f.read(_READ_BLOCK if stop is None else min(_READ_BLOCK, stop - at))
        if not block:
            return max(at, pos)  # the end of the file (or pos, past it)
        cut = block.find(b"\n")
        if cut != -1:
            return at + cut + 1
        at += len(block)
    return at  # == stop


class Task:
    """One unit of work handed to a processor.

    `path` is absolute, `relpath` is POSIX and relative to DATA_DIR (non-UTF-8
    bytes are kept via surrogateescape: `os.fsencode(task.relpath)` gives them
    back). `offset`/`length` are None for a whole file. `context` is what the
    processor's setup hook gave this worker process, `preloaded` what its
    preload hook loaded before the workers forked (None without such hooks).
    """

    __slots__ = ("id", "path", "relpath", "offset", "length", "params", "context", "preloaded")

    def __init__(
        self,
        id: int,
        path: str,
        relpath: str,
        offset: int | None = None,
        length: int | None = None,
        params: Mapping[str, str] | None = None,
        context: Any = None,
        preloaded: Any = None,
    ) -> None:
        self.id = id
        self.path = path
        self.relpath = relpath
        self.offset = offset
        self.length = length
        self.params: Mapping[str, str] = params or {}
        self.context = context
        self.preloaded = preloaded

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        where = "" if self.offset is None else f" [{self.offset}:+{self.length}]"
        return f"Task({self.id}, {self.relpath!r}{where})"

    @property
    def is_range(self) -> bool:
        return self.offset is not None

    def read_bytes(self) -> bytes:
        """The bytes of the task: the whole file, or exactly its byte range."""
        with open(self.path, "rb", buffering=0) as f:
            if not self.is_range:
                return f.read()
            f.seek(self.offset)
            return f.read(self.length)

    def open(self) -> BinaryIO:
        """A binary file object over the task's bytes (the range only, for a range)."""
        if not self.is_range:
            return open(self.path, "rb")
        return io.BufferedReader(_RangeReader(self.path, self.offset, self.length))

    def lines(
        self, *, binary: bool = False, encoding: str = "utf-8", errors: str = "replace"
    ) -> Iterator[Any]:
        """Yield the lines that start in this task's range, with their line ending.

        Lines are `str` (decoded with `encoding`/`errors`), or `bytes` with
        `binary=True`. A last line without a newline is yielded too.
        """
        raw = self._raw_lines()
        if binary:
            return raw
        return (line.decode(encoding, errors) for line in raw)

    def span(self) -> Span:
        """Where the task's own lines are in the file: `Span(start, end)` (see `owned_span`)."""
        with open(self.path, "rb", buffering=0) as f:
            return owned_span(f, self.offset, self.length, os.fstat(f.fileno()).st_size)

    def line_buffer(self) -> memoryview:
        """The task's own lines (exactly those `lines()` yields) as one read-only buffer.

        A large span is a view of the file mapped in memory, so no byte is
        copied: hand it to `pyarrow.py_buffer()`, `pyarrow.BufferReader()`,
        `polars.read_csv()`, `bytes()`... The mapping lives as long as the view
        (or buffers made from it) does. A file truncated while mapped makes the
        worker die with SIGBUS: that attempt fails, as any crash does.
        """
        data, (start, end), _ = load_span(self.path, self.offset, self.length)
        return memoryview(data)[start:end]

    def _raw_lines(self) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=_READ_BLOCK) as f:
            if not self.is_range:
                yield from f
                return
            start, end = owned_span(f, self.offset, self.length, os.fstat(f.fileno()).st_size)
            f.seek(start)
            pos = start
            while pos < end:
                line = f.readline()
                if not line:
                    return
                yield line
                pos += len(line)


class _RangeReader(io.RawIOBase):
    """A raw reader limited to [offset, offset + length) of a file."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self._file = open(path, "rb", buffering=0)
        self._file.seek(offset)
        self._left = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: self._left]
        n = self._file.readinto(view)
        self._left -= n or 0
        return n or 0

    def close(self) -> None:
        self._file.close()
        super().close()


def relpath_for_people(raw: bytes) -> str:
    """A printable form of a relative path; non-UTF-8 bytes appear as \\xNN."""
    return raw.decode("utf-8", "backslashreplace")


_SURROGATE = re.compile("[\ud800-\udfff]")


def text_for_people(text: str) -> str:
    """`text` as valid UTF-8, for the ledger and the log: a name a processor put in its error
    (a str decoded with surrogateescape) shows its undecodable bytes as \\xNN, as
    relpath_for_people shows them; any other lone surrogate as \\uNNNN."""
    return _SURROGATE.sub(_escaped, text)


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def relpath_for_processors(raw: bytes) -> str:
    """The `str` a processor gets: `os.fsencode()` of it gives `raw` back."""
    return os.fsdecode(raw)
