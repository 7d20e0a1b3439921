"""What scans write: a key range reconciled with what the walk saw, folder fingerprints, scan problems.

    walk slice (rows in merge order) ──diff_scan──> new/changed upserted (or inserted claimed),
                                                    unseen -> gone, folders recorded or forgotten
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.ledger.store import SCAN_SETTINGS_KEY, SKIPPED_KEY, _put_meta
from crawlproc.task import relpath_for_people

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

_INSERT_CLAIMED = """
INSERT INTO tasks (relpath, path_bytes, "offset", length, size, mtime_ns, state)
VALUES (?, ?, ?, ?, ?, ?, 'running')
"""



class ScanDiff(NamedTuple):
    """How the tasks a scan plans for a key range differ from the ledger's live tasks there."""

    changed: list[tuple]  # planned rows of every file that is new or differs (size, mtime, byte ranges), in order
    unseen: set[bytes]  # paths of live tasks the scan neither planned nor held back



class RangePreview(NamedTuple):
    """What a reconcile of one key range would do (a dry run): file paths per change, in order."""

    new: list[bytes]  # no live task yet
    changed: list[bytes]  # size, mtime or byte ranges differ from the live tasks
    gone: list[bytes]  # live tasks that would be marked gone
    retried: list[bytes]  # unchanged files with tasks in a state a run processes again



class Scans:
    """The scan's writes (a mixin of Ledger: uses its `conn` and `transaction`)."""

    conn: sqlite3.Connection
    path: Path

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
            if not known:  # a first run: every file is new
                new, changed = changed, []
            else:
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

    def scan_problems(self) -> list[dict[str, Any]]:
        """[{relpath, error, since}] in path order."""
        return [{"relpath": relpath, "error": error, "since": since}
                for _, relpath, error, since in self._scan_problem_rows()]

    def _scan_problem_rows(self) -> list[tuple]:
        if not self._has_table("scan_problems"):  # a ledger of an older crawlproc, opened read-only
            return []
        return self.conn.execute(
            "SELECT path_bytes, relpath, error, since FROM scan_problems ORDER BY path_bytes").fetchall()



def diff_scan(live: list[tuple], rows: list[tuple], held: Iterable[bytes] = ()) -> ScanDiff:
    """Compare a range's live tasks with the rows a scan planned there (both in merge order).

    Pure: what Ledger.reconcile writes and what a dry run reports both come from here.
    """
    if not live:  # nothing recorded in the range (a first run): every row planned is to write
        return ScanDiff(list(rows), set())
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


def _with_relpath(rows: list[tuple]) -> Iterator[tuple]:
    """Scan rows with the escaped relpath people read put in front, as the inserts want them."""
    return ((relpath_for_people(r[0]), *r) for r in rows)


def _folders_holding(path: bytes) -> list[bytes]:
    """The prefixes of the folders a relpath is in, DATA_DIR's ('') first: b"a/b/c" -> '', 'a/', 'a/b/'."""
    prefixes = [b""]
    cut = path.find(b"/")
    while cut >= 0:
        prefixes.append(path[:cut + 1])
        cut = path.find(b"/", cut + 1)
    return prefixes


def _problem_relpath(path: bytes) -> str:
    """A scan problem's path for people: DATA_DIR itself is './'."""
    return relpath_for_people(path) if path else "./"
