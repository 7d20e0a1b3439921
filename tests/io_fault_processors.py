"""A processor whose reads fail with EIO for files named eio*, for tests/test_io_faults.py.

Load with `-p tests/io_fault_processors.py:reads`. Importing this module (which
the forkserver does before forking workers) makes `Task.open` hand back, for a
file named eio*, a file object whose every read fails as a disk with a bad
sector does: OSError(EIO). Every other file is read for real.
"""

from __future__ import annotations

import errno
import io
import os

from crawlproc import processor
from crawlproc.task import Task

_real_open = Task.open


class _BadSectors(io.RawIOBase):
    """A readable raw file whose reads all fail with EIO."""

    def __init__(self, path: str) -> None:
        self.path = path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO), self.path)


def _open_with_faults(task: Task):
    if os.path.basename(task.relpath).startswith("eio"):
        return io.BufferedReader(_BadSectors(task.path))
    return _real_open(task)


Task.open = _open_with_faults


@processor(version="1")
def reads(task):
    with task.open() as f:
        data = f.read()
    return {"path": task.relpath, "bytes": len(data), "lines": data.count(b"\n")}
