"""Result files: naming, atomic writes, and reading a task's byte range back.

A worker writes one file per batch, `OUT/results/<shard>/<batch-id>.jsonl`: the
JSON lines of each task of the batch, one task after the other. The name comes
from the batch id, never from an input path. The file is written under a temp
name in the same folder and renamed, so a reader sees all of it or nothing;
the ledger records each task's (offset, length, crc32) in it.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import BinaryIO

RESULTS_DIR = "results"
BATCHES_PER_SHARD = 1000
TEMP_SUFFIX = ".tmp"
_RESULT_NAME = re.compile(r"^(\d+)\.jsonl$")


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
    for path in _files_under(out / RESULTS_DIR, recursive=True):
        match = _RESULT_NAME.match(path.name)
        if not match:
            continue
        batch_id = int(match.group(1))
        if batch_id not in live_batch_ids and (keep_from is None or batch_id < keep_from):
            _unlink_quietly(path)
            removed += 1
    return removed


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

    def _switch_to(self, batch_id: int) -> None:
        self.close()
        self._batch_id = batch_id
        try:
            f = open(result_path(self._out, batch_id), "rb")
        except FileNotFoundError:
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
        self._batch_id = None
