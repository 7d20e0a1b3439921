"""The task ledger on a real SQLite file: schema, scan upserts, claims, reports, identity."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from crawlproc.errors import IdentityMismatch, LedgerError
from crawlproc.ledger import RUNNING_FLAG, SCHEMA_VERSION, Ledger, diff_scan

SPEC_COLUMNS = {"id", "relpath", "offset", "length", "size", "mtime_ns", "state", "attempts", "error"}
FAR_FUTURE = 1e12


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
def ledger(db_path: Path):
    led = Ledger(db_path)
    yield led
    led.close()


def row(name: str, size: int = 10, mtime_ns: int = 1_000, offset: int = 0, length: int | None = None) -> tuple:
    return (name.encode(), offset, length, size, mtime_ns)


def scan(led: Ledger, rows: list[tuple]) -> int:
    """One complete scan that saw exactly `rows`; returns how many tasks became gone."""
    return led.reconcile(rows)[1]


def states(led: Ledger) -> dict[str, str]:
    return dict(led.conn.execute("SELECT relpath, state FROM tasks"))


def task(led: Ledger, relpath: str) -> dict:
    cursor = led.conn.execute("SELECT * FROM tasks WHERE relpath = ?", (relpath,))
    values = cursor.fetchone()
    assert values is not None, relpath
    return dict(zip((d[0] for d in cursor.description), values))


def task_id(led: Ledger, relpath: str) -> int:
    return task(led, relpath)["id"]


def claim(led: Ledger, limit: int = 100, max_bytes: int = 1 << 30, now: float | None = None) -> list[tuple]:
    with led.transaction() as conn:
        return led.claim(conn, limit, max_bytes, time.time() if now is None else now)


def claimed_names(rows: list[tuple]) -> list[bytes]:
    return [r[1] for r in rows]


def finish(led: Ledger, rows: list[tuple], batch_id: int = 1) -> None:
    with led.transaction() as conn:
        led.mark_done(conn, [(batch_id, 0, 0, 0, 123, 0.01, time.time(), r[0]) for r in rows])


def make_done(led: Ledger, names: list[str]) -> None:
    """Claim everything pending, mark `names` done and hand the rest back."""
    rows = claim(led)
    finish(led, [r for r in rows if r[1].decode() in names])
    with led.transaction() as conn:
        led.hand_back(conn, [r[0] for r in rows if r[1].decode() not in names])


IDENTITY = {"data_dir": "/data", "processor": "linecount", "processor_version": "1", "params": {}}


# -- schema and opening ---------------------------------------------------------------

def test_schema_has_spec_columns_and_wal_mode(ledger, db_path):
    with sqlite3.connect(db_path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert SPEC_COLUMNS <= columns
    assert mode == "wal"


def test_reopening_an_existing_ledger_keeps_its_tasks(db_path):
    led = Ledger(db_path)
    scan(led, [row("a")])
    led.close()
    again = Ledger(db_path)
    try:
        assert states(again) == {"a": "pending"}
    finally:
        again.close()


def test_foreign_sqlite_file_is_refused(db_path):
    with sqlite3.connect(db_path) as conn:
        conn.execute("CREATE TABLE invoices (n INTEGER)")
        conn.execute("INSERT INTO invoices VALUES (1)")
    with pytest.raises(LedgerError, match="not a crawlproc ledger"):
        Ledger(db_path)
    with sqlite3.connect(db_path) as conn:  # and it was left alone
        assert conn.execute("SELECT n FROM invoices").fetchall() == [(1,)]
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tasks'").fetchone()[0] == 0


def test_non_sqlite_file_is_refused(db_path):
    content = b"this is a text file, not a database\n" * 200
    db_path.write_bytes(content)
    with pytest.raises(LedgerError):
        Ledger(db_path)
    assert db_path.read_bytes() == content


def test_readonly_open_of_missing_ledger_is_a_ledger_error(tmp_path):
    with pytest.raises(LedgerError, match="no ledger"):
        Ledger(tmp_path / "nothing.db", readonly=True)


# -- scanning ------------------------------------------------------------------------

def test_new_files_become_pending(ledger):
    assert scan(ledger, [row("a"), row("b")]) == 0
    assert states(ledger) == {"a": "pending", "b": "pending"}
    assert ledger.counts() == {"pending": 2, "running": 0, "done": 0, "failed": 0, "gone": 0}
    a = task(ledger, "a")
    assert (a["offset"], a["length"], a["size"], a["mtime_ns"], a["attempts"]) == (0, None, 10, 1_000, 0)


def test_unchanged_done_task_stays_done_and_untouched(ledger):
    scan(ledger, [row("a"), row("b")])
    make_done(ledger, ["a"])
    before = task(ledger, "a")
    ledger.conn.execute("CREATE TEMP TABLE updates (id INTEGER)")
    ledger.conn.execute("CREATE TEMP TRIGGER log_updates AFTER UPDATE ON main.tasks "
                        "BEGIN INSERT INTO updates VALUES (new.id); END")
    assert scan(ledger, [row("a"), row("b")]) == 0
    assert task(ledger, "a") == before
    assert before["state"] == "done" and before["attempts"] == 1 and before["batch_id"] == 1
    # An unchanged rerun does not write the rows at all.
    assert ledger.conn.execute("SELECT count(*) FROM updates").fetchone()[0] == 0


@pytest.mark.parametrize("change", [{"size": 11}, {"mtime_ns": 2_000}])
def test_changed_size_or_mtime_goes_back_to_pending_with_fresh_attempts(ledger, change):
    scan(ledger, [row("a"), row("b")])
    make_done(ledger, ["a"])
    rows = claim(ledger)  # b
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "boom", "Traceback...", 1, None)
    assert states(ledger) == {"a": "done", "b": "failed"}
    scan(ledger, [row("a", **change), row("b", **change)])
    for name in ("a", "b"):
        t = task(ledger, name)
        assert t["state"] == "pending", name
        assert t["attempts"] == 0 and t["error"] is None
        assert (t["size"], t["mtime_ns"]) == (change.get("size", 10), change.get("mtime_ns", 1_000))


def test_unchanged_failed_task_stays_failed(ledger):
    scan(ledger, [row("a")])
    rows = claim(ledger)
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "boom", "tb", 1, None)
    scan(ledger, [row("a")])
    assert task(ledger, "a")["state"] == "failed"
    assert task(ledger, "a")["error"] == "boom"


def test_not_seen_in_full_scan_becomes_gone_and_reappearing_is_pending(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a", "b"])
    assert scan(ledger, [row("b")]) == 2
    assert states(ledger) == {"a": "gone", "b": "done", "c": "gone"}
    assert ledger.counts()["gone"] == 2
    # Same size and mtime as before it vanished: still processed again.
    assert scan(ledger, [row("a"), row("b")]) == 0  # c was gone already: not counted again
    assert states(ledger) == {"a": "pending", "b": "done", "c": "gone"}
    assert task(ledger, "a")["attempts"] == 0


def test_running_task_is_not_marked_gone(ledger):
    scan(ledger, [row("a"), row("b")])
    claim(ledger, limit=1)
    scan(ledger, [row("b")])
    assert states(ledger) == {"a": "running", "b": "pending"}


def test_keep_subtree_protects_an_unreadable_folder(ledger):
    scan(ledger, [row("locked/x"), row("locked/y"), row("other")])
    assert ledger.reconcile([], keep_prefixes=[b"locked/"]) == (0, 1)
    assert states(ledger) == {"locked/x": "pending", "locked/y": "pending", "other": "gone"}


# -- claiming ------------------------------------------------------------------------

def test_claim_returns_tasks_in_path_bytes_offset_order_and_marks_them_running(ledger):
    names = ["b/z", "a", "b.txt", "b/a", "A", "\u00e9", "a0"]
    rows = [row(n) for n in names]
    rows += [row("big", offset=20, length=10, size=40), row("big", offset=0, length=20, size=40),
             row("big", offset=30, length=10, size=40)]
    scan(ledger, rows)
    got = claim(ledger)
    keys = [(r[1], r[2]) for r in got]
    expected = sorted({(n.encode(), 0) for n in names} | {(b"big", 0), (b"big", 20), (b"big", 30)})
    assert keys == expected
    assert ledger.counts()["running"] == len(expected)
    assert ledger.counts()["pending"] == 0
    first = got[0]
    assert first[3:7] == (None, 10, 1_000, 0)  # length, size, mtime_ns, attempts


def test_claim_respects_limit_and_continues_where_it_stopped(ledger):
    scan(ledger, [row(f"f{i:02d}") for i in range(10)])
    first = claim(ledger, limit=3)
    second = claim(ledger, limit=3)
    assert claimed_names(first) == [b"f00", b"f01", b"f02"]
    assert claimed_names(second) == [b"f03", b"f04", b"f05"]
    assert ledger.counts() == {"pending": 4, "running": 6, "done": 0, "failed": 0, "gone": 0}


def test_claim_respects_byte_cap_but_first_task_always_comes(ledger):
    scan(ledger, [row("a", size=1000), row("b", size=1), row("c", size=1)])
    assert claimed_names(claim(ledger, max_bytes=50)) == [b"a"]  # bigger than the cap: alone
    assert claimed_names(claim(ledger, max_bytes=50)) == [b"b", b"c"]


def test_claim_byte_cap_stops_near_the_cap(ledger):
    scan(ledger, [row(f"f{i}", size=10) for i in range(10)])
    got = claim(ledger, max_bytes=35)
    sizes = [r[4] for r in got]
    # Every task starts below the cap, and the batch does not keep growing past it.
    assert 3 <= len(got) <= 4
    assert sum(sizes[:-1]) < 35
    assert claimed_names(got) == [f"f{i}".encode() for i in range(len(got))]


def test_claim_uses_range_length_not_file_size_for_the_cap(ledger):
    scan(ledger, [row("big", offset=o, length=10, size=1000) for o in range(0, 50, 10)])
    assert len(claim(ledger, max_bytes=35)) >= 3


def test_claim_skips_tasks_whose_not_before_is_in_the_future(ledger):
    scan(ledger, [row("a"), row("b")])
    now = time.time()
    rows = claim(ledger, limit=1, now=now)
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "boom", "tb", 1, now + 100)
    assert task(ledger, "a")["state"] == "pending"
    assert claimed_names(claim(ledger, now=now)) == [b"b"]
    assert claim(ledger, now=now) == []
    with ledger.transaction() as conn:
        assert not ledger.has_claimable(conn, now)
        assert ledger.has_claimable(conn, now + 101)
    assert ledger.pending_outlook(now) == (False, pytest.approx(now + 100))
    assert ledger.pending_outlook(now + 101) == (True, None)
    again = claim(ledger, now=now + 101)
    assert claimed_names(again) == [b"a"]
    assert again[0][6] == 1  # attempts so far


def test_claim_on_empty_ledger_returns_nothing(ledger):
    assert claim(ledger) == []


# -- reporting -----------------------------------------------------------------------

def test_mark_done_records_result_location(ledger):
    scan(ledger, [row("a"), row("b")])
    rows = claim(ledger)
    with ledger.transaction() as conn:
        ledger.mark_done(conn, [(7, 0, 15, 999, 4242, 0.5, 1234.0, rows[0][0]),
                                (7, 15, 20, 888, 4242, 0.25, 1234.0, rows[1][0])])
    a, b = task(ledger, "a"), task(ledger, "b")
    assert (a["state"], a["attempts"], a["batch_id"], a["result_offset"], a["result_length"], a["result_crc"]) == \
        ("done", 1, 7, 0, 15, 999)
    assert (b["state"], b["result_offset"], b["result_length"], b["result_crc"]) == ("done", 15, 20, 888)
    assert ledger.next_batch_id() == 8
    assert [r[0] for r in ledger.done_in_merge_order()] == [a["id"], b["id"]]


def test_mark_done_ignores_a_task_that_is_not_running(ledger):
    scan(ledger, [row("a")])
    rows = claim(ledger)
    with ledger.transaction() as conn:
        ledger.hand_back(conn, [rows[0][0]])
    finish(ledger, rows)
    assert task(ledger, "a")["state"] == "pending"


def test_failed_attempts_retry_then_fail_for_good(ledger):
    scan(ledger, [row("a")])
    now = time.time()
    rows = claim(ledger, now=now)
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "ValueError('x')", "Traceback (most recent call last)...",
                                   11, now + 1)
    a = task(ledger, "a")
    assert (a["state"], a["attempts"], a["error"], a["not_before"]) == ("pending", 1, "ValueError('x')",
                                                                         pytest.approx(now + 1))
    rows = claim(ledger, now=now + 2)
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "ValueError('y')", "Traceback y", 12, None)
    a = task(ledger, "a")
    assert (a["state"], a["attempts"], a["error"], a["traceback"], a["worker_pid"]) == \
        ("failed", 2, "ValueError('y')", "Traceback y", 12)
    assert claim(ledger, now=now + 1000) == []


def test_hand_back_is_unpenalised(ledger):
    scan(ledger, [row("a"), row("b")])
    rows = claim(ledger)
    with ledger.transaction() as conn:
        ledger.hand_back(conn, [r[0] for r in rows])
    assert states(ledger) == {"a": "pending", "b": "pending"}
    assert task(ledger, "a")["attempts"] == 0
    assert claimed_names(claim(ledger)) == [b"a", b"b"]


def test_requeue_stale_puts_running_tasks_back_only(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a"])
    claim(ledger, limit=1)  # b running
    assert ledger.requeue_stale() == 1
    assert states(ledger) == {"a": "done", "b": "pending", "c": "pending"}
    assert task(ledger, "b")["attempts"] == 0
    assert ledger.requeue_stale() == 0


def test_counts_and_done_signature_follow_every_write(ledger):
    scan(ledger, [row("a"), row("b")])
    assert ledger.counts()["pending"] == 2
    before = ledger.done_signature()
    assert before[0] == 0
    make_done(ledger, ["a"])
    assert ledger.counts()["done"] == 1 and ledger.counts()["pending"] == 1
    assert ledger.done_signature() != before and ledger.done_signature()[0] == 1


def test_requeue_damaged_puts_done_tasks_back(ledger):
    scan(ledger, [row("a"), row("b")])
    make_done(ledger, ["a", "b"])
    ledger.requeue_damaged([task_id(ledger, "b")], "damaged")
    assert states(ledger) == {"a": "done", "b": "pending"}
    assert task(ledger, "b")["error"] == "damaged"


# -- identity ------------------------------------------------------------------------

def test_check_identity_first_call_stores_then_same_passes(ledger, db_path):
    assert ledger.check_identity(IDENTITY, reprocess=False) is False
    assert ledger.meta()["processor"] == "linecount"
    assert ledger.meta()["processor_version"] == "1"
    assert ledger.check_identity(IDENTITY, reprocess=False) is False
    ledger.close()
    again = Ledger(db_path)
    try:
        assert again.check_identity(dict(IDENTITY), reprocess=False) is False
    finally:
        again.close()


@pytest.mark.parametrize("key,new", [("processor", "sha256"), ("processor_version", "2"),
                                     ("params", {"group_by": "x"})])
def test_check_identity_mismatch_names_both_values(ledger, key, new):
    ledger.check_identity(IDENTITY, reprocess=False)
    scan(ledger, [row("a")])
    make_done(ledger, ["a"])
    with pytest.raises(IdentityMismatch) as info:
        ledger.check_identity({**IDENTITY, key: new}, reprocess=False)
    message = str(info.value)
    old_text = IDENTITY[key] if isinstance(IDENTITY[key], str) else "{}"
    new_text = new if isinstance(new, str) else "group_by"
    assert old_text in message and new_text in message
    assert "--reprocess" in message
    assert states(ledger) == {"a": "done"}  # refused: nothing changed
    assert ledger.meta()[key] == (old_text if isinstance(IDENTITY[key], str) else "{}")


def test_check_identity_reprocess_resets_tasks_and_stores_new_identity(ledger):
    ledger.check_identity(IDENTITY, reprocess=False)
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a"])
    rows = claim(ledger, limit=1)  # b
    with ledger.transaction() as conn:
        ledger.mark_failed_attempt(conn, rows[0][0], "boom", "tb", 1, None)
    scan(ledger, [row("a"), row("b")])  # c gone
    assert ledger.check_identity({**IDENTITY, "processor": "sha256"}, reprocess=True) is True
    assert states(ledger) == {"a": "pending", "b": "pending", "c": "gone"}
    assert task(ledger, "b")["attempts"] == 0 and task(ledger, "b")["error"] is None
    assert ledger.meta()["processor"] == "sha256"
    assert ledger.check_identity({**IDENTITY, "processor": "sha256"}, reprocess=False) is False


# -- retry, counts, failures -------------------------------------------------------------

def _fail(ledger: Ledger, names: list[str]) -> None:
    for r in claim(ledger):
        with ledger.transaction() as conn:
            if r[1].decode() in names:
                ledger.mark_failed_attempt(conn, r[0], f"error in {r[1].decode()}", "tb", 1, None)
            else:
                ledger.hand_back(conn, [r[0]])


def test_retry_failed_only(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a"])
    _fail(ledger, ["b", "c"])
    assert ledger.retry(include_done=False) == 2
    assert states(ledger) == {"a": "done", "b": "pending", "c": "pending"}
    assert task(ledger, "b")["attempts"] == 0 and task(ledger, "b")["error"] is None


def test_retry_include_done(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a"])
    _fail(ledger, ["b"])
    scan(ledger, [row("a"), row("b")])  # c gone: stays gone
    assert ledger.retry(include_done=True) == 2
    assert states(ledger) == {"a": "pending", "b": "pending", "c": "gone"}


def test_retry_named_relpaths(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    make_done(ledger, ["a"])
    _fail(ledger, ["b", "c"])
    assert ledger.retry(include_done=False, relpaths=["b", "a", "nope"]) == 1
    assert states(ledger) == {"a": "done", "b": "pending", "c": "failed"}
    assert ledger.retry(include_done=True, relpaths=["a"]) == 1
    assert states(ledger) == {"a": "pending", "b": "pending", "c": "failed"}


def test_counts_has_every_state(ledger):
    assert ledger.counts() == {"pending": 0, "running": 0, "done": 0, "failed": 0, "gone": 0}
    scan(ledger, [row(n) for n in "abcde"])
    make_done(ledger, ["a", "b"])
    _fail(ledger, ["c"])
    claim(ledger, limit=1)  # d running
    scan(ledger, [row(n) for n in "abcd"])  # e gone
    assert ledger.counts() == {"pending": 0, "running": 1, "done": 2, "failed": 1, "gone": 1}


def test_failures_ordered_by_relpath_with_error_and_traceback(ledger):
    names = ["z.txt", "a/b.txt", "m.txt", "ok.txt"]
    scan(ledger, [row(n) for n in names])
    _fail(ledger, ["z.txt", "a/b.txt", "m.txt"])
    failures = ledger.failures()
    assert [f["relpath"] for f in failures] == ["a/b.txt", "m.txt", "z.txt"]
    assert failures[0] == {"relpath": "a/b.txt", "offset": 0, "attempts": 1,
                           "error": "error in a/b.txt", "traceback": "tb", "kind": "task"}


# -- concurrent readers ------------------------------------------------------------------

def test_reader_can_read_while_a_write_transaction_is_open(ledger, db_path):
    scan(ledger, [row("a"), row("b")])
    reader = Ledger(db_path, readonly=True)
    plain = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=0.5)
    try:
        with ledger.transaction() as conn:
            ledger.upsert_scanned(conn, [row("c")])
            conn.execute("UPDATE tasks SET state = 'running' WHERE relpath = 'a'")
            started = time.monotonic()
            # Readers see the last committed state, at once, without waiting for the writer.
            assert reader.counts()["pending"] == 2
            assert plain.execute("SELECT count(*) FROM tasks").fetchone()[0] == 2
            assert reader.failures() == []
            assert time.monotonic() - started < 0.4
        assert reader.counts()["pending"] == 2 and reader.counts()["running"] == 1
        assert plain.execute("SELECT count(*) FROM tasks").fetchone()[0] == 3
    finally:
        plain.close()
        reader.close()


def test_readonly_ledger_cannot_write(ledger, db_path):
    scan(ledger, [row("a")])
    reader = Ledger(db_path, readonly=True)
    try:
        with pytest.raises(sqlite3.OperationalError):
            reader.retry(include_done=True)
    finally:
        reader.close()
    assert states(ledger) == {"a": "pending"}


def test_claim_new_inserts_unseen_files_claimed_with_their_real_ids(ledger):
    scan(ledger, [row("old"), row("gone-then-back")])
    scan(ledger, [row("old")])  # 'gone-then-back' is gone now
    claimed: list[tuple] = []
    written, gone = ledger.reconcile(
        [row("a"), row("b", size=7), row("gone-then-back"), row("old"), row("z")], claim_new_into=claimed)
    assert (written, gone) == (4, 0)
    # Files never seen come back claimed, ids and all; a gone file reappearing goes through the
    # ordinary upsert (pending), and an unchanged one is not touched.
    assert [(c[1], c[4], c[6]) for c in claimed] == [(b"a", 10, 0), (b"b", 7, 0), (b"z", 10, 0)]
    for claimed_row in claimed:
        assert task(ledger, claimed_row[1].decode())["id"] == claimed_row[0]
    assert states(ledger) == {"old": "pending", "gone-then-back": "pending", "a": "running",
                              "b": "running", "z": "running"}
    assert claimed_names(claim(ledger)) == [b"gone-then-back", b"old"]


def test_the_running_flag_follows_the_tasks_made_running(ledger):
    """Finding running tasks costs a pass over the table: the flag says when none can be."""
    scan(ledger, [row("a"), row("b")])
    assert ledger.requeue_stale() == 0  # no flag yet (a new or older ledger): it looked, and says so
    assert ledger.meta()[RUNNING_FLAG] == "0"
    claimed = claim(ledger)
    assert claimed and ledger.meta()[RUNNING_FLAG] == "1"  # written with the claim itself
    fresh = Ledger(ledger.path)  # a coordinator that starts after this one died
    try:
        assert fresh.requeue_stale() == 2 and fresh.meta()[RUNNING_FLAG] == "0"
        assert fresh.requeue_stale() == 0
    finally:
        fresh.close()


def test_a_run_that_ends_with_nothing_running_clears_the_flag(ledger):
    scan(ledger, [row("a")])
    run_id = ledger.start_run("run", 1)
    claim(ledger)
    ledger.counts()  # what the end of a run takes for summary.json
    ledger.finish_run(run_id, 1, 0, 0)  # one task still running: the flag stays
    assert ledger.meta()[RUNNING_FLAG] == "1"
    with ledger.transaction() as conn:
        ledger.hand_back(conn, [task(ledger, "a")["id"]])
    ledger.counts()
    ledger.finish_run(run_id, 0, 0, 0)
    assert ledger.meta()[RUNNING_FLAG] == "0"


def test_counts_taken_ahead_are_used_only_if_nothing_was_written_since(ledger):
    scan(ledger, [row("a"), row("b"), row("c")])
    ledger.count_ahead()
    assert ledger.counts()["pending"] == 3
    ledger.count_ahead()
    ledger._counting[1].join(5)  # noqa: SLF001 - counted before the write below, for sure
    claim(ledger, limit=1)  # a write after the count started: that count is stale
    assert ledger.counts() == {"pending": 2, "running": 1, "done": 0, "failed": 0, "gone": 0}
    ledger.count_ahead()
    ledger._counting[1].join(5)  # noqa: SLF001
    other = Ledger(ledger.path)  # a write by another connection makes it stale too
    try:
        with other.transaction() as conn:
            other.mark_paths_gone(conn, [b"a"], [])
    finally:
        other.close()
    assert ledger.counts()["gone"] == 1


def test_a_meta_write_keeps_the_counts_unless_another_connection_wrote_tasks(ledger):
    """The end of a run writes the merge's signature between the merge and summary.json: the
    counts taken for the merge serve the summary too, without another pass over the tasks."""
    scan(ledger, [row("a"), row("b"), row("c")])
    assert ledger.counts()["pending"] == 3
    statements: list[str] = []
    ledger.conn.set_trace_callback(statements.append)
    ledger.set_meta({"some_key": "some value"})
    assert ledger.counts()["pending"] == 3
    assert not [sql for sql in statements if "FROM tasks" in sql], statements
    other = Ledger(ledger.path)
    try:
        with other.transaction() as conn:
            other.mark_paths_gone(conn, [b"a"], [])
        ledger.set_meta({"some_key": "another value"})  # after a task changed elsewhere
    finally:
        other.close()
    assert ledger.counts()["gone"] == 1


def test_diff_scan_of_a_range_with_nothing_recorded_writes_every_row_as_the_full_comparison_does():
    rows = [row("a"), row("b", offset=0, length=5), row("b", offset=5, length=5), row("c")]
    empty = diff_scan([], rows, held=[b"d"])
    assert empty.changed == rows and not empty.unseen
    other = (b"0", 0, None, 1, 1)  # something recorded elsewhere in the range: the full comparison
    full = diff_scan([other], rows, held=[b"d"])
    assert full.changed == empty.changed and full.unseen == {b"0"}


def test_a_schema_1_ledger_is_upgraded_and_an_older_crawlproc_is_kept_out(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    scan(led, [row("a")])
    led.conn.execute("DROP TABLE folders")  # what schema 1 had
    led.conn.execute("PRAGMA user_version=1")
    led.close()
    reader = Ledger(tmp_path / "ledger.db", readonly=True)  # `status` reads an old ledger as it is
    assert reader.counts()["pending"] == 1
    reader.close()
    upgraded = Ledger(tmp_path / "ledger.db")
    try:
        assert upgraded.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert upgraded.known_folders("plan") == {} and upgraded.requeue_stale() == 0
    finally:
        upgraded.close()
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        conn.execute("PRAGMA user_version=3")  # a ledger from a newer crawlproc
    with pytest.raises(LedgerError, match="schema 3"):
        Ledger(tmp_path / "ledger.db")


def test_a_rolled_back_claim_does_not_leave_the_flag_unwritten(ledger):
    scan(ledger, [row("a"), row("b")])
    ledger.requeue_stale()  # the flag is '0' now
    with pytest.raises(RuntimeError):
        with ledger.transaction() as conn:
            ledger.claim(conn, 1, 1 << 30, 0.0)
            raise RuntimeError("the turn failed")
    assert ledger.meta()[RUNNING_FLAG] == "0" and states(ledger) == {"a": "pending", "b": "pending"}
    claim(ledger, limit=1)
    assert ledger.meta()[RUNNING_FLAG] == "1"  # written again with the claim that stuck


def test_what_the_status_page_reads(ledger):
    scan(ledger, [row("a", mtime_ns=5_000_000_000), row("b"), row("c"), row("d", mtime_ns=2_000_000_000),
                  row("e", mtime_ns=3_000_000_000)])
    assert ledger.counts_for_the_page().failures == 0
    rows = {r[1]: r for r in claim(ledger)}
    with ledger.transaction() as conn:
        ledger.mark_done(conn, [(1, 0, 0, 0, 9, 0.003, 100.0, rows[b"a"][0]),
                                (1, 0, 0, 0, 9, 2.0, 100.0, rows[b"b"][0])])
        ledger.mark_failed_attempt(conn, rows[b"c"][0], "boom", "tb", 9, None)  # failed for good
        ledger.mark_failed_attempt(conn, rows[b"d"][0], "again", "tb", 9, time.time() + 100)  # retrying
        ledger.hand_back(conn, [rows[b"e"][0]])
    totals = ledger.page_totals((0.01, 1.0, 5.0))
    assert totals.duration_buckets == (1, 1, 2) and totals.durations_counted == 2
    assert totals.durations_sum == pytest.approx(2.003)
    assert totals.retried_attempts == 1  # d's failed attempt will be tried again; c's last one will not
    tasks = ledger.counts_for_the_page()
    assert tasks.counts == ledger.counts_for_people() == ledger.counts() == {"pending": 2, "running": 0, "done": 2,
                                                                             "failed": 1, "gone": 0}
    assert tasks.oldest_pending_mtime_ns == 2_000_000_000  # d, older than e
    latest = ledger.latest_failures(10)
    assert [(f["relpath"], f["state"], f["error"]) for f in latest] == [("d", "retrying", "again"),
                                                                        ("c", "failed", "boom")]
    assert tasks.failures == len(latest)  # the page asks for the list only when there is one
    assert ledger.latest_failures(1) == latest[:1]
    assert ledger.running_tasks(10) == []
    claim(ledger)
    assert [t["relpath"] for t in ledger.running_tasks(10)] == ["e"]  # d waits for its retry time
