"""Tasks through their states: recovery at start, batch ids, claims, and what a batch's outcomes write.

    pending ──claim──> running ──mark_done──> done | mark_failed_attempt ──> pending(not_before) | failed
                          └──hand_back──> pending        record_new_stat / mark_gone
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from crawlproc.ledger.store import BATCH_IDS_KEY, RUNNING_FLAG, State, _put_meta
from crawlproc.task import relpath_for_people

# Claim: the first pending tasks in merge order, up to LIMIT and while the input
# before each stays under the byte cap (so a big file still goes alone).
_CLAIM = """
UPDATE tasks SET state = 'running' WHERE id IN (
    SELECT id FROM (
        SELECT id, sum(coalesce(length, size)) OVER (ORDER BY path_bytes, "offset"
               ROWS UNBOUNDED PRECEDING) - coalesce(length, size) AS before
        FROM (SELECT id, path_bytes, "offset", length, size FROM tasks
              WHERE state = 'pending' AND not_before <= ?1
              ORDER BY path_bytes, "offset" LIMIT ?2))
    WHERE before < ?3)
RETURNING id, path_bytes, "offset", length, size, mtime_ns, attempts
"""

# A done task found in a result file's trailer (rebuild.py); for a key already
# adopted from a file with a higher batch id, nothing.
_ADOPT_DONE = """
INSERT INTO tasks (relpath, path_bytes, "offset", length, size, mtime_ns, state, attempts, batch_id,
                   result_offset, result_length, result_crc, worker_pid, elapsed_s, finished_at)
