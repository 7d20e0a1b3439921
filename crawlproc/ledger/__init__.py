"""The task ledger: OUT/ledger.db, the single source of truth. The only package with SQL.

    scan ──reconcile──> tasks(pending) ──claim──> running ──report──> done | pending(not_before) | failed
      │                    │  changed/reappeared -> pending        gone <── not seen by a full scan
      └─ paths it could not read ──> scan_problems (until a scan reads them)

One writer (the coordinator) in WAL mode, so `status`, `failures` and the
sqlite3 shell can read while a run goes on. Every write goes through
`transaction()` (BEGIN IMMEDIATE); the coordinator groups a whole loop turn of
completions and claims into one of them.

Paths are keyed on their exact bytes (`path_bytes`, so non-UTF-8 names open
again and sort the same everywhere); `relpath` is the escaped form for people.

`Ledger` is one object made of one class per concern, each in its own module:
    store.py    the file: connection, schema and upgrade, transactions, meta
    scans.py    a scan's writes: reconcile a key range, folder fingerprints, scan problems
    work.py     recovery, batch ids, claims, a batch's outcomes
    reading.py  counts and the done signature, failures, merge order, what people read
    jobs.py     the run's identity (identity.py decides), the `runs` rows
"""

from __future__ import annotations

from crawlproc.ledger.jobs import Jobs
from crawlproc.ledger.reading import TASK_FIELDS, PageCounts, PageTotals, Reading
from crawlproc.ledger.scans import RangePreview, ScanDiff, Scans, diff_scan
from crawlproc.ledger.store import (
    APPLICATION_ID,
    LEDGER_NAME,
    RUNNING_FLAG,
    RUN_OPTIONS_KEY,
    SCAN_SETTINGS_KEY,
    SCHEMA_VERSION,
    ClaimedTask,
    State,
    Store,
    diagnose,
)
from crawlproc.ledger.work import Work

__all__ = ["APPLICATION_ID", "LEDGER_NAME", "RUNNING_FLAG", "RUN_OPTIONS_KEY", "SCAN_SETTINGS_KEY", "SCHEMA_VERSION", "TASK_FIELDS",
           "ClaimedTask", "Ledger", "PageCounts", "PageTotals", "RangePreview", "ScanDiff", "State", "diagnose", "diff_scan"]


class Ledger(Scans, Work, Reading, Jobs, Store):
    """All reads and writes of OUT/ledger.db."""
