"""One coordinator per OUT: an exclusive `flock` on OUT/lock; and the one test of "is a run going".

The kernel drops the lock when the holder dies, however it dies, so a crashed
run never blocks the next one. The descriptor is close-on-exec and workers are
started by forkserver/spawn, so no worker ever holds it; the coordinator's own
forked children (children.py) close it first thing. `running_pid` is how every
reader (`status`, the API) tells a going run from one that ended or died.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from crawlproc.children import forget_kept, keep_from_children
from crawlproc.errors import OutLocked

LOCK_NAME = "lock"
# `running_pid` holds a shared lock for a few microseconds: a start that meets it
# tries again for this long before it says another crawlproc holds OUT.
PROBE_PATIENCE_SECONDS = 0.2


def running_pid(out: Path) -> int | None:
    """The pid of the crawlproc holding OUT's lock (-1 if it has not written it yet), or None
    when none does: then no run is going, whatever the ledger's last run row says."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)


def refuse_if_held(out: Path, advice: str = "") -> None:
    """OutLocked now when a crawlproc holds OUT (with `advice` after the pid): a probe that
    writes nothing, for what must not start while a run goes (a dry run; a job's status page,
    which it starts before it takes the lock, so that it is not announced in vain)."""
    holder = running_pid(out)
    if holder is not None:
        raise OutLocked(_held_message(holder, out, advice))


def _held_message(holder: int, out: Path, advice: str) -> str:
    said = f"another crawlproc (pid {holder if holder > 0 else 'unknown'}) is using {out}"
    return f"{said}; {advice}" if advice else said


def _holder(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else -1


class OutLock:
    """OUT's lock, held by the one crawlproc that writes its ledger. Held by another: OutLocked,
    with `advice` (what the refused command may do instead) after the holder's pid."""

    def __init__(self, out: Path, advice: str = "") -> None:
        self.path = out / LOCK_NAME
        self.advice = advice
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + PROBE_PATIENCE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.01)  # maybe only a reader's probe (running_pid)
                    continue
                holder = _holder(fd)
                os.close(fd)
                raise OutLocked(_held_message(holder, self.path.parent, self.advice)) from None
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
