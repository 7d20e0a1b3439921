"""`Task`: what a processor sees — one input file, or one byte range of it.

A range owns the lines that *start* inside it. `lines()` therefore skips a
partial first line (unless the range starts at 0 or right after a newline) and
reads past the range's end to finish its last line, so that whatever the
ranges of a file are, every line is yielded by exactly one task.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

_READ_BLOCK = 1 << 16


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

    def _raw_lines(self) -> Iterator[bytes]:
        with open(self.path, "rb", buffering=_READ_BLOCK) as f:
            if not self.is_range:
                yield from f
                return
            end = self.offset + self.length
            pos = self._first_line_start(f)
            while pos < end:
                line = f.readline()
                if not line:
                    return
                yield line
                pos += len(line)

    def _first_line_start(self, f: BinaryIO) -> int:
        """Seek `f` to the first line that starts at or after `offset`; return its position."""
        if self.offset == 0:
            return 0
        f.seek(self.offset - 1)
        if f.read(1) == b"\n":
            return self.offset
        partial = f.readline()  # the tail of a line owned by the previous range
        return self.offset + len(partial)


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


def relpath_for_processors(raw: bytes) -> str:
    """The `str` a processor gets: `os.fsencode()` of it gives `raw` back."""
    return os.fsdecode(raw)