VALUES (?, ?, ?, ?, ?, ?, 'done', 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (path_bytes, "offset") DO NOTHING
"""



class Work:
    """Claims and outcomes (a mixin of Ledger)."""

    conn: sqlite3.Connection
    path: Path

    # -- recovery ------------------------------------------------------------
    # Finding `running` tasks takes a pass over the whole table, so the ledger keeps
    # a flag (meta RUNNING_FLAG): '1' is written with the first task made running by
    # a coordinator, in the same transaction, and '0' only once none is running (a
    # run that ended with none, or the requeue below). '0' means none can be running.
    def requeue_stale(self) -> int:
        """Tasks left `running` by a coordinator that died go back to pending, unpenalised."""
        if self.meta().get(RUNNING_FLAG) == "0":
            return 0
        with self.transaction() as conn:
            stale = conn.execute(
                "UPDATE tasks SET state = 'pending', error = 'requeued: its run stopped before it finished' "
                "WHERE state = 'running'"
            ).rowcount
            self._set_running_flag(conn, False)
        return stale

    def _set_running_flag(self, conn: sqlite3.Connection, may_run: bool) -> None:
        _put_meta(conn, {RUNNING_FLAG: "1" if may_run else "0"})
        self._flagged_running = may_run

    def _note_running(self, conn: sqlite3.Connection) -> None:
        """Tasks are being made running in this transaction: the flag must say so first."""
        if not self._flagged_running:
            self._set_running_flag(conn, True)

    def next_batch_id(self) -> int:
        """The first batch id no task refers to and no run has reserved (see batching.BatchIds)."""
        row = self.conn.execute("SELECT max(batch_id) FROM tasks").fetchone()
        reserved = self.conn.execute("SELECT value FROM meta WHERE key = ?", (BATCH_IDS_KEY,)).fetchone()
        return max((row[0] or 0) + 1, int(reserved[0]) if reserved else 0)

    def reserve_batch_ids(self, conn: sqlite3.Connection, below: int) -> None:
        """Batch ids below `below` are taken, whether or not a task ends up referring to them."""
        _put_meta(conn, {BATCH_IDS_KEY: str(below)})

    # -- rebuilding (see rebuild.py) ------------------------------------------------
    def adopt_done(self, conn: sqlite3.Connection, batch_id: int, worker_pid: int, tasks: Iterable[tuple]) -> int:
        """Insert done tasks read from result file `batch_id`'s trailer; returns how many were new.

        tasks: results.TrailerTask-shaped (path_bytes, offset, length, size, mtime_ns,
        result_offset, result_length, result_crc, elapsed_s, finished_at).
        """
        before = conn.total_changes
        conn.executemany(_ADOPT_DONE, ((relpath_for_people(t[0]), *t[:5], batch_id, *t[5:8], worker_pid, *t[8:])
                                       for t in tasks))
        return conn.total_changes - before

    def raise_batch_floor(self, floor: int) -> None:
        """Batch ids handed out from now on are `floor` or more (see next_batch_id)."""
        self.set_meta({BATCH_IDS_KEY: max(floor, self.next_batch_id())})

    # -- claiming and reporting --------------------------------------------------
    def claim(self, conn: sqlite3.Connection, limit: int, max_bytes: int, now: float) -> list[tuple]:
        """Take up to `limit` pending tasks in merge order, stopping near `max_bytes` of input.

        One statement picks and marks them (a running sum enforces the byte cap),
        so claiming costs no Python per task. Rows are shaped like ClaimedTask.
        """
        self._note_running(conn)
        rows = conn.execute(_CLAIM, (now, limit, max_bytes)).fetchall()
        rows.sort(key=_merge_key)
        return rows

    def has_claimable(self, conn: sqlite3.Connection, now: float) -> bool:
        return conn.execute(
            "SELECT 1 FROM tasks WHERE state = 'pending' AND not_before <= ? LIMIT 1", (now,)
        ).fetchone() is not None

    def soonest_retry(self, conn: sqlite3.Connection, now: float) -> float | None:
        """When the first pending task that may not be claimed yet (waiting its retry delay) may."""
        return conn.execute(
            "SELECT min(not_before) FROM tasks WHERE state = 'pending' AND not_before > ?", (now,)
        ).fetchone()[0]

    def mark_done(self, conn: sqlite3.Connection, rows: Iterable[tuple]) -> None:
        """rows: (batch_id, result_offset, result_length, result_crc, worker_pid, elapsed_s, finished_at, id)."""
        conn.executemany(
            "UPDATE tasks SET state = 'done', attempts = attempts + 1, batch_id = ?, result_offset = ?, "
            "result_length = ?, result_crc = ?, worker_pid = ?, elapsed_s = ?, finished_at = ?, "
            "error = NULL, traceback = NULL WHERE id = ? AND state = 'running'",
            rows,
        )

    def mark_failed_attempt(
        self, conn: sqlite3.Connection, task_id: int, error: str, traceback: str | None,
        worker_pid: int | None, retry_at: float | None,
    ) -> None:
        """One failed attempt: back to pending at `retry_at`, or failed for good when it is None."""
        state = State.FAILED.value if retry_at is None else State.PENDING.value
        conn.execute(
            "UPDATE tasks SET state = ?, attempts = attempts + 1, error = ?, traceback = ?, "
            "worker_pid = ?, not_before = ?, finished_at = ? WHERE id = ? AND state = 'running'",
            (state, error, traceback, worker_pid, retry_at or 0, time.time(), task_id),
        )

    def hand_back(self, conn: sqlite3.Connection, ids: Iterable[int]) -> None:
        """Running tasks that never started (or whose worker stopped) go back unpenalised."""
        conn.executemany(
            "UPDATE tasks SET state = 'pending' WHERE id = ? AND state = 'running'", ((i,) for i in ids)
        )

    def record_new_stat(self, conn: sqlite3.Connection, task_id: int, size: int, mtime_ns: int) -> None:
        """The file changed while it was processed: its next attempt expects the new stat."""
        self._forget_folders_of(conn, self._path_of(conn, task_id))
        conn.execute("UPDATE tasks SET size = ?, mtime_ns = ? WHERE id = ? AND state = 'running'",
                     (size, mtime_ns, task_id))

    def mark_gone(self, conn: sqlite3.Connection, task_id: int) -> None:
        self._forget_folders_of(conn, self._path_of(conn, task_id))
        conn.execute("UPDATE tasks SET state = 'gone' WHERE id = ? AND state = 'running'", (task_id,))

    @staticmethod
    def _path_of(conn: sqlite3.Connection, task_id: int) -> list[bytes]:
        return [row[0] for row in conn.execute("SELECT path_bytes FROM tasks WHERE id = ?", (task_id,))]

    def requeue_damaged(self, ids: list[int], reason: str) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE tasks SET state = 'pending', error = ? WHERE id = ? AND state = 'done'",
                ((reason, i) for i in ids),
            )

    def retry(self, *, include_done: bool, relpaths: Iterable[bytes | str] = ()) -> int:
        """Put failed (and with include_done, done) tasks back to pending; returns how many.
        `relpaths`: only the tasks of these files, each a file's bytes or its name for people."""
        states = ("failed", "done") if include_done else ("failed",)
        marks = ",".join("?" * len(states))
        sql = (
            "UPDATE tasks SET state = 'pending', attempts = 0, not_before = 0, error = NULL, "
            f"traceback = NULL WHERE state IN ({marks})"
        )
        paths = list(relpaths)
        with self.transaction() as conn:
            if not paths:
                return conn.execute(sql, states).rowcount
            return sum(conn.execute(sql + (" AND path_bytes = ?" if isinstance(p, bytes) else " AND relpath = ?"),
                                    (*states, p)).rowcount for p in paths)

    def has_task(self, path_bytes: bytes) -> bool:
        """Whether any task (of any state) is of the file `path_bytes`."""
        return self.conn.execute("SELECT 1 FROM tasks WHERE path_bytes = ? LIMIT 1", (path_bytes,)).fetchone() is not None

    def file_named(self, relpath: bytes) -> bytes | None:
        """The file of a task named `relpath`: those very bytes, or the name as people read it
        (`failures` shows a byte that is not UTF-8 as \\xNN, and retry and explain take it so);
        None when no task has that name. The bytes win: a file really named with a backslash."""
        if self.has_task(relpath):
            return relpath
        row = self.conn.execute("SELECT path_bytes FROM tasks WHERE relpath = ? LIMIT 1",
                                (relpath_for_people(relpath),)).fetchone()
        return row[0] if row else None

    def unknown_relpaths(self, relpaths: Iterable[str]) -> list[str]:
        """Those of `relpaths` (as people read them) that no task has, in the order given."""
        return [p for p in relpaths
                if self.conn.execute("SELECT 1 FROM tasks WHERE relpath = ? LIMIT 1", (p,)).fetchone() is None]



def _merge_key(row: tuple) -> tuple:
    return (row[1], row[2])
