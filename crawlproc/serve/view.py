"""What /status.json says (and /metrics reads): `status --json`, the live snapshot, the latest failures.

    StatusView.document()
        status      what `crawlproc status --json` prints (report.status_from),   ┐ one read, cached:
                    its counts from Ledger.counts_for_the_page                    │ read again after
        ledger      the latest failures (only if that pass counted some), the     │ max(5 s, 100x its
                    oldest pending mtime (+ for `crawlproc serve`: task times,    │ cost)
                    retries, running tasks: Ledger.page_totals)                   ┘
        live        the board's snapshot + worker RSS (/proc), recent files/s, ETA, ages,
                    and (--serve) the run's own task-time histogram, fresh on every request

The ledger is read on a connection of this module's own, read-only, only when a
client asks and the cache is stale, so a page left open costs the run a pass
over the table every five seconds, and a big ledger proportionally less often:
each read takes at most ~1% of a core. On a machine whose cores the workers
keep busy that is what a watched run pays, so a watched run's page reads from
the ledger only what its coordinator does not know, in one pass: the counts of
every state (other runs' tasks too), whether there are failures to list
(earlier runs' too) and the oldest pending file. Its counters, rate, workers,
retries and task times come from the coordinator (board.LiveBoard).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from crawlproc.errors import CrawlprocError

T = TypeVar("T")

MIN_REFRESH_SECONDS = 5.0
REFRESH_COST_FACTOR = 100  # a read that took t seconds is reused for 100 t: at most ~1% of a core
RATE_WINDOW_SECONDS = 30.0  # files/s is the rate over this last stretch of the history
FAILURES_SHOWN = 20
RUNNING_SHOWN = 50  # tasks listed as running by `crawlproc serve` (it knows no workers)
DURATION_BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
STATES = ("pending", "running", "done", "failed", "gone")


class Cached(Generic[T]):
    """A value read again only once it is older than a while that grows with its cost."""

    def __init__(self, read: Callable[[], T], *, clock: Callable[[], float] = time.monotonic) -> None:
        self.read, self.clock = read, clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._fresh_until = 0.0

    def get(self) -> T:
        with self._lock:  # one reader at a time; the others wait for its answer
            if self.clock() >= self._fresh_until:
                started = self.clock()
                self._value = self.read()
                cost = self.clock() - started
                self._fresh_until = self.clock() + max(MIN_REFRESH_SECONDS, REFRESH_COST_FACTOR * cost)
            return self._value


class Durations(NamedTuple):
    """Done tasks' times as a Prometheus histogram: cumulative counts per bound, count, sum."""

    cumulative: tuple[int, ...]
    count: int
    sum: float


NO_DURATIONS = Durations(tuple(0 for _ in DURATION_BOUNDS), 0, 0.0)


class LedgerReads(NamedTuple):
    """What the page reads from the ledger: `status`, and more. Durations, retries and running
    tasks only for a board that does not get them from the run (None, None, [] otherwise:
    the live snapshot has this run's)."""

    status: dict[str, Any]
    durations: Durations | None
    retried_attempts: int | None  # failed attempts tried again, over the ledger's tasks
    oldest_pending_mtime_ns: int | None
    latest_failures: list[dict[str, Any]]
    running: list[dict[str, Any]]


