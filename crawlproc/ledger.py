"""The task ledger: OUT/ledger.db, the single source of truth. The only module with SQL.

    scan ──reconcile──> tasks(pending) ──claim──> running ──report──> done | pending(not_before) | failed
      │                    │  changed/reappeared -> pending        gone <── not seen by a full scan
      └─ paths it could not read ──> scan_problems (until a scan reads them)

One writer (the coordinator) in WAL mode, so `status`, `failures` and the
sqlite3 shell can read while a run goes on. Every write goes through
`transaction()` (BEGIN IMMEDIATE); the coordinator groups a whole loop turn of
completions and claims into one of them.

Paths are keyed on their exact bytes (`path_bytes`, so non-UTF-8 names open
again and sort the same everywhere); `relpath` is the escaped form for people.
"""

from __future__ import annotations

import heapq
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import LedgerError
from crawlproc.identity import KEPT_RESULTS_KEY, Verdict, judge, kept_results, kept_results_entry
from crawlproc.task import relpath_for_people

LEDGER_NAME = "ledger.db"  # in OUT; a folder holding one with our APPLICATION_ID is never input
SCHEMA_VERSION = 2  # 2: the folders table and the running flag, which schema-1 code would not keep up
APPLICATION_ID = 0x43504C31  # "CPL1": tells our ledger from any other SQLite file
BUSY_TIMEOUT_MS = 10_000
SCHEMA_WAIT_SECONDS = 2.0  # a reader waits this long for a new ledger's schema (see _wait_for_schema)
RUNNING_FLAG = "tasks_may_be_running"  # meta key: see Ledger.requeue_stale
BATCH_IDS_KEY = "batch_ids_reserved"  # meta key: see Ledger.next_batch_id
LEDGER_TABLES = frozenset({"meta", "tasks", "runs"})
SKIPPED_KEY = "scan_skipped"  # meta key: what the last full scan skipped on purpose, by kind
SCAN_SETTINGS_KEY = "scan_settings"  # meta key: the last run's --include/--exclude and links (for explain)
# A task as the Python API and `explain` show it (not its key bytes or result range).
TASK_FIELDS = ("id", "relpath", "offset", "length", "size", "mtime_ns", "state", "attempts", "error",
               "traceback", "not_before", "batch_id", "worker_pid", "elapsed_s", "finished_at")
_TASK_COLUMNS = ", ".join(f'"{name}"' for name in TASK_FIELDS)


