"""Reads: counts and the done signature (one pass, maybe taken ahead in a thread), failures, the merge's
order, and what the Python API, `explain` and the status page show.
"""

from __future__ import annotations

import heapq
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.ledger.store import State, _connect

# A task as the Python API and `explain` show it (not its key bytes or result range).
TASK_FIELDS = ("id", "relpath", "offset", "length", "size", "mtime_ns", "state", "attempts", "error",
               "traceback", "not_before", "batch_id", "worker_pid", "elapsed_s", "finished_at")

_TASK_COLUMNS = ", ".join(f'"{name}"' for name in TASK_FIELDS)

# Tasks per state, then the done tasks' signature (max id, and totals of batch ids, finish
# times and checksums): one pass over the table, no sort.
_STATE_COUNTS = [f"count(*) FILTER (WHERE state = '{s.value}')" for s in State]
_STATE_TOTALS = "SELECT " + ", ".join(
    _STATE_COUNTS + [f"{agg} FILTER (WHERE state = 'done')" for agg in
                     ("max(id)", "total(batch_id)", "total(finished_at)", "total(result_crc)")]
) + " FROM tasks"

_FAILURE_KEYS = ("relpath", "offset", "attempts", "error", "traceback")

# The failed attempts people are shown (Ledger.latest_failures): tasks failed for good, and
# pending ones that wait for a retry.
_FAILURE_ROWS = "state = 'failed' OR (state = 'pending' AND error IS NOT NULL)"

# The status page's counts (Ledger.counts_for_the_page): `status`'s, with how many rows
# latest_failures would list and the oldest pending mtime, in the same pass.
_PAGE_COUNTS = "SELECT " + ", ".join(
    _STATE_COUNTS + [f"count(*) FILTER (WHERE {_FAILURE_ROWS})", "min(mtime_ns) FILTER (WHERE state = 'pending')"]
) + " FROM tasks"


class PageCounts(NamedTuple):
    """The tasks as the status page tells them (Ledger.counts_for_the_page)."""

    counts: dict[str, int]  # tasks per state
    failures: int  # how many rows latest_failures would list (0: the page does not ask for them)
    oldest_pending_mtime_ns: int | None  # the oldest mtime among pending tasks


class PageTotals(NamedTuple):
    """What `crawlproc serve`'s page reads from the tasks beyond their counts (Ledger.page_totals)."""

    duration_buckets: tuple[int, ...]  # done tasks whose elapsed_s <= each bound, cumulative
    durations_counted: int  # done tasks with a recorded elapsed_s
    durations_sum: float  # their elapsed_s, summed
    retried_attempts: int  # failed attempts that were (or will be) tried again, over the live tasks



