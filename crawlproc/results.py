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
from collections import OrderedDict
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
    """Reads task byte ranges from result files, keeping a few files open.

    The finalizer asks for ranges in merge order, which mostly walks each file
    front to back, so a small LRU of open files is enough.
    """

    def __init__(self, out: Path, max_open: int = 64) -> None:
        self._out = out
        self._open: OrderedDict[int, BinaryIO | None] = OrderedDict()
        self._max_open = max_open

    def read(self, batch_id: int, offset: int, length: int) -> bytes | None:
        """The bytes of one range, or None when the file is missing or too short."""
        f = self._file(batch_id)
        if f is None:
            return None
        f.seek(offset)
        data = f.read(length)
        return data if len(data) == length else None

    def _file(self, batch_id: int) -> BinaryIO | None:
        if batch_id in self._open:
            self._open.move_to_end(batch_id)
            return self._open[batch_id]
        try:
            f: BinaryIO | None = open(result_path(self._out, batch_id), "rb")
        except FileNotFoundError:
            f = None
        self._open[batch_id] = f
        if len(self._open) > self._max_open:
            _, oldest = self._open.popitem(last=False)
            if oldest is not None:
                oldest.close()
        return f

    def close(self) -> None:
        for f in self._open.values():
            if f is not None:
                f.close()
        self._open.clear()
