"""Result files: naming, atomic writes, trailers, and reading a task's byte range back.

A worker writes one file per batch, `OUT/results/<shard>/<batch-id>.jsonl`: the
JSON lines of each task of the batch, one task after the other. The name comes
from the batch id, never from an input path. The file is written under a temp
name in the same folder and renamed, so a reader sees all of it or nothing;
the ledger records each task's (offset, length, crc32) in it.

The file ends with one trailer line that describes it, so that a lost ledger
can be rebuilt from the result files (see rebuild.py). Ledger ranges never
cover it. Its four fields are separated by tabs (JSON and base64 hold none):

    #crawlproc-results  {"format": 1, "batch": 17, "pid": 4242, "tasks": 3,
                         "identity_digest": "...", "identity": {the run's identity}}
                        base64 of, per done task: _TASK_ENTRY (offset, length or -1 for
                         a whole file, size, mtime_ns, record offset, record length,
                         crc32, elapsed s, finished at, path length), then the path's bytes
                        crc32 of the line up to here, 8 hex digits

A batch with a done task always writes its file, even with no records.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

RESULTS_DIR = "results"
BATCHES_PER_SHARD = 1000
TEMP_SUFFIX = ".tmp"
_RESULT_NAME = re.compile(r"^(\d+)\.jsonl$")
TRAILER_MAGIC = b"#crawlproc-results"
TRAILER_FORMAT = 1
_TASK_ENTRY = struct.Struct("<qqqqQQIddI")  # packed, not text: about a microsecond a task less
_pack_task = _TASK_ENTRY.pack
_TAIL_BYTES = 64 << 10  # the first read from a file's end, in search of its trailer


def result_path(out: Path, batch_id: int) -> Path:
    return out / RESULTS_DIR / f"{batch_id // BATCHES_PER_SHARD:05d}" / f"{batch_id:09d}.jsonl"


def checksum(data: bytes | memoryview) -> int:
    return zlib.crc32(data)


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write `data` to `path` so that it appears whole or not at all.

    With `durable`, the file and then its folder are fsynced, so the rename
    survives a power loss before the ledger calls the tasks done.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    os.replace(temp, path)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temp_files(out: Path) -> int:
    """Delete temp files left by killed workers or finalizers. Only when none is writing."""
    removed = 0
    for folder in (out / RESULTS_DIR, out):
        if not folder.is_dir():
            continue
        for path in _files_under(folder, recursive=folder != out):
            if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX):
                _unlink_quietly(path)
                removed += 1
    return removed


def remove_unreferenced(out: Path, live_batch_ids: set[int], *, keep_from: int | None = None) -> int:
    """Delete result files that no done task refers to any more (superseded or orphaned).

    While workers run, pass the in-flight batch ids in `live_batch_ids` and the
    next batch id to be handed out as `keep_from`: those files may be written now.
    """
    removed = 0
    for batch_id, path in result_files(out):
        if batch_id not in live_batch_ids and (keep_from is None or batch_id < keep_from):
            _unlink_quietly(path)
            removed += 1
    return removed


def result_files(out: Path) -> list[tuple[int, Path]]:
    """(batch id, path) of every result file under OUT/results (temp files are not)."""
    found = []
    for path in _files_under(out / RESULTS_DIR, recursive=True):
        match = _RESULT_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def _files_under(folder: Path, *, recursive: bool) -> list[Path]:
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            if recursive:
                found.extend(_files_under(Path(entry.path), recursive=True))
        else:
            found.append(Path(entry.path))
    return found


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class ResultReader:
    """Reads task byte ranges from result files, one file at a time.

    The finalizer asks for ranges in merge order, which mostly walks each file
    front to back (a first run's batches follow merge order too), so the
    current file is read whole once and each range is a slice of it. A file
    too big for that is read range by range.
    """

    WHOLE_FILE_BYTES = 64 << 20

    def __init__(self, out: Path) -> None:
        self._out = out
        self._batch_id: int | None = None
        self._data = b""
        self._big: BinaryIO | None = None
        self._missing = False

    def read(self, batch_id: int, offset: int, length: int) -> bytes | None:
        """The bytes of one range, or None when the file is missing or too short."""
        if batch_id != self._batch_id:
            self._switch_to(batch_id)
        if self._big is not None:
            data = os.pread(self._big.fileno(), length, offset)
            return data if len(data) == length else None
        if offset + length > len(self._data):
            return None
        return self._data[offset:offset + length]

    def whole(self, batch_id: int) -> memoryview | None:
        """The whole result file, or None when it is missing or too big to hold (then `read`)."""
        if batch_id != self._batch_id:
            self._switch_to(batch_id)
        if self._big is not None or self._missing:
            return None
        return memoryview(self._data)

    def _switch_to(self, batch_id: int) -> None:
        self.close()
        self._batch_id = batch_id
        try:
            f = open(result_path(self._out, batch_id), "rb")
        except FileNotFoundError:
            self._missing = True
            return
        if os.fstat(f.fileno()).st_size > self.WHOLE_FILE_BYTES:
            self._big = f
            return
        with f:
            self._data = f.read()

    def close(self) -> None:
        if self._big is not None:
            self._big.close()
            self._big = None
        self._data = b""
        self._missing = False
        self._batch_id = None


# -- trailers ---------------------------------------------------------------------

def identity_text(identity: Mapping[str, Any]) -> str:
    """The run's identity as canonical JSON (ASCII): what trailers carry."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))


def identity_digest(identity: Mapping[str, Any]) -> str:
    return _digest_of(identity_text(identity))


def _digest_of(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class TrailerWriter:
    """Collects the done tasks of a worker's current batch; `line()` ends its result file.

    `add` runs once per task in the worker: one struct pack, no formatting
    (about a microsecond a task; text formatting took two to three).
    """

    __slots__ = ("_header", "_parts")

    def __init__(self, identity: str, pid: int) -> None:
        self._header = '{"format":%d,"identity_digest":"%s","pid":%d,"identity":%s' % (
            TRAILER_FORMAT, _digest_of(identity), pid, identity or "null")
        self._parts: list[bytes] = []  # per task: its packed entry, then its path

    @property
    def tasks(self) -> int:
        return len(self._parts) // 2

    def add(self, spec: tuple, result: tuple, elapsed: float, finished: float) -> None:
        """spec: the ClaimedTask-shaped row; result: (record offset, record length, crc32)."""
        path = spec[1]
        self._parts += (_pack_task(spec[2], -1 if spec[3] is None else spec[3], spec[4], spec[5],
                                   result[0], result[1], result[2], elapsed, finished, len(path)), path)

    def line(self, batch_id: int) -> bytes:
        """The trailer of the tasks added since the last call; starts the next batch afresh."""
        header = '%s,"batch":%d,"tasks":%d}' % (self._header, batch_id, self.tasks)
        body = b"\t".join((TRAILER_MAGIC, header.encode(), base64.b64encode(b"".join(self._parts))))
        self._parts = []
        return b"%s\t%08x\n" % (body, zlib.crc32(body))


class TrailerTask(NamedTuple):
    """One done task as its result file's trailer describes it."""

    path_bytes: bytes
    offset: int
    length: int | None
    size: int
    mtime_ns: int
    result_offset: int
    result_length: int
    result_crc: int
    elapsed_s: float
    finished_at: float


class Trailer(NamedTuple):
    batch_id: int
    pid: int
    identity_digest: str
    identity: dict[str, Any]
    records_end: int  # where the trailer line starts: every record range ends before it
    entries: bytes  # the packed task entries (see tasks())

    def tasks(self) -> Iterator[TrailerTask]:
        entries, pos = self.entries, 0
        while pos < len(entries):
            if pos + _TASK_ENTRY.size > len(entries):
                raise DamagedTrailer("a task entry is cut short")
            fields = _TASK_ENTRY.unpack_from(entries, pos)
            pos += _TASK_ENTRY.size
            path, pos = entries[pos:pos + fields[9]], pos + fields[9]
            if len(path) != fields[9] or not path or path.startswith(b"/") or b"\0" in path:
                raise DamagedTrailer("a task entry has no usable path")
            yield TrailerTask(path, fields[0], None if fields[1] < 0 else fields[1], *fields[2:9])


class NoTrailer(Exception):
    """The file ends with a record: written by a crawlproc older than trailers."""


class DamagedTrailer(Exception):
    """The file's last line is not a trailer that checks out (cut short, overwritten)."""


def read_trailer(path: Path) -> Trailer:
    """The trailer of one result file, read from its end; raises NoTrailer or DamagedTrailer."""
    with open(path, "rb") as f:
        fd, size = f.fileno(), os.fstat(f.fileno()).st_size
        want = min(size, _TAIL_BYTES)
        while True:  # a trailer of a big batch may be longer than the first read
            tail = os.pread(fd, want, size - want)
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0 or want >= size:
                return _parse_trailer(tail[cut + 1:], size - len(tail) + cut + 1, path)
            want = min(size, want * 4)


def verified_tasks(path: Path) -> tuple[Trailer, list[TrailerTask], int]:
    """(trailer, its tasks whose record range is intact, how many were not) of one result file.

    Every range is checked against its crc32, like the merge does.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DamagedTrailer("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.rfind(b"\n", 0, size - 1) + 1
            trailer = _parse_trailer(data[start:], start, path)
            intact, damaged = [], 0
            with memoryview(data) as view:
                for task in trailer.tasks():
                    end = task.result_offset + task.result_length
                    if end <= start and checksum(view[task.result_offset:end]) == task.result_crc:
                        intact.append(task)
                    else:
                        damaged += 1
    return trailer, intact, damaged


def _parse_trailer(line: bytes, start: int, path: Path) -> Trailer:
    """The trailer in `line`, the last line of `path`, which starts at byte `start`."""
    if not line.startswith(TRAILER_MAGIC + b"\t"):
        if line.startswith(b"{") and line.endswith(b"}\n"):
            raise NoTrailer(str(path))
        raise DamagedTrailer("its last line is not a trailer")
    body, _, crc = line.rstrip(b"\n").rpartition(b"\t")
    try:
        if not line.endswith(b"\n") or int(crc, 16) != zlib.crc32(body):
            raise DamagedTrailer("the trailer's checksum does not match")
        _, header_text, entries = body.split(b"\t")
        header = json.loads(header_text)
        if header["format"] != TRAILER_FORMAT:
            raise DamagedTrailer(f"trailer format {header['format']} is not {TRAILER_FORMAT}")
        match = _RESULT_NAME.match(path.name)
        if match is None or int(match.group(1)) != header["batch"]:
            raise DamagedTrailer(f"the trailer names batch {header['batch']}")
        return Trailer(header["batch"], header["pid"], header["identity_digest"], header["identity"] or {},
                       start, base64.b64decode(entries, validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise DamagedTrailer(f"the trailer cannot be read ({exc})") from None
