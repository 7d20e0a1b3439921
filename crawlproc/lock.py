"""One coordinator per OUT: an exclusive `flock` on OUT/lock.

The kernel drops the lock when the holder dies, however it dies, so a crashed
run never blocks the next one. The descriptor is close-on-exec and workers are
started by forkserver/spawn, so no worker ever holds it; the coordinator's own
forked children (children.py) close it first thing.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from crawlproc.children import forget_kept, keep_from_children
from crawlproc.errors import OutLocked

LOCK_NAME = "lock"


class OutLock:
    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutLocked(f"another crawlproc (pid {holder}) is using {self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        keep_from_children(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            forget_kept(self._fd)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> "OutLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
