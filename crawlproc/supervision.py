"""Per-task limits enforced from outside the worker: --timeout and --max-memory-per-task.

A worker writes the id and start time of the task it is on into its shared slot
(see worker.py). Whoever supervises the worker process (the local executor
here, or the batch runner on a Dask worker) reads the slot and, when the task
has run too long or the worker's RSS passed the limit while the task runs,
kills the worker's process group and notes why. The worker's death then blames
exactly that task, and the rest of its batches go back unpenalised: a task
that hangs or eats memory fails alone, like one that raises.

Memory is read from /proc/<pid>/statm (one small read per worker in a task,
every MEMORY_POLL_SECONDS): no psutil call on the coordinator's path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

from crawlproc.processes import kill_group

MEMORY_POLL_SECONDS = 0.02
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def format_size(n: int) -> str:
    """Bytes as people read them: 400 MB, 1.5 GB (powers of 1024, as the options take them)."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


class TaskLimits:
    """Kills a worker whose current task passed --timeout or --max-memory-per-task.

    Works on anything with `pid`, `slot` ([task id, start monotonic ns]) and a
    writable `kill_reason` (processes.WorkerHandle).
    """

    def __init__(self, timeout: float | None, max_memory: int | None) -> None:
        self.timeout = timeout
        self.max_memory = max_memory

    @property
    def active(self) -> bool:
        return bool(self.timeout or self.max_memory)

    def enforce(self, workers: Iterable[Any]) -> None:
        if not self.active:
            return
        now_ns = time.monotonic_ns()
        for worker in workers:
            task_id, started = worker.slot[0], worker.slot[1]
            if not task_id or worker.kill_reason:
                continue
            reason = self._breach(worker.pid, now_ns - started)
            if reason:
                worker.kill_reason = reason
                kill_group(worker.pid)

    def _breach(self, pid: int, running_ns: int) -> str | None:
        if self.timeout and running_ns / 1e9 > self.timeout:
            return f"timed out after {self.timeout:g}s (worker killed)"
        if self.max_memory:
            rss = rss_bytes(pid)
            if rss is not None and rss > self.max_memory:
                return (f"memory above {format_size(self.max_memory)} (worker RSS {format_size(rss)}; "
                        "worker killed)")
        return None

    def next_check(self, busy_workers: Iterable[Any]) -> float | None:
        """Seconds until `enforce` must run again, given the workers that hold batches
        (None: nothing to watch). A task may start at any moment on a busy worker, so its
        memory is polled steadily; a timeout can wait for the running task's deadline."""
        if not self.active:
            return None
        soonest: float | None = None
        now_ns = time.monotonic_ns()
        for worker in busy_workers:
            if worker.kill_reason:
                continue
            if self.max_memory:
                return MEMORY_POLL_SECONDS
            if worker.slot[0]:
                left = max(0.0, (worker.slot[1] - now_ns) / 1e9 + self.timeout)
                soonest = left if soonest is None else min(soonest, left)
        return soonest