class StatusView:
    """The document behind /status.json and /metrics, for one OUT and one board."""

    def __init__(self, out: Path, board: Any, *, wall: Callable[[], float] = time.time) -> None:
        self.out, self.board, self.wall = out, board, wall
        self._ledger = Cached(self._read_ledger)

    def document(self) -> dict[str, Any]:
        reads = self._ledger.get()
        status = reads.status
        snapshot = self.board.snapshot(status, reads.running)
        durations = self.board.durations() or reads.durations or NO_DURATIONS
        return {**status, "live": self._live(snapshot, status, reads), "latest_failures": reads.latest_failures,
                "task_durations": {"bounds": list(DURATION_BOUNDS), "cumulative": list(durations.cumulative),
                                   "count": durations.count, "sum": durations.sum},
                "retried_attempts": reads.retried_attempts}

    # -- the ledger ------------------------------------------------------------------
    def _read_ledger(self) -> LedgerReads:
        from crawlproc.report import read_ledger, status_from

        try:
            ledger = read_ledger(self.out)
        except CrawlprocError:  # a run's OUT before its ledger exists
            status = {"out": str(self.out), "counts": dict.fromkeys(STATES, 0), "total": 0, "scan_problems": [],
                      "last_run": None, "running_pid": None}
            return LedgerReads(status, NO_DURATIONS, 0, None, [], [])
        try:
            tasks = ledger.counts_for_the_page()
            status = status_from(ledger, self.out, tasks.counts)
            failures = ledger.latest_failures(FAILURES_SHOWN) if tasks.failures else []
            if self.board.from_the_run:  # no more passes over the table for what the coordinator knows
                return LedgerReads(status, None, None, tasks.oldest_pending_mtime_ns, failures, [])
            totals = ledger.page_totals(DURATION_BOUNDS)
            durations = Durations(totals.duration_buckets, totals.durations_counted, totals.durations_sum)
            return LedgerReads(status, durations, totals.retried_attempts, tasks.oldest_pending_mtime_ns, failures,
                               ledger.running_tasks(RUNNING_SHOWN))
        finally:
            ledger.close()

    # -- live fields -----------------------------------------------------------------------
    def _live(self, snapshot: Mapping[str, Any] | None, status: Mapping[str, Any],
              reads: LedgerReads) -> dict[str, Any] | None:
        if snapshot is None:  # the run has not published yet
            return None
        now = self.wall()
        live = {key: value for key, value in snapshot.items() if key not in ("history", "workers", "watch")}
        live["history"] = [list(point) for point in snapshot["history"]]
        live["workers"] = [{**worker, "rss_bytes": _rss(worker["pid"])} for worker in snapshot["workers"]]
        live["files_per_s"] = recent_rate(snapshot["history"])
        live["eta_s"] = eta_seconds(live["files_per_s"], _tasks_left(snapshot, status))
        live["oldest_pending_age_s"] = (None if reads.oldest_pending_mtime_ns is None
                                        else max(0.0, now - reads.oldest_pending_mtime_ns / 1e9))
        watch = snapshot.get("watch")
        if watch is not None:
            queued = watch.get("oldest_queued_at")
            watch = {**watch, "lag_s": max(0.0, now - queued) if queued else 0.0}
        live["watch"] = watch
        if live["retried"] is None:  # `crawlproc serve`: the ledger's count over all runs
            live["retried"] = reads.retried_attempts
        return live


def _tasks_left(snapshot: Mapping[str, Any], status: Mapping[str, Any]) -> int | None:
    """Tasks still to process, once they are all known (a `run` still scanning: None)."""
    if snapshot["source"] == "run" and not snapshot["scan_finished"]:
        return None
    counts = status["counts"]
    return counts["pending"] + counts["running"]


def recent_rate(history: tuple[tuple[float, int], ...], window: float = RATE_WINDOW_SECONDS) -> float | None:
    """Tasks per second over the last `window` seconds of the history (None: too little of it)."""
    if len(history) < 2:
        return None
    last_at, last = history[-1]
    first_at, first = next(((at, n) for at, n in history if at >= last_at - window), history[-2])
    if last_at <= first_at:
        first_at, first = history[-2]
    span = last_at - first_at
    return round((last - first) / span, 2) if span > 0 else None


def eta_seconds(rate: float | None, left: int | None) -> float | None:
    """Seconds until the tasks left are processed at `rate` (None: not known yet)."""
    if left == 0:
        return 0.0
    if left is None or not rate or rate <= 0:
        return None
    return round(left / rate, 1)


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    from crawlproc.supervision import rss_bytes

    return rss_bytes(pid)