class State(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    GONE = "gone"


class ClaimedTask(NamedTuple):
    """A claimed task's row as `claim` returns it (as a plain tuple, for speed)."""

    id: int
    path_bytes: bytes
    offset: int
    length: int | None
    size: int
    mtime_ns: int
    attempts: int


# Upsert from a scan: new -> pending; size/mtime changed or reappeared -> pending
# with fresh attempts; unchanged -> not written at all (a no-op rerun stays cheap).
# A task being processed keeps `running`: its worker sees the change and hands it back.
_UPSERT = """
INSERT INTO tasks (relpath, path_bytes, "offset", length, size, mtime_ns, state)
VALUES (?, ?, ?, ?, ?, ?, 'pending')
ON CONFLICT (path_bytes, "offset") DO UPDATE SET
    size = excluded.size, mtime_ns = excluded.mtime_ns, length = excluded.length,
    state = CASE WHEN tasks.state = 'running' THEN 'running' ELSE 'pending' END,
    attempts = 0, error = NULL, traceback = NULL, not_before = 0
WHERE tasks.size != excluded.size OR tasks.mtime_ns != excluded.mtime_ns
   OR tasks.length IS NOT excluded.length OR tasks.state = 'gone'
"""

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


# Tasks per state, then the done tasks' signature (max id, and totals of batch ids, finish
# times and checksums): one pass over the table, no sort.
_STATE_TOTALS = "SELECT " + ", ".join(
    [f"count(*) FILTER (WHERE state = '{s.value}')" for s in State]
    + [f"{agg} FILTER (WHERE state = 'done')" for agg in
       ("max(id)", "total(batch_id)", "total(finished_at)", "total(result_crc)")]
) + " FROM tasks"

# A done task found in a result file's trailer (rebuild.py); for a key already
# adopted from a file with a higher batch id, nothing.
_ADOPT_DONE = """
INSERT INTO tasks (relpath, path_bytes, "offset", length, size, mtime_ns, state, attempts, batch_id,
                   result_offset, result_length, result_crc, worker_pid, elapsed_s, finished_at)
VALUES (?, ?, ?, ?, ?, ?, 'done', 1, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (path_bytes, "offset") DO NOTHING
"""

_INSERT_CLAIMED = """
INSERT INTO tasks (relpath, path_bytes, "offset", length, size, mtime_ns, state)
VALUES (?, ?, ?, ?, ?, ?, 'running')
"""


def _merge_key(row: tuple) -> tuple:
    return (row[1], row[2])


class PageTotals(NamedTuple):
    """What the status page reads from the tasks beyond their counts (Ledger.page_totals)."""

    duration_buckets: tuple[int, ...]  # done tasks whose elapsed_s <= each bound, cumulative
    durations_counted: int  # done tasks with a recorded elapsed_s
    durations_sum: float  # their elapsed_s, summed
    retried_attempts: int  # failed attempts that were (or will be) tried again, over the live tasks
    oldest_pending_mtime_ns: int | None  # the oldest mtime among pending tasks


class ScanDiff(NamedTuple):
    """How the tasks a scan plans for a key range differ from the ledger's live tasks there."""

    changed: list[tuple]  # planned rows of every file that is new or differs (size, mtime, byte ranges), in order
    unseen: set[bytes]  # paths of live tasks the scan neither planned nor held back


def diff_scan(live: list[tuple], rows: list[tuple], held: Iterable[bytes] = ()) -> ScanDiff:
    """Compare a range's live tasks with the rows a scan planned there (both in merge order).

    Pure: what Ledger.reconcile writes and what a dry run reports both come from here.
    """
    existing = {(r[0], r[1]): r[2:] for r in live}
    changed_paths: set[bytes] = set()
    for row in rows:  # this loop runs once per file of a scan: keep it lean
        if existing.pop((row[0], row[1]), None) != row[2:]:
            changed_paths.add(row[0])
    seen = {row[0] for row in rows} | set(held)
    unseen: set[bytes] = set()
    for path, _ in existing:  # tasks the scan did not plan: a re-planned file, or a vanished one
        if path in seen:
            changed_paths.add(path)
        else:
            unseen.add(path)
    return ScanDiff([row for row in rows if row[0] in changed_paths] if changed_paths else [], unseen)


def _gone_to_mark(unseen: set[bytes], keep_prefixes: Iterable[bytes], keep: Callable[[bytes], bool] | None) -> list[bytes]:
    """The unseen paths that become gone: not under an unreadable path, not kept on purpose."""
    prefixes = tuple(keep_prefixes)
    return [p for p in unseen if not p.startswith(prefixes) and not (keep and keep(p))]


class RangePreview(NamedTuple):
    """What a reconcile of one key range would do (a dry run): file paths per change, in order."""

    new: list[bytes]  # no live task yet
    changed: list[bytes]  # size, mtime or byte ranges differ from the live tasks
    gone: list[bytes]  # live tasks that would be marked gone
    retried: list[bytes]  # unchanged files with tasks in a state a run processes again


class Ledger:
    """All reads and writes of OUT/ledger.db."""

    def __init__(self, path: Path, *, durable: bool = False, readonly: bool = False) -> None:
        self.path = Path(path)
        self.conn = _connect(self.path, readonly=readonly)
        self.conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.created = False  # this Ledger made the file: a new OUT
        self._writes = 0  # transactions so far: with PRAGMA data_version, tells when totals are stale
        self._totals: tuple | None = None
        self._counting: tuple[tuple, threading.Thread, list] | None = None  # see count_ahead
        self._flagged_running = False  # this Ledger has recorded that tasks may be running
        self._check_or_create(readonly)

    # -- set-up ------------------------------------------------------------
    def _check_or_create(self, readonly: bool) -> None:
        app_id, has_tables = self._read_header()
        if readonly and app_id == 0 and not has_tables:
            app_id, has_tables = self._wait_for_schema()
        if app_id == APPLICATION_ID:
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 1 and not readonly:
                self._upgrade_from_1()
            elif version not in (1, SCHEMA_VERSION):
                raise LedgerError(f"{self.path} has ledger schema {version}, "
                                  f"this crawlproc reads schemas 1 to {SCHEMA_VERSION}; use a newer crawlproc")
            if not readonly and not self._has_table("scan_problems"):
                with self.transaction() as conn:
                    _create_scan_problems_table(conn)
            return
        if has_tables or readonly:
            raise LedgerError(f"{self.path} is an SQLite file but not a crawlproc ledger; use another --out")
        self._create_schema()
        self.created = True

    def _read_header(self) -> tuple[int, int]:
        """(application_id, number of schema objects)."""
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            has_tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path} is not a crawlproc ledger ({exc}); use another --out") from None
        return app_id, has_tables

    def _wait_for_schema(self) -> tuple[int, int]:
        """A reader that meets an empty ledger may be looking at one a run is just creating (its
        schema comes in one transaction, a few milliseconds after the file): look again for a
        short while before calling it foreign."""
        deadline = time.monotonic() + SCHEMA_WAIT_SECONDS
        header = (0, 0)
        while header == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
            header = self._read_header()
        return header

    def _upgrade_from_1(self) -> None:
        """Schema 1 lacks the folders table. The new version number keeps an older crawlproc out:
        it would change tasks without forgetting fingerprints or raising the running flag."""
        with self.transaction() as conn:
            _create_folders_table(conn)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _create_schema(self) -> None:
        import sqlite_utils  # only needed once per OUT; keeps start-up light

        db = sqlite_utils.Database(self.conn)
        with self.transaction():
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["tasks"].create(
                {
                    "id": int, "relpath": str, "path_bytes": bytes, "offset": int, "length": int,
                    "size": int, "mtime_ns": int, "state": str, "attempts": int, "error": str,
                    "traceback": str, "not_before": float, "batch_id": int, "result_offset": int,
                    "result_length": int, "result_crc": int, "worker_pid": int,
                    "elapsed_s": float, "finished_at": float,
                },
                pk="id",
                not_null={"relpath", "path_bytes", "offset", "size", "mtime_ns", "state", "attempts", "not_before"},
                defaults={"offset": 0, "state": "pending", "attempts": 0, "not_before": 0},
            )
            db["tasks"].create_index(["path_bytes", "offset"], unique=True, index_name="tasks_key")
            # The claim query walks only pending tasks, in merge order.
            self.conn.execute(
                'CREATE INDEX tasks_pending ON tasks (path_bytes, "offset") WHERE state = \'pending\''
            )
            _create_folders_table(self.conn)
            _create_scan_problems_table(self.conn)
            db["runs"].create(
                {"id": int, "command": str, "pid": int, "started": float, "updated": float,
                 "finished": float, "exit_code": int, "done": int, "failed": int, "info": str},
                pk="id",
            )
            self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (name,)).fetchone() is not None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), retried only while the file is locked."""
        _begin_immediate(self.conn)
        self._writes += 1
        try:
            yield self.conn
        except BaseException:
            self._flagged_running = False  # the flag this transaction may have set is undone too
            self.conn.execute("ROLLBACK")
            raise
        finally:
            self._writes += 1  # totals read during the transaction are stale after it
        try:
            self.conn.execute("COMMIT")
        except BaseException:
            self._flagged_running = False
            raise

    def close(self) -> None:
        self._take_count_ahead()
        self.conn.close()

    def close_as_one_file(self) -> None:
        """Close, leaving no -wal or -shm beside the file: it can then be renamed (rebuild.py).

        SQLite keeps WAL mode, silently, while another connection has the file
        open; what is still in the -wal would then not follow the rename.
        """
        self._take_count_ahead()
        try:
            mode = self.conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        finally:
            self.conn.close()
        if mode != "delete":
            raise LedgerError(f"{self.path} is open in another process; close it and run again")

    # -- identity ------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.conn.execute("SELECT key, value FROM meta"))

    def set_meta(self, values: Mapping[str, Any]) -> None:
        with self.transaction() as conn:
            _put_meta(conn, values)

    def check_identity(self, identity: Mapping[str, Any], *, reprocess: bool,
                       keep_results: bool = False) -> bool:
        """Compare the run's identity with OUT's; True when every task must be redone.

        Raises IdentityMismatch naming both sides unless `reprocess` is set (see settle_identity).
        """
        verdict = self.settle_identity(identity, reprocess=reprocess, keep_results=keep_results)
        return verdict is Verdict.REPROCESS

    def judge_identity(self, identity: Mapping[str, Any], *, reprocess: bool,
                       keep_results: bool = False) -> Verdict:
        """The verdict on running with `identity` on this OUT (crawlproc.identity.judge); reads only,
        so a dry run asks it of a read-only ledger. Raises IdentityMismatch as a run would."""
        return judge(self.meta(), _meta_texts(identity), out=self.path.parent, reprocess=reprocess,
                     keep_results=keep_results, count_done=self._count_done)

    def settle_identity(self, identity: Mapping[str, Any], *, reprocess: bool,
                        keep_results: bool = False) -> Verdict:
        """Judge the run's identity against OUT's and store what the verdict says.

        REPROCESS sends every task back to pending; KEPT records the acceptance in meta.
        """
        verdict = self.judge_identity(identity, reprocess=reprocess, keep_results=keep_results)
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

    # -- scanning --------------------------------------------------------------
    def reconcile(
        self,
        rows: list[tuple],
        *,
        lo: bytes | None = None,
        hi: bytes | None = None,
        held: Iterable[bytes] = (),
        keep_prefixes: Iterable[bytes] = (),
        keep: Callable[[bytes], bool] | None = None,
        mark_gone: bool = True,
        chunked: bool = False,
        claim_new_into: list | None = None,
        folders: list[tuple] = (),
        gone_into: list | None = None,
    ) -> tuple[int, int]:
        """Bring the tasks of paths in [lo, hi) in line with what a scan saw there.

        `rows` are the planned tasks (path_bytes, offset, length, size, mtime_ns)
        of every file seen in that range, in (path_bytes, offset) order. New or
        changed files are upserted; unchanged ones are not written at all (a
        no-op rerun stays cheap). With `mark_gone`, files of the range that
        were not seen, not `held` back, not under an unreadable folder
        (`keep_prefixes`) and not ignored on purpose (`keep(path)`) become gone.
        None bounds are open. With `claim_new_into`, tasks of files the ledger
        has never seen are inserted already claimed (`running`) and their
        ClaimedTask rows appended to that list: a first run then writes each
        such row once instead of inserting it pending and claiming it.
        `folders` (prefix, fingerprint, files) are folders wholly inside the
        range, recorded in the same transaction (see known_folders). The paths
        marked gone are appended to `gone_into` when given.
        Returns (tasks written, files gone).
        """
        live = self._live_tasks_between(lo, hi)  # [(path, offset, length, size, mtime_ns)], in order
        if live == rows and not held:  # nothing changed here: one comparison, no Python per file
            if folders:
                with self.transaction() as conn:
                    self._record_folders(conn, folders)
            return 0, 0
        changed, gone = diff_scan(live, rows, held)
        new: list[tuple] = []
        if claim_new_into is not None and changed:
            known = self._paths_between(lo, hi)  # gone ones too: those go through the upsert
            new = [row for row in changed if row[0] not in known]
            if new:
                changed = [row for row in changed if row[0] in known]
        gone_list = _gone_to_mark(gone, keep_prefixes, keep) if mark_gone else []
        if gone_into is not None:
            gone_into.extend(gone_list)
        if changed or gone_list or new or folders:
            with self.transaction() as conn:
                if changed or gone_list or new:
                    self._forget_folders_between(conn, lo, hi)
                self._upsert(conn, changed, chunked=chunked)
                self._mark_paths_gone(conn, gone_list, [], running_too=False)
                if new:
                    claim_new_into.extend(self._insert_claimed(conn, new))
                if gone and folders:
                    folders = self._still_matching(conn, folders, gone, gone_list)
                self._record_folders(conn, folders)
        return len(changed) + len(new), len(gone_list)

    def preview_reconcile(
        self,
        rows: list[tuple],
        *,
        lo: bytes | None = None,
        hi: bytes | None = None,
        keep_prefixes: Iterable[bytes] = (),
        keep: Callable[[bytes], bool] | None = None,
        retry_states: Iterable[str] = (),
    ) -> RangePreview:
        """What reconcile (a full scan's) would do to [lo, hi), without writing anything.

        `retry_states`: the task states a run would process again though the file did not change.
        """
        live = self._live_tasks_between(lo, hi)
        changed, unseen = diff_scan(live, rows) if live != rows else ScanDiff([], set())
        live_paths = {r[0] for r in live}
        touched = list(dict.fromkeys(row[0] for row in changed))  # each file once, in order
        skip = unseen | set(touched)
        states = tuple(retry_states)
        retried = [p for p in self._paths_in_states_between(states, lo, hi) if p not in skip] if states else []
        return RangePreview(
            new=[p for p in touched if p not in live_paths], changed=[p for p in touched if p in live_paths],
            gone=sorted(_gone_to_mark(unseen, keep_prefixes, keep)), retried=retried,
        )

    def _paths_in_states_between(self, states: tuple[str, ...], lo: bytes | None, hi: bytes | None) -> list[bytes]:
        marks = ",".join("?" * len(states))
        sql, args = self._range_sql(f"SELECT DISTINCT path_bytes FROM tasks WHERE state IN ({marks})",
                                    "path_bytes", lo, hi)
        return [r[0] for r in self.conn.execute(sql + " ORDER BY path_bytes", (*states, *args))]

    def _paths_between(self, lo: bytes | None, hi: bytes | None) -> set[bytes]:
        sql, args = self._range_sql("SELECT DISTINCT path_bytes FROM tasks WHERE 1", "path_bytes", lo, hi)
        return {r[0] for r in self.conn.execute(sql, args)}

    def _insert_claimed(self, conn: sqlite3.Connection, rows: list[tuple]) -> list[tuple]:
        """Insert new tasks as `running`; their ClaimedTask rows, in `rows` order.

        SQLite gives each new row the largest rowid so far plus one, so the ids
        of one executemany of plain inserts are consecutive.
        """
        self._note_running(conn)
        conn.executemany(_INSERT_CLAIMED, _with_relpath(rows))
        last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        first = last - len(rows) + 1
        return [(first + i, *r, 0) for i, r in enumerate(rows)]

    @staticmethod
    def _range_sql(sql: str, column: str, lo: bytes | None, hi: bytes | None) -> tuple[str, list[bytes]]:
        """`sql` narrowed to lo <= column < hi (None: open)."""
        args: list[bytes] = []
        if lo is not None:
            sql += f" AND {column} >= ?"
            args.append(lo)
        if hi is not None:
            sql += f" AND {column} < ?"
            args.append(hi)
        return sql, args

    def _live_tasks_between(self, lo: bytes | None, hi: bytes | None) -> list[tuple]:
        """(path_bytes, offset, length, size, mtime_ns) of tasks not gone, lo <= path < hi, in order."""
        sql, args = self._range_sql(
            'SELECT path_bytes, "offset", length, size, mtime_ns FROM tasks WHERE state != \'gone\'',
            "path_bytes", lo, hi)
        return self.conn.execute(sql + ' ORDER BY path_bytes, "offset"', args).fetchall()

    # -- folder fingerprints ------------------------------------------------------
    # A row (prefix, fingerprint, files) of `folders` says: the live tasks of paths
    # under `prefix` are exactly what a scan plans from a folder of files whose
    # listing has that fingerprint (listing.fingerprint). A scan that lists the
    # folder with that fingerprint again may skip it. Every write that changes
    # which tasks live under a folder, or their size or mtime, deletes the
    # fingerprints of that folder and of the folders holding it, in the same
    # transaction; a fingerprint is only recorded with the reconcile that made
    # the folder's tasks match it.
    def known_folders(self, plan: str) -> dict[bytes, tuple[bytes, int]]:
        """{prefix: (fingerprint, files)} recorded under the same scan options (`plan`)."""
        if self.meta().get("folder_plan") != plan:  # other globs or chunk size: other tasks per folder
            with self.transaction() as conn:
                conn.execute("DELETE FROM folders")
                _put_meta(conn, {"folder_plan": plan})
            return {}
        return {prefix: (fingerprint, files)
                for prefix, fingerprint, files in self.conn.execute("SELECT prefix, fingerprint, files FROM folders")}

    @staticmethod
    def _still_matching(conn: sqlite3.Connection, folders: list[tuple], gone: set[bytes],
                        marked: list[bytes]) -> list[tuple]:
        """The folders whose tasks now match their listing: not one holding a vanished file whose
        task stays live (a running one is left to its worker, which may still report it done;
        one under an unreadable or ignored path is kept on purpose)."""
        marked_set = set(marked)
        live = [path for path in gone if path not in marked_set]
        live += [path for path in marked if conn.execute(
            "SELECT 1 FROM tasks WHERE path_bytes = ? AND state = 'running' LIMIT 1", (path,)).fetchone()]
        holding = {prefix for path in live for prefix in _folders_holding(path)}
        return [folder for folder in folders if folder[0] not in holding]

    @staticmethod
    def _record_folders(conn: sqlite3.Connection, folders: list[tuple]) -> None:
        conn.executemany("INSERT OR REPLACE INTO folders (prefix, fingerprint, files) VALUES (?, ?, ?)", folders)

    def _forget_folders_between(self, conn: sqlite3.Connection, lo: bytes | None, hi: bytes | None) -> None:
        """Tasks in [lo, hi) changed: forget the folders that start in it and those holding lo."""
        sql, args = self._range_sql("DELETE FROM folders WHERE 1", "prefix", lo, hi)
        conn.execute(sql, args)
        if lo is not None:
            conn.executemany("DELETE FROM folders WHERE prefix = ?", ((p,) for p in _folders_holding(lo)))

    @staticmethod
    def _forget_folders_of(conn: sqlite3.Connection, paths: Iterable[bytes], subtrees: Iterable[bytes] = ()) -> None:
        """Tasks of `paths` changed, or of every path under the `subtrees` ('x/' prefixes)."""
        holding: set[bytes] = set()
        for path in paths:
            holding.update(_folders_holding(path))
        for prefix in subtrees:
            holding.update(_folders_holding(prefix))
            conn.execute("DELETE FROM folders WHERE substr(prefix, 1, ?) = ?", (len(prefix), prefix))
        conn.executemany("DELETE FROM folders WHERE prefix = ?", ((p,) for p in holding))

    def upsert_scanned(self, conn: sqlite3.Connection, rows: list[tuple], *, chunked: bool = False) -> None:
        """rows: (path_bytes, offset, length, size, mtime_ns); inside a transaction.

        With `chunked`, byte-range tasks past a file's new plan (it shrank, or no
        longer needs chunks) become gone, so a changed file's chunks are planned anew.
        """
        self._forget_folders_of(conn, (r[0] for r in rows))
        self._upsert(conn, rows, chunked=chunked)

    @staticmethod
    def _upsert(conn: sqlite3.Connection, rows: list[tuple], *, chunked: bool) -> None:
        """upsert_scanned, for a reconcile (which forgets the folders of its whole range)."""
        conn.executemany(_UPSERT, _with_relpath(rows))
        if chunked:
            # A whole-file task owns offset 0 only; a chunked file owns offsets below its size.
            plan_ends = {(r[0], 1 if r[2] is None else r[3]) for r in rows}
            conn.executemany(
                'UPDATE tasks SET state = \'gone\' WHERE path_bytes = ? AND "offset" >= ? '
                "AND \"offset\" > 0 AND state != 'gone'",
                plan_ends,
            )

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

    def mark_paths_gone(
        self, conn: sqlite3.Connection, files: list[bytes], folders: list[bytes], *, running_too: bool = True
    ) -> None:
        """Files deleted (or moved away) and every file under deleted folders ('x/' prefixes).

        A running task is left to its worker (which finds the file missing) when
        `running_too` is off; else it is gone now and its worker's report is ignored.
        """
        self._forget_folders_of(conn, files, folders)
        self._mark_paths_gone(conn, files, folders, running_too=running_too)

    @staticmethod
    def _mark_paths_gone(conn: sqlite3.Connection, files: list[bytes], folders: list[bytes], *, running_too: bool) -> None:
        """mark_paths_gone, for a reconcile (which forgets the folders of its whole range)."""
        skip = "('gone', 'running')" if not running_too else "('gone')"
        conn.executemany(f"UPDATE tasks SET state = 'gone' WHERE path_bytes = ? AND state NOT IN {skip}",
                         ((p,) for p in files))
        conn.executemany(
            f"UPDATE tasks SET state = 'gone' WHERE substr(path_bytes, 1, ?) = ? AND state NOT IN {skip}",
            ((len(p), p) for p in folders),
        )

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

    def requeue_damaged(self, ids: list[int], reason: str) -> None:
        with self.transaction() as conn:
            conn.executemany(
                "UPDATE tasks SET state = 'pending', error = ? WHERE id = ? AND state = 'done'",
                ((reason, i) for i in ids),
            )

    # -- reading for people ------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return dict(self._state_totals()[0])

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

    def count_ahead(self) -> None:
        """Start that pass now, in a thread with a connection of its own.

        A rerun that turns out to have nothing to do ends by asking for it (the
        summary, the merge's signature): this way it is ready, counted while the
        scan waits on its listing helpers. Any write in between makes it stale,
        and it is simply not used.
        """
        if self._counting is not None:
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
        ready = self.has_claimable(self.conn, now)
        soonest = self.conn.execute(
            "SELECT min(not_before) FROM tasks WHERE state = 'pending' AND not_before > ?", (now,)
        ).fetchone()[0]
        return ready, soonest

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
        """Every task, or those in `state`, in merge order, as dicts (TASK_FIELDS), streamed."""
        where, args = (" WHERE state = ?", (state,)) if state is not None else ("", ())
        cursor = self.conn.execute(f"SELECT {_TASK_COLUMNS} FROM tasks{where} "
                                   'ORDER BY path_bytes, "offset"', args)
        return (dict(zip(TASK_FIELDS, row)) for row in cursor)

    def tasks_of(self, path_bytes: bytes) -> list[dict[str, Any]]:
        """The tasks of one file (several with --chunk-size), in offset order."""
        rows = self.conn.execute(f'SELECT {_TASK_COLUMNS} FROM tasks WHERE path_bytes = ? ORDER BY "offset"',
                                 (path_bytes,))
        return [dict(zip(TASK_FIELDS, row)) for row in rows]

    def run_at(self, when: float) -> dict[str, Any] | None:
        """The run that was going at `when` (the last one started by then)."""
        cursor = self.conn.execute("SELECT * FROM runs WHERE started <= ? ORDER BY id DESC LIMIT 1", (when,))
        row = cursor.fetchone()
        return None if row is None else dict(zip((d[0] for d in cursor.description), row))

    def record_scan_settings(self, settings: Mapping[str, Any]) -> None:
        """The selection rules of this run's scans (globs, links), for `explain`; written only when
        they changed, so a no-op rerun commits nothing more."""
        text = json.dumps(dict(settings), sort_keys=True)
        if self._meta_value(SCAN_SETTINGS_KEY) != text:
            self.set_meta({SCAN_SETTINGS_KEY: text})

    def scan_settings(self) -> dict[str, Any] | None:
        """What record_scan_settings kept (None: OUT was made by a crawlproc that did not keep it)."""
        text = self._meta_value(SCAN_SETTINGS_KEY)
        return json.loads(text) if text else None

    # -- reading for the status page (serve/) -------------------------------------------
    def page_totals(self, bounds: Sequence[float]) -> PageTotals:
        """What the status page and /metrics add to `counts`, in one pass over the table."""
        buckets = ", ".join("count(*) FILTER (WHERE state = 'done' AND elapsed_s <= ?)" for _ in bounds)
        row = self.conn.execute(
            f"SELECT {buckets}{', ' if bounds else ''}"
            "count(elapsed_s) FILTER (WHERE state = 'done'), total(elapsed_s) FILTER (WHERE state = 'done'), "
            "total(CASE WHEN state IN ('done', 'failed') THEN max(attempts - 1, 0) ELSE attempts END) "
            "FILTER (WHERE state != 'gone'), min(mtime_ns) FILTER (WHERE state = 'pending') FROM tasks",
            tuple(bounds)).fetchone()
        n = len(bounds)
        return PageTotals(tuple(row[:n]), row[n], row[n + 1], int(row[n + 2]), row[n + 3])

    def latest_failures(self, limit: int) -> list[dict[str, Any]]:
        """The most recent failed attempts, newest first: tasks failed for good, and pending
        ones that wait for a retry ("retrying")."""
        rows = self.conn.execute(
            'SELECT relpath, "offset", attempts, error, finished_at, state FROM tasks '
            "WHERE state = 'failed' OR (state = 'pending' AND error IS NOT NULL) "
            "ORDER BY finished_at DESC, id DESC LIMIT ?", (limit,))
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

    # -- scan problems -------------------------------------------------------------
    # A path a scan could not read (a folder it could not list, an entry it could not
    # stat) hides files from the output: it is kept here, shown by `status` and
    # `failures`, and makes a run exit 1, until a scan reads it again.
    def record_scan_problems(self, problems: Iterable[tuple[bytes, str]]) -> None:
        """(path_bytes, error) pairs; a folder's path ends in '/'. `since` is when a path was
        first seen with that error: an unchanged problem is not written again."""
        known = {path: error for path, _, error, _ in self._scan_problem_rows()}
        fresh = [(path, error) for path, error in problems if known.get(path) != error]
        if not fresh:
            return
        now = time.time()
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO scan_problems (path_bytes, relpath, error, since) VALUES (?, ?, ?, ?)",
                [(path, _problem_relpath(path), error, now) for path, error in fresh])

    def clear_scan_problems(self, under: bytes, found: Iterable[bytes]) -> None:
        """A scan of the folder `under` ('' for DATA_DIR, else 'x/') ended: the problems under it
        that it did not meet again are solved."""
        met = set(found)
        solved = [path for path, *_ in self._scan_problem_rows() if path.startswith(under) and path not in met]
        if solved:
            with self.transaction() as conn:
                conn.executemany("DELETE FROM scan_problems WHERE path_bytes = ?", ((p,) for p in solved))

    def record_scan_skipped(self, counts: Mapping[str, int]) -> None:
        """What a full scan skipped on purpose, by kind (for summary.json); written only when it changed."""
        text = json.dumps(dict(counts))  # in the scan's order of kinds, which summary.json keeps
        if self._meta_value(SKIPPED_KEY) != text:
            self.set_meta({SKIPPED_KEY: text})

    def scan_skipped(self) -> dict[str, int]:
        """The last full scan's skipped entries by kind ({} before any)."""
        text = self._meta_value(SKIPPED_KEY)
        return json.loads(text) if text else {}

    def _meta_value(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def scan_problems(self) -> list[dict[str, Any]]:
        """[{relpath, error, since}] in path order."""
        return [{"relpath": relpath, "error": error, "since": since}
                for _, relpath, error, since in self._scan_problem_rows()]

    def _scan_problem_rows(self) -> list[tuple]:
        if not self._has_table("scan_problems"):  # a ledger of an older crawlproc, opened read-only
            return []
        return self.conn.execute(
            "SELECT path_bytes, relpath, error, since FROM scan_problems ORDER BY path_bytes").fetchall()

    def retry(self, *, include_done: bool, relpaths: Iterable[str] = ()) -> int:
        """Put failed (and with include_done, done) tasks back to pending; returns how many."""
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
            return sum(conn.execute(sql + " AND relpath = ?", (*states, p)).rowcount for p in paths)

    def unknown_relpaths(self, relpaths: Iterable[str]) -> list[str]:
        """Those of `relpaths` (as people read them) that no task has, in the order given."""
        return [p for p in relpaths
                if self.conn.execute("SELECT 1 FROM tasks WHERE relpath = ? LIMIT 1", (p,)).fetchone() is None]

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


def _with_relpath(rows: list[tuple]) -> Iterator[tuple]:
    """Scan rows with the escaped relpath people read put in front, as the inserts want them."""
    return ((relpath_for_people(r[0]), *r) for r in rows)


def _put_meta(conn: sqlite3.Connection, values: Mapping[str, Any]) -> None:
    """Set meta keys, inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [(k, _meta_text(v)) for k, v in values.items()],
    )


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


def diagnose(path: Path, *, thorough: bool) -> str | None:
    """Why the file at `path` cannot serve as a ledger, said as "is ..." completes it, or None.

    The usual checks read the header and the schema; `thorough` adds PRAGMA
    quick_check, a pass over every page (damage in the middle of the file).
    The file is opened read-only: what is found is left as it was.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size == 0 and not path.with_name(path.name + "-wal").exists():
        return "empty"
    conn = _connect(path, readonly=True)
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id == 0 and not tables:
            return "empty"
        if app_id != APPLICATION_ID or not LEDGER_TABLES <= tables:
            return "not a crawlproc ledger"
        if thorough:
            verdict = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if verdict != "ok":
                return f"damaged (quick_check: {' '.join(verdict.split())})"  # one line
    except sqlite3.DatabaseError as exc:
        return "not an SQLite file" if "not a database" in str(exc) else f"damaged ({exc})"
    finally:
        conn.close()
    return None


def _folders_holding(path: bytes) -> list[bytes]:
    """The prefixes of the folders a relpath is in, DATA_DIR's ('') first: b"a/b/c" -> '', 'a/', 'a/b/'."""
    prefixes = [b""]
    cut = path.find(b"/")
    while cut >= 0:
        prefixes.append(path[:cut + 1])
        cut = path.find(b"/", cut + 1)
    return prefixes


_FAILURE_KEYS = ("relpath", "offset", "attempts", "error", "traceback")


def _problem_relpath(path: bytes) -> str:
    """A scan problem's path for people: DATA_DIR itself is './'."""
    return relpath_for_people(path) if path else "./"


def _create_scan_problems_table(conn: sqlite3.Connection) -> None:
    """Paths a scan could not read (see Ledger.record_scan_problems). Made when missing by any
    writer, so no schema version is needed: an older crawlproc just does not look at it."""
    conn.execute("CREATE TABLE IF NOT EXISTS scan_problems (path_bytes BLOB PRIMARY KEY, relpath TEXT NOT NULL, "
                 "error TEXT NOT NULL, since REAL NOT NULL) WITHOUT ROWID")


def _create_folders_table(conn: sqlite3.Connection) -> None:
    """Folder fingerprints (see Ledger.known_folders): a cache that makes a no-op rescan cheap."""
    conn.execute("CREATE TABLE IF NOT EXISTS folders "
                 "(prefix BLOB PRIMARY KEY, fingerprint BLOB NOT NULL, files INTEGER NOT NULL) WITHOUT ROWID")


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    if readonly:
        if not path.exists():
            raise LedgerError(f"no ledger at {path}: has crawlproc run with this --out?")
        uri = f"file:{path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    else:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError(f"{path} is not a crawlproc ledger ({exc}); use another --out") from None
    return conn


def _begin_immediate(conn: sqlite3.Connection) -> None:
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise
        _retry_begin(conn)


def _retry_begin(conn: sqlite3.Connection) -> None:
    """Bounded retries with backoff for a lock held past busy_timeout (a long reader checkpoint)."""
    import tenacity

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_message(match=r".*(locked|busy).*"),
        wait=tenacity.wait_exponential(multiplier=0.05, max=2) + tenacity.wait_random(0, 0.05),
        stop=tenacity.stop_after_attempt(8),
        reraise=True,
    )
    retrying(conn.execute, "BEGIN IMMEDIATE")


def _meta_texts(identity: Mapping[str, Any]) -> dict[str, str]:
    return {k: _meta_text(v) for k, v in identity.items()}


def _meta_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
