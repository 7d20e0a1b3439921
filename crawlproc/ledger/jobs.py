"""The job around the tasks: the run's identity against OUT's (crawlproc.identity decides, this stores),
and the `runs` rows that `status` reads.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from crawlproc.identity import (
    KEPT_RESULTS_KEY,
    Verdict,
    judge,
    kept_results,
    kept_results_entry,
)
from crawlproc.ledger.store import RUN_OPTIONS_KEY, State, _meta_texts, _put_meta


class Jobs:
    """Identity and runs (a mixin of Ledger)."""

    conn: sqlite3.Connection
    path: Path

    def check_identity(self, identity: Mapping[str, Any], *, reprocess: bool,
                       keep_results: bool = False) -> bool:
        """Compare the run's identity with OUT's; True when every task must be redone.

        Raises IdentityMismatch naming both sides unless `reprocess` is set (see settle_identity).
        """
        verdict = self.settle_identity(identity, reprocess=reprocess, keep_results=keep_results)
        return verdict is Verdict.REPROCESS

    def judge_identity(self, identity: Mapping[str, Any], *, reprocess: bool, keep_results: bool = False,
                       earlier_code: Callable[[], Collection[str]] = frozenset) -> Verdict:
        """The verdict on running with `identity` on this OUT (crawlproc.identity.judge); reads only,
        so a dry run asks it of a read-only ledger. Raises IdentityMismatch as a run would."""
        return judge(self.meta(), _meta_texts(identity), out=self.path.parent, reprocess=reprocess,
                     keep_results=keep_results, count_done=self._count_done, earlier_code=earlier_code)

    def settle_identity(self, identity: Mapping[str, Any], *, reprocess: bool, keep_results: bool = False,
                        earlier_code: Callable[[], Collection[str]] = frozenset) -> Verdict:
        """Judge the run's identity against OUT's and store what the verdict says.

        REPROCESS sends every task back to pending; KEPT records the acceptance in meta.
        """
        verdict = self.judge_identity(identity, reprocess=reprocess, keep_results=keep_results,
                                      earlier_code=earlier_code)
        if verdict is Verdict.SAME:
            return verdict
        stored, wanted = self.meta(), _meta_texts(identity)
        kept = None
        if verdict is Verdict.KEPT:
            kept = [*kept_results(stored), kept_results_entry(stored, wanted, self._count_done())]
        with self.transaction() as conn:
            if verdict is Verdict.REPROCESS:
                self._reset_every_task(conn)
            if kept is not None:
                _put_meta(conn, {KEPT_RESULTS_KEY: json.dumps(kept)})
            _put_meta(conn, wanted)
        return verdict

    def record_run_options(self, args: list[str]) -> None:
        """The options of this run that a carry-on command must repeat (--timeout 60, --format
        parquet, ...), as command-line arguments; written only when they changed."""
        text = json.dumps(args)
        if (self._meta_value(RUN_OPTIONS_KEY) or "[]") != text:  # as record_scan_settings does
            self.set_meta({RUN_OPTIONS_KEY: text})

    def kept_results(self) -> list[dict[str, Any]]:
        """Each time --keep-results accepted edited processor code on this OUT (since the last --reprocess)."""
        return kept_results(self.meta())

    def _count_done(self) -> int:
        return self.conn.execute("SELECT count(*) FROM tasks WHERE state = 'done'").fetchone()[0]

    def _reset_every_task(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE tasks SET state = 'pending', attempts = 0, error = NULL, traceback = NULL, "
            "not_before = 0 WHERE state != 'gone'"
        )
        # Byte ranges are planned again by the next scan, under the new --chunk-size.
        conn.execute('DELETE FROM tasks WHERE "offset" > 0')
        conn.execute("DELETE FROM folders")
        conn.execute("DELETE FROM meta WHERE key = ?", (KEPT_RESULTS_KEY,))  # no old records are left

    def run_at(self, when: float) -> dict[str, Any] | None:
        """The run that was going at `when` (the last one started by then)."""
        cursor = self.conn.execute("SELECT * FROM runs WHERE started <= ? ORDER BY id DESC LIMIT 1", (when,))
        row = cursor.fetchone()
        return None if row is None else dict(zip((d[0] for d in cursor.description), row))

    # -- runs ------------------------------------------------------------------
    def start_run(self, command: str, pid: int) -> int:
        now = time.time()
        with self.transaction() as conn:
            return conn.execute(
                "INSERT INTO runs (command, pid, started, updated, done, failed) VALUES (?, ?, ?, ?, 0, 0)",
                (command, pid, now, now),
            ).lastrowid

    def update_run(self, conn: sqlite3.Connection, run_id: int, done: int, failed: int, info: Mapping | None = None) -> None:
        conn.execute(
            "UPDATE runs SET updated = ?, done = ?, failed = ?, info = coalesce(?, info) WHERE id = ?",
            (time.time(), done, failed, json.dumps(info) if info is not None else None, run_id),
        )

    def end_run(self, run_id: int, exit_code: int) -> None:
        """Close the row of a run that stopped on an error (its counts: the last heartbeat's)."""
        with self.transaction() as conn:
            conn.execute("UPDATE runs SET finished = ?, updated = ?, exit_code = ? WHERE id = ? AND finished IS NULL",
                         (time.time(), time.time(), exit_code, run_id))

    def finish_run(self, run_id: int, exit_code: int, done: int, failed: int) -> None:
        """Close the run's row; if the counts just taken show no task running, say so (see requeue_stale)."""
        totals = self._fresh_totals()
        none_running = totals is not None and totals[0][State.RUNNING.value] == 0
        with self.transaction() as conn:
            conn.execute(
                "UPDATE runs SET finished = ?, updated = ?, exit_code = ?, done = ?, failed = ? WHERE id = ?",
                (time.time(), time.time(), exit_code, done, failed, run_id),
            )
            if none_running:
                self._set_running_flag(conn, False)

    def last_run(self) -> dict[str, Any] | None:
        cursor = self.conn.execute("SELECT * FROM runs ORDER BY id DESC LIMIT 1")
        row = cursor.fetchone()
        if row is None:
            return None
        return dict(zip((d[0] for d in cursor.description), row))

