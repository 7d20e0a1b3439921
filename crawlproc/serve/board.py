"""Where the status page's live fields come from: the run itself, or the ledger alone.

    LiveBoard    (--serve, in the coordinator)   coordinator's on_progress ──at most every
                                                 PUBLISH_SECONDS──> Coordinator.live_view() +
                                                 this run's DurationHistogram ──send──> the page
                                                 process (page_process.py)
    RelayedBoard (--serve, in the page process)  each snapshot received, swapped whole
    LedgerBoard  (crawlproc serve)               built on request from `status` and the ledger's
                                                 running tasks

A snapshot is a read-only mapping that is never changed once published: the
server's threads read whichever one is current, without a lock. The
coordinator pays one clock read per turn between publications, and a send
that never waits.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from loguru import logger

from crawlproc.serve.view import DURATION_BOUNDS, Durations

PUBLISH_SECONDS = 0.5
HISTORY_POINTS = 600  # past this, every other point is dropped: the chart spans the whole run


class History:
    """(wall time, tasks processed) points for the files/s chart, thinned as they grow."""

    def __init__(self, limit: int = HISTORY_POINTS) -> None:
        self.limit = limit
        self._points: list[tuple[float, int]] = []

    def add(self, at: float, processed: int) -> tuple[tuple[float, int], ...]:
        """Add a point; returns all of them, as a tuple the caller may keep."""
        if len(self._points) >= self.limit:
            self._points = self._points[-1::-2][::-1]  # every other point, the newest kept
        self._points.append((round(at, 3), processed))
        return tuple(self._points)


class DurationHistogram:
    """The times of the tasks a run has done, counted as its coordinator records them (in
    its own thread): the page then needs no pass over the ledger for them. A batch's times
    are sorted once, then one bisection per bound: a few microseconds a batch."""

    def __init__(self, bounds: Sequence[float] = DURATION_BOUNDS) -> None:
        self.bounds = tuple(bounds)
        self._at_most = [0] * len(self.bounds)  # tasks whose time is <= each bound: Prometheus' "le"
        self._count = 0
        self._sum = 0.0

    def add(self, times: list[float]) -> None:
        if not times:
            return
        ordered = sorted(times)
        for i, bound in enumerate(self.bounds):
            self._at_most[i] += bisect_right(ordered, bound)
        self._count += len(ordered)
        self._sum += sum(ordered)

    def read(self) -> Durations:
        return Durations(tuple(self._at_most), self._count, self._sum)


class LiveBoard:
    """The coordinator's side of `--serve`: wraps the run's progress hook and sends snapshots
    to the page process (`send` never waits: a page that is behind gets the next one)."""

    def __init__(self, command: str, send: Callable[[dict], None], *, every: float = PUBLISH_SECONDS,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.command = command  # "run" or "watch"
        self.send = send
        self.every, self.clock, self.wall = every, clock, wall
        self._coordinator: Any = None
        self._durations = DurationHistogram()
        self._next = 0.0
        self._failed_once = False

    def follow(self, coordinator: Any) -> None:
        """Publish this coordinator's view from now on (a job may run several in turn)."""
        self._coordinator = coordinator
        self._durations = DurationHistogram()
        coordinator.on_done_times = self._durations.add
        self._next = 0.0

    def progress_hook(self, on_progress: Callable[[dict], None] | None) -> Callable[[dict], None]:
        """`on_progress` (if any), then a new snapshot when one is due or the run is finishing."""
        def hook(stats: dict) -> None:
            if on_progress is not None:
                on_progress(stats)
            if self.clock() >= self._next or stats.get("final"):
                self.publish(final=bool(stats.get("final")))
        return hook

    def publish(self, *, final: bool = False) -> None:
        """Send a fresh snapshot. A failure here is logged once and never stops the run."""
        self._next = self.clock() + self.every
        if self._coordinator is None:
            return
        try:
            self.send({**self._coordinator.live_view(), "source": self.command, "at": self.wall(), "final": final,
                       "durations": self._durations.read()})
        except Exception as exc:  # the page is a bystander: the run goes on without it
            if not self._failed_once:
                self._failed_once = True
                logger.warning("the status page could not be updated: {!r}", exc)


class RelayedBoard:
    """The page process's side of `--serve`: the snapshots the run sends, swapped whole.

    The run knows its own retries, running tasks and task times, so the page reads
    none of them from the ledger (`from_the_run`)."""

    from_the_run = True

    def __init__(self) -> None:
        self.current: Mapping[str, Any] | None = None
        self._durations: Durations | None = None
        self._history = History()

    def receive(self, snapshot: dict[str, Any]) -> None:
        """Take a snapshot the run sent (decoded JSON); the chart's history is kept here."""
        cumulative, count, total = snapshot.pop("durations")
        self._durations = Durations(tuple(cumulative), count, total)
        snapshot["history"] = self._history.add(snapshot["at"], snapshot["done"] + snapshot["failed"])
        self.current = MappingProxyType(snapshot)

    def snapshot(self, status: Mapping[str, Any], running: list[dict]) -> Mapping[str, Any] | None:
        return self.current

    def durations(self) -> Durations | None:
        """The times of the tasks the run has done so far (None: it has sent nothing yet)."""
        return self._durations


class LedgerBoard:
    """`crawlproc serve`: a snapshot made from what `status` reads and the running tasks."""

    from_the_run = False  # retries, running tasks and task times: all from the ledger

    def __init__(self, *, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self._history = History()
        self._lock = threading.Lock()  # request threads add history points

    def snapshot(self, status: Mapping[str, Any], running: list[dict]) -> Mapping[str, Any]:
        run = status.get("last_run") or {}
        counts = status["counts"]
        done, failed = run.get("done", 0), run.get("failed", 0)
        with self._lock:
            history = self._history.add(self.wall(), done + failed)
        return MappingProxyType({
            "source": "ledger", "at": self.wall(), "final": run.get("state") != "going",
            "done": done, "failed": failed, "retried": None, "running": counts["running"],
            "scanned": None, "scan_finished": None, "pending_left": counts["pending"], "stopping": False,
            "executor": None, "workers": [{"pid": None, "running_s": None, **task} for task in running],
            "watch": run.get("watch"), "history": history,
        })

    def durations(self) -> None:
        return None  # the view reads the ledger's done tasks' times
