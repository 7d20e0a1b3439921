"""Progress for people: a rich bar on a terminal, a log line every few seconds elsewhere.

The pool calls the reporter after each loop turn with its counters; the
reporter decides how often it actually draws, so the pool never waits on it.
"""

from __future__ import annotations

import time
from typing import Any

from loguru import logger

from crawlproc import logs
from crawlproc.words import plural

LOG_EVERY_SECONDS = 5.0
DRAW_EVERY_SECONDS = 0.1


class ProgressReporter:
    """Call with the pool's stats dict; `close()` when the run ends."""

    def __init__(self, *, bar: bool, watching: bool = False) -> None:
        self.watching = watching
        self.started = time.monotonic()
        self._last = self.started if not bar else 0.0
        self._bar = _RichBar() if bar else None

    def __call__(self, stats: dict) -> None:
        now = time.monotonic()
        every = DRAW_EVERY_SECONDS if self._bar else LOG_EVERY_SECONDS
        if now - self._last < every and not (stats.get("final") and self._bar):
            return
        self._last = now
        view = self._view(stats, now)
        if self._bar:
            self._bar.draw(view)
        else:
            logger.info("{done} done{of}, {failed} failed, {rate:.0f} files/s{eta} ({scan})", **view)

    def _view(self, stats: dict, now: float) -> dict[str, Any]:
        elapsed = max(now - self.started, 1e-9)
        done, failed = stats["done"], stats["failed"]
        rate = done / elapsed
        total = None
        if stats["scan_finished"] and stats["pending_left"] is not None:
            total = done + failed + stats["pending_left"] + stats["running"]
        left = None if total is None else total - done - failed
        eta = None if not left or rate <= 0 else left / rate
        return {
            "done": done, "failed": failed, "rate": rate, "total": total,
            "of": "" if total is None else f"/{total}",
            "eta": "" if eta is None else f", ETA {eta:.0f}s",
            "scan": self._source_text(stats),
        }

    def _source_text(self, stats: dict) -> str:
        if self.watching:
            text = f"watching, {plural(stats['scanned'], 'file')} recorded"
        else:
            text = "scan finished" if stats["scan_finished"] else f"scanning, {plural(stats['scanned'], 'file')} so far"
        executor = stats.get("executor") or {}
        if executor.get("executor") == "dask":
            text += (f"; Dask: {plural(executor.get('workers', 0), 'worker')}, "
                     f"{plural(executor.get('threads', 0), 'thread')}")
        return text

    def close(self) -> None:
        if self._bar:
            self._bar.close()


class _RichBar:
    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False,
        )
        self.task = self.progress.add_task("scanning", total=None, extra="")
        self.progress.start()
        logs.use_console(self.progress.console)

    def draw(self, view: dict) -> None:
        extra = f"failed {view['failed']}  {view['rate']:.0f} files/s"
        description = "processing" if view["total"] is not None else view["scan"]
        self.progress.update(self.task, completed=view["done"] + view["failed"], total=view["total"],
                             description=description, extra=extra)

    def close(self) -> None:
        self.progress.stop()
        logs.use_console(None)