class Reading:
    """Reads for the merge, the summary and people (a mixin of Ledger)."""

    conn: sqlite3.Connection
    path: Path

    # -- finalizer ------------------------------------------------------------
    def done_in_merge_order(self) -> Iterator[tuple]:
        """(id, batch_id, result_offset, result_length, result_crc) per done task, in merge order."""
        cursor = self.conn.execute(
            "SELECT id, batch_id, result_offset, result_length, result_crc "
            "FROM tasks WHERE state = 'done' ORDER BY path_bytes, \"offset\""
        )
        return cursor  # plain tuples, only the columns the merge reads: this runs once per task

    def task_place(self, task_id: int) -> tuple[str, int | None] | None:
        """(relpath, offset or None for a whole file) of a task, for messages."""
        row = self.conn.execute('SELECT relpath, "offset", length FROM tasks WHERE id = ?', (task_id,)).fetchone()
        return None if row is None else (row[0], None if row[2] is None else row[1])

    def done_signature(self) -> list:
        """Changes whenever the set of done tasks or any of their results changes."""
        return list(self._state_totals()[1])

    # -- reading for people ------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Tasks per state, from the pass the end of a run also takes the done signature from
        (kept: finish_run reads it)."""
        return dict(self._state_totals()[0])

    def counts_for_people(self) -> dict[str, int]:
        """Tasks per state alone (`status`, a read-only look): half the cost of a pass that
        also takes the done signature, and nothing kept."""
        row = self.conn.execute("SELECT " + ", ".join(_STATE_COUNTS) + " FROM tasks").fetchone()
        return dict(zip((s.value for s in State), row))

    def counts_for_the_page(self) -> PageCounts:
        """counts_for_people, with what the status page adds to them, from the same pass.

        One pass where the page took three: on 100,000 tasks in the middle of a run, ~23 ms
        instead of ~37 ms (the counts, the oldest pending mtime through the pending index,
        the failures through the table), every few seconds while a page is open."""
        *states, failures, oldest = self.conn.execute(_PAGE_COUNTS).fetchone()
        return PageCounts(dict(zip((s.value for s in State), states)), failures, oldest)

    def _state_totals(self) -> tuple[dict[str, int], tuple]:
        """(tasks per state, done signature), from one pass over the table.

        The end of a run asks for both; the pass is kept until the ledger is
        written (here, or by another connection: PRAGMA data_version).
        """
        self._take_count_ahead()
        if self._fresh_totals() is None:
            version = self._totals_version()
            self._totals = (version, *_unpack_totals(self.conn.execute(_STATE_TOTALS).fetchone()))
        return self._totals[1], self._totals[2]

    def count_ahead(self, *, unless_fresh: bool = False) -> None:
        """Start that pass now, in a thread with a connection of its own.

        A rerun that turns out to have nothing to do ends by asking for it (the
        summary, the merge's signature): this way it is ready, counted while the
        scan waits on its listing helpers. Any write in between makes it stale,
        and it is simply not used. `unless_fresh`: no new pass while the last one holds.
        """
        if self._counting is not None or (unless_fresh and self._fresh_totals() is not None):
            return
        version = self._totals_version()  # taken first: a commit after it makes the count stale
        box: list = []
        thread = threading.Thread(target=_count_into, args=(self.path, box), name="ledger-count", daemon=True)
        thread.start()
        self._counting = (version, thread, box)

    def _take_count_ahead(self) -> None:
        if self._counting is None:
            return
        version, thread, box = self._counting
        self._counting = None
        thread.join()
        if box and version == self._totals_version():
            self._totals = (version, *_unpack_totals(box[0]))

    def _fresh_totals(self) -> tuple[dict[str, int], tuple] | None:
        """The last pass's (counts, done signature) if nothing was written since, else None."""
        if self._totals is None or self._totals[0] != self._totals_version():
            return None
        return self._totals[1], self._totals[2]

    def _totals_version(self) -> tuple[int, int]:
        return (self._writes, self.conn.execute("PRAGMA data_version").fetchone()[0])

    def count_live(self, conn: sqlite3.Connection) -> int:
        """Tasks that are not gone: what a --max-failures percentage is taken of."""
        return conn.execute("SELECT count(*) FROM tasks WHERE state != 'gone'").fetchone()[0]

    def count_pending(self) -> int:
        """Pending tasks (the partial index makes this cheap, unlike counts())."""
        return self.conn.execute("SELECT count(*) FROM tasks WHERE state = 'pending'").fetchone()[0]

    def pending_outlook(self, now: float) -> tuple[bool, float | None]:
        """(is any pending task claimable now, the soonest retry time of those that are not)."""
        return self.has_claimable(self.conn, now), self.soonest_retry(self.conn, now)

    def failures(self) -> list[dict[str, Any]]:
        """Failed tasks (kind "task") and paths a scan could not read (kind "scan": offset None,
        attempts 0; a folder's relpath ends in '/'), in path order."""
        rows = self.conn.execute(
            'SELECT path_bytes, "offset", relpath, "offset", attempts, error, traceback FROM tasks '
            "WHERE state = 'failed' ORDER BY path_bytes, \"offset\""
        )
        tasks = ((r[0], r[1], {**dict(zip(_FAILURE_KEYS, r[2:])), "kind": "task"}) for r in rows)
        problems = ((path, -1, {"relpath": relpath, "offset": None, "attempts": 0, "error": error,
                                "traceback": None, "kind": "scan"})
                    for path, relpath, error, _ in self._scan_problem_rows())
        return [row for *_, row in heapq.merge(tasks, problems, key=lambda item: (item[0], item[1]))]

    # -- reading tasks one by one (the Python API, `explain`) ----------------------------
    def iter_tasks(self, state: str | None = None) -> Iterator[dict[str, Any]]:
        """Every task, or those in `state`, in merge order, as dicts (TASK_FIELDS), streamed, each
        with `path`: its name as processors get it (os.fsdecode), to join with their records;
        `relpath` is the name for people (a non-UTF-8 byte as \\xNN)."""
        where, args = (" WHERE state = ?", (state,)) if state is not None else ("", ())
        cursor = self.conn.execute(f"SELECT {_TASK_COLUMNS}, path_bytes FROM tasks{where} "
                                   'ORDER BY path_bytes, "offset"', args)
        return ({**dict(zip(TASK_FIELDS, row)), "path": os.fsdecode(row[-1])} for row in cursor)

    def tasks_of(self, path_bytes: bytes) -> list[dict[str, Any]]:
        """The tasks of one file (several with --chunk-size), in offset order."""
        rows = self.conn.execute(f'SELECT {_TASK_COLUMNS} FROM tasks WHERE path_bytes = ? ORDER BY "offset"',
                                 (path_bytes,))
        return [dict(zip(TASK_FIELDS, row)) for row in rows]

    # -- reading for the status page (serve/) -------------------------------------------
    def page_totals(self, bounds: Sequence[float]) -> PageTotals:
        """What `crawlproc serve`'s page and /metrics add to `counts_for_the_page`, in one pass
        over the table (a run's own page has all of it from the run)."""
        buckets = ", ".join("count(*) FILTER (WHERE state = 'done' AND elapsed_s <= ?)" for _ in bounds)
        row = self.conn.execute(
            f"SELECT {buckets}{', ' if bounds else ''}"
            "count(elapsed_s) FILTER (WHERE state = 'done'), total(elapsed_s) FILTER (WHERE state = 'done'), "
            "total(CASE WHEN state IN ('done', 'failed') THEN max(attempts - 1, 0) ELSE attempts END) "
            "FILTER (WHERE state != 'gone') FROM tasks",
            tuple(bounds)).fetchone()
        n = len(bounds)
        return PageTotals(tuple(row[:n]), row[n], row[n + 1], int(row[n + 2]))

    def latest_failures(self, limit: int) -> list[dict[str, Any]]:
        """The most recent failed attempts, newest first: tasks failed for good, and pending
        ones that wait for a retry ("retrying")."""
        rows = self.conn.execute(
            'SELECT relpath, "offset", attempts, error, finished_at, state FROM tasks '
            f"WHERE {_FAILURE_ROWS} ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,))
        return [{"relpath": relpath, "offset": offset, "attempts": attempts, "error": error, "at": at,
                 "state": "failed" if state == State.FAILED.value else "retrying"}
                for relpath, offset, attempts, error, at, state in rows]

    def running_tasks(self, limit: int) -> list[dict[str, Any]]:
        """Tasks marked running (by a run going on, or left by one that died), in path order."""
        rows = self.conn.execute(
            'SELECT id, relpath, "offset", attempts FROM tasks WHERE state = \'running\' '
            'ORDER BY path_bytes, "offset" LIMIT ?', (limit,))
        return [{"task": task_id, "relpath": relpath, "offset": offset, "attempts": attempts}
                for task_id, relpath, offset, attempts in rows]



def _unpack_totals(row: tuple) -> tuple[dict[str, int], tuple]:
    counts = dict(zip((s.value for s in State), row[:len(State)]))
    return counts, (counts[State.DONE.value], *row[len(State):])


def _count_into(path: Path, box: list) -> None:
    """Ledger.count_ahead's thread: the state totals row, read on a connection of its own."""
    try:
        conn = _connect(path, readonly=True)
        try:
            box.append(conn.execute(_STATE_TOTALS).fetchone())
        finally:
            conn.close()
    except sqlite3.Error:
        pass  # the caller counts for itself
