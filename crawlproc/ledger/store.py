"""The ledger's file: its connection, schema and upgrade, one write transaction at a time, the meta table.

Everything else in the package works through `Store.conn` and `Store.transaction()`
(see crawlproc/ledger/__init__.py for the data flow).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import LedgerError

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
RUN_OPTIONS_KEY = "run_options"  # meta key: the last run's options a carry-on command repeats (report.run_command)



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



class Store:
    """OUT/ledger.db opened: the connection, its schema and its transactions."""

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
        with self.transaction():
            for statement in _SCHEMA:
                self.conn.execute(statement)
            _create_folders_table(self.conn)
            _create_scan_problems_table(self.conn)
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
        """Meta holds no task, so a pass over the tasks taken before this write still holds
        after it, unless another connection wrote meanwhile. (The end of a run writes the
        merge's signature between the merge and summary.json: ~30 ms per 100,000 tasks.)"""
        fresh = self._fresh_totals()
        others_before = self._totals_version()[1]
        with self.transaction() as conn:
            _put_meta(conn, values)
        version = self._totals_version()
        if fresh is not None and version[1] == others_before:
            self._totals = (version, *fresh)

    def _meta_value(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None



def _put_meta(conn: sqlite3.Connection, values: Mapping[str, Any]) -> None:
    """Set meta keys, inside the caller's transaction."""
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [(k, _meta_text(v)) for k, v in values.items()],
    )


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


# The ledger's main tables, as plain SQL: a newcomer reads the schema here in one look.
_SCHEMA = (
    'CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)',
    # One row per task: a file, or one --chunk-size byte range of it (offset, length).
    # relpath is for people (undecodable bytes escaped); path_bytes is the real name.
    # A done task's records are result_length bytes at result_offset of results/<batch_id>.
    """CREATE TABLE "tasks" (
        "id" INTEGER PRIMARY KEY,
        "relpath" TEXT NOT NULL,
        "path_bytes" BLOB NOT NULL,
        "offset" INTEGER NOT NULL DEFAULT 0,
        "length" INTEGER,
        "size" INTEGER NOT NULL,
        "mtime_ns" INTEGER NOT NULL,
        "state" TEXT NOT NULL DEFAULT 'pending',
        "attempts" INTEGER NOT NULL DEFAULT 0,
        "error" TEXT,
        "traceback" TEXT,
        "not_before" REAL NOT NULL DEFAULT 0,
        "batch_id" INTEGER,
        "result_offset" INTEGER,
        "result_length" INTEGER,
        "result_crc" INTEGER,
        "worker_pid" INTEGER,
        "elapsed_s" REAL,
        "finished_at" REAL)""",
    'CREATE UNIQUE INDEX "tasks_key" ON "tasks" ("path_bytes", "offset")',
    # The claim query walks only pending tasks, in merge order.
    """CREATE INDEX tasks_pending ON tasks (path_bytes, "offset") WHERE state = 'pending'""",
    """CREATE TABLE "runs" ("id" INTEGER PRIMARY KEY, "command" TEXT, "pid" INTEGER, "started" REAL,
        "updated" REAL, "finished" REAL, "exit_code" INTEGER, "done" INTEGER, "failed" INTEGER, "info" TEXT)""",
)


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
