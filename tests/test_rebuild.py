"""A lost or damaged ledger is rebuilt from the result files' trailers, never started from zero.

Every run is a real `python -m crawlproc` subprocess. The processor logs each of
its calls to a file outside DATA_DIR, so "nothing was processed again" is seen,
not assumed; `summary.json`'s tasks_done_this_run must agree.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_tree, query_ledger, run_cli, wait_until
from crawlproc.ledger import Ledger
from crawlproc.rebuild import closed_cleanly
from crawlproc.results import (
    DamagedTrailer,
    NoTrailer,
    TrailerWriter,
    identity_text,
    read_trailer,
    result_path,
    verified_tasks,
    write_atomic,
)

LOGGED = f"{REPO / 'tests' / 'call_log_processor.py'}:logged"
NON_UTF8 = os.fsdecode(b"caf\xe9.txt")
TREE: dict[str, str] = {
    "a.txt": "one two\nthree\n",
    "b/c.txt": "x\n",
    "b/d/e.log": "hello world\nbye",
    NON_UTF8: "latin-1 name\n",
    "empty.txt": "",
    # Three files without records in a row: with batches of 2, one batch has none at all.
    "none-1.txt": "n\n", "none-2.txt": "n\n", "none-3.txt": "n\n",
    **{f"many/f{i:03d}.txt": f"{i}\n" * (i % 7) for i in range(30)},
}
RUN_TIMEOUT = 120


# -- helpers --------------------------------------------------------------------------

class Job:
    """DATA_DIR, OUT and the call log of one test's runs."""

    def __init__(self, tmp_path: Path, tree: dict[str, str] = TREE, *args: str) -> None:
        self.data = make_tree(tmp_path / "data", tree)
        self.out = tmp_path / "out"
        self.log = tmp_path / "calls.log"
        self.args = args

    def run(self, *extra: str, out: Path | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
        return run_cli("run", str(self.data), "-o", str(out or self.out), "--no-progress", "-w", "2",
                       "-p", LOGGED, "--param", f"log={log or self.log}", *self.args, *extra,
                       timeout=RUN_TIMEOUT)

    def calls(self) -> list[str]:
        """Relpaths the processor was called on since the last call of this, sorted."""
        if not self.log.exists():
            return []
        lines = self.log.read_bytes().decode("utf-8", "surrogateescape").splitlines()
        self.log.unlink()
        return sorted(line.split("\t")[0] for line in lines)

    def merged(self) -> bytes:
        return (self.out / "merged.jsonl").read_bytes()

    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def done_rows(self) -> dict[bytes, tuple]:
        """path_bytes -> (offset, batch_id, result_length) of every done task."""
        rows = query_ledger(self.out, "SELECT path_bytes, \"offset\", batch_id, result_length FROM tasks "
                                      "WHERE state = 'done'")
        return {(r[0], r[1]): r[1:] for r in rows}


def ok(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture
def job(tmp_path: Path) -> Job:
    """A finished clean run (batches of 2 tasks), its call log emptied."""
    job = Job(tmp_path, TREE, "--batch-size", "2")
    ok(job.run())
    assert len(job.calls()) == len(TREE)
    return job


def assert_rebuilt_without_work(job: Job, result: subprocess.CompletedProcess, clean: bytes) -> str:
    """The rerun processed nothing, published the clean output and said so in one warning line."""
    ok(result)
    assert job.calls() == []
    assert job.summary()["timings"]["tasks_done_this_run"] == 0
    assert job.summary()["counts"]["done"] == len(TREE)
    assert job.merged() == clean
    said = [line for line in result.stderr.splitlines() if "ledger.db was" in line]
    assert len(said) == 1 and "rebuilt from" in said[0] and f"({len(TREE)} done tasks kept)" in said[0], said
    return said[0]


def garbage_in_the_middle(path: Path) -> bytes:
    """0xff over the tasks table's first page, as a bad disk would leave it; the file's size and
    mtime stay as they were (its ctime tells)."""
    st = path.stat()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'tasks'").fetchone()[0]
    conn.close()
    raw = bytearray(path.read_bytes())
    start = (root - 1) * page_size
    raw[start:start + page_size] = b"\xff" * page_size
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return bytes(raw)


def foreign_sqlite(path: Path) -> bytes:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (n INTEGER)")
    conn.close()
    return path.read_bytes()


def text_file(path: Path) -> bytes:
    path.write_bytes(b"not a database\n" * 100)
    return path.read_bytes()


def empty(path: Path) -> bytes:
    os.truncate(path, 0)
    return b""


def deleted_after_a_crash(path: Path) -> None:
    """Left as a writer killed before its checkpoint leaves it, then only ledger.db deleted:
    the -wal holds committed frames of the old file, which must not be replayed into the new."""
    script = ("import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint=0');"
              "c.execute(\"UPDATE tasks SET state = 'pending'\"); c.commit(); os._exit(0)")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=RUN_TIMEOUT)
    assert path.with_name("ledger.db-wal").stat().st_size > 0
    path.unlink()


# -- the ledger lost in every way ----------------------------------------------------------

@pytest.mark.parametrize("lose", [empty, garbage_in_the_middle, foreign_sqlite, text_file])
def test_a_damaged_or_foreign_ledger_is_rebuilt_and_kept_aside(job, lose):
    clean = job.merged()
    ledger = job.out / "ledger.db"
    content = lose(ledger)
    line = assert_rebuilt_without_work(job, job.run(), clean)
    aside = [p for p in job.out.glob("ledger.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # never deleted, never changed
    assert aside[0].name in line and str(ledger) in line


@pytest.mark.parametrize("lose", [Path.unlink, deleted_after_a_crash], ids=["deleted", "deleted-wal-left"])
def test_a_deleted_ledger_is_rebuilt(job, lose):
    clean = job.merged()
    lose(job.out / "ledger.db")
    wal = (job.out / "ledger.db-wal").read_bytes() if (job.out / "ledger.db-wal").exists() else None
    line = assert_rebuilt_without_work(job, job.run(), clean)
    assert "ledger.db was missing" in line
    if wal is not None:  # moved aside whole, not replayed and not deleted
        assert [p.read_bytes() for p in job.out.glob("ledger.db.damaged-*-wal")] == [wal]
    # The rebuilt ledger is a whole one: a second rerun is a plain no-op.
    ok(job.run())
    assert job.calls() == [] and job.merged() == clean


def test_the_zero_record_batch_and_non_utf8_name_come_back(job):
    rows = job.done_rows()
    by_batch: dict[int, int] = {}
    for _, batch_id, length in rows.values():
        by_batch[batch_id] = by_batch.get(batch_id, 0) + (length or 0)
    assert 0 in by_batch.values()  # a batch whose tasks gave no record at all still wrote its file
    clean = job.merged()
    (job.out / "ledger.db").unlink()
    assert_rebuilt_without_work(job, job.run(), clean)
    assert job.done_rows() == rows  # the same ranges, keys as exact bytes
    assert (b"caf\xe9.txt", 0) in rows


def test_chunked_ranges_are_rebuilt(tmp_path):
    big = "".join(f"line {i} of a file cut into byte ranges\n" for i in range(400))
    job = Job(tmp_path, {"big.txt": big, "small.txt": "s\n"}, "--chunk-size", "2KB")
    ok(job.run())
    assert len(job.calls()) > 5
    clean, rows = job.merged(), job.done_rows()
    (job.out / "ledger.db").unlink()
    ok(job.run())
    assert job.calls() == [] and job.merged() == clean and job.done_rows() == rows


# -- what changed while the ledger was lost -------------------------------------------------

def test_a_file_changed_or_deleted_meanwhile_is_redone_or_leaves(job, tmp_path):
    (job.out / "ledger.db").unlink()
    (job.data / "b" / "c.txt").write_text("changed\nand longer\n")
    (job.data / "a.txt").unlink()
    ok(job.run())
    assert job.calls() == ["b/c.txt"]
    reference = tmp_path / "reference"
    ok(job.run(out=reference))  # a clean run over the tree as it is now
    assert job.merged() == (reference / "merged.jsonl").read_bytes()


def test_a_damaged_result_file_costs_only_its_own_tasks(job):
    clean = job.merged()
    rows = job.done_rows()
    batches: dict[int, list[str]] = {}
    for (path, _), (_, batch_id, length) in rows.items():
        batches.setdefault(batch_id, []).append(os.fsdecode(path))
    with_records = sorted(b for b in batches if all(rows[(os.fsencode(p), 0)][2] for p in batches[b])
                          and len(batches[b]) == 2)
    record_hit, trailer_hit = with_records[0], with_records[-1]
    # One record range loses a byte: that task alone; the trailer of another file: all of its tasks.
    first = result_path(job.out, record_hit)
    content = bytearray(first.read_bytes())
    content[1] ^= 0x01
    first.write_bytes(bytes(content))
    second = result_path(job.out, trailer_hit)
    content = bytearray(second.read_bytes())
    content[-5] = ord("!")
    second.write_bytes(bytes(content))
    (job.out / "ledger.db").unlink()

    result = ok(job.run())
    hit_first = min(batches[record_hit], key=os.fsencode)
    assert job.calls() == sorted([hit_first, *batches[trailer_hit]])
    assert job.merged() == clean
    assert "1 damaged result files and 1 damaged record ranges were not adopted" in result.stderr


# -- refusals ------------------------------------------------------------------------------

def test_results_of_other_settings_are_refused_then_reprocess_starts_over(job, tmp_path):
    (job.out / "ledger.db").unlink()
    before = sorted(p.name for p in (job.out / "results").rglob("*.jsonl"))
    result = ok(job.run("--param", "extra=1"), 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "other settings" in result.stderr and "params" in result.stderr
    assert "--reprocess" in result.stderr and "--out" in result.stderr
    assert not (job.out / "ledger.db").exists()  # nothing changed
    assert sorted(p.name for p in (job.out / "results").rglob("*.jsonl")) == before
    assert job.calls() == []

    ok(job.run("--param", "extra=1", "--reprocess"))
    assert len(job.calls()) == len(TREE)
    after = {p.name for p in (job.out / "results").rglob("*.jsonl")}
    assert not after & set(before)  # new batch ids above the old files, which are removed
    reference = tmp_path / "reference"
    ok(job.run("--param", "extra=1", out=reference))
    assert job.merged() == (reference / "merged.jsonl").read_bytes()


def test_results_without_a_trailer_are_refused(job):
    """Result files of a crawlproc older than trailers cannot rebuild anything."""
    for path in (job.out / "results").rglob("*.jsonl"):
        data = path.read_bytes()
        path.write_bytes(data[:data.rfind(b"\n", 0, len(data) - 1) + 1])  # the records alone
    (job.out / "ledger.db").unlink()
    result = ok(job.run(), 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "older crawlproc" in result.stderr and "--reprocess" in result.stderr
    assert job.calls() == []
    ok(job.run("--reprocess"))
    assert len(job.calls()) == len(TREE)


def test_a_damaged_ledger_with_no_results_is_refused_and_left_as_found(job):
    ledger = job.out / "ledger.db"
    content = garbage_in_the_middle(ledger)
    for path in (job.out / "results").rglob("*.jsonl"):
        path.unlink()
    result = ok(job.run(), 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert "damaged" in result.stderr and "mv " in result.stderr
    assert ledger.read_bytes() == content
    assert job.calls() == []


# -- the commands that only read -------------------------------------------------------------

@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["failures"], ["merge"], ["retry"]])
def test_read_only_commands_say_which_run_rebuilds_the_ledger(job, command):
    clean = job.merged()
    (job.out / "ledger.db").unlink()
    result = ok(run_cli(*command, "-o", str(job.out), timeout=RUN_TIMEOUT), 2)
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (job.out / "ledger.db").exists()  # nothing rebuilt behind the user's back
    hint = result.stderr.split("`")[1]
    argv = shlex.split(hint)
    assert argv[:5] == ["crawlproc", "run", os.path.realpath(job.data), "-o", str(job.out)]
    ok(run_cli(*argv[1:], "--no-progress", timeout=RUN_TIMEOUT))  # as printed: it works
    assert job.calls() == [] and job.merged() == clean


# -- batch ids, crash safety ----------------------------------------------------------------------

def test_new_batch_ids_after_a_rebuild_are_above_every_result_file(job):
    stray = result_path(job.out, 900)
    stray.write_bytes(b'{"half a record')  # damaged: not adopted, and never overwritten
    (job.out / "ledger.db").unlink()
    (job.data / "b" / "c.txt").write_text("changed\n")
    ok(job.run())
    assert job.calls() == ["b/c.txt"]
    assert job.done_rows()[(b"b/c.txt", 0)][1] > 900


def test_a_coordinator_killed_while_rebuilding_leaves_a_ledger_the_next_run_rebuilds(tmp_path):
    tree = {f"d{i // 100:02d}/f{i:04d}.txt": f"{i}\n" for i in range(2000)}
    job = Job(tmp_path, tree, "--batch-size", "1")  # 2,000 result files: a rebuild takes a while
    ok(job.run())
    clean = job.merged()
    job.calls()
    (job.out / "ledger.db").unlink()
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", str(job.data), "-o", str(job.out), "--no-progress", "-w", "2",
         "-p", LOGGED, "--param", f"log={job.log}", "--batch-size", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: tasks_in(job.out / "ledger.db.rebuilding") or proc.poll() is not None,
                   RUN_TIMEOUT, "the rebuild to adopt its first tasks", interval=0.002)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(RUN_TIMEOUT)
    assert proc.returncode == -signal.SIGKILL  # killed before the end of the run (which scans 2,000 files)
    ok(job.run())
    assert job.calls() == []
    assert job.merged() == clean
    assert not (job.out / "ledger.db.rebuilding").exists()


def tasks_in(path: Path) -> int:
    """Tasks in the ledger file at `path` so far (0 while it has none, or no table yet)."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


# -- trailers and the clean-close stamp, in-process --------------------------------------------

def test_a_trailer_round_trips_every_field(tmp_path):
    writer = TrailerWriter(identity_text({"data_dir": "/d", "params": {"k": "v"}}), pid=4242)
    writer.add((1, b"caf\xe9.txt", 0, None, 13, 1_700_000_000_123_456_789, 0), (0, 10, 77), 0.25, 1700000000.5)
    writer.add((2, b"big", 4096, 2048, 1 << 40, 5, 0), (10, 0, 0), 0.0, 1700000001.0)
    path = result_path(tmp_path, 7)
    write_atomic(path, b'{"r": 1234}\n' + writer.line(7))
    trailer = read_trailer(path)
    assert (trailer.batch_id, trailer.pid, trailer.records_end) == (7, 4242, 12)
    assert trailer.identity == {"data_dir": "/d", "params": {"k": "v"}}
    assert [tuple(t) for t in trailer.tasks()] == [
        (b"caf\xe9.txt", 0, None, 13, 1_700_000_000_123_456_789, 0, 10, 77, 0.25, 1700000000.5),
        (b"big", 4096, 2048, 1 << 40, 5, 10, 0, 0, 0.0, 1700000001.0),
    ]
    _, intact, damaged = verified_tasks(path)
    assert ([t.path_bytes for t in intact], damaged) == ([b"big"], 1)  # crc 77 is not the record's
    assert writer.line(8).count(b"\t") == 3  # the writer starts each batch afresh


@pytest.mark.parametrize("cut, error", [(1, DamagedTrailer), (20, DamagedTrailer), (None, NoTrailer)])
def test_a_file_without_a_whole_trailer_is_told_apart(tmp_path, cut, error):
    writer = TrailerWriter(identity_text({}), pid=1)
    writer.add((1, b"a", 0, None, 1, 1, 0), (0, 12, 0), 0.0, 0.0)
    records = b'{"r": 1234}\n'
    data = records + writer.line(3)
    path = result_path(tmp_path, 3)
    write_atomic(path, records if cut is None else data[:-cut])
    with pytest.raises(error):
        read_trailer(path)


def test_a_ledger_is_checked_in_full_unless_it_is_as_crawlproc_closed_it(job):
    ledger = job.out / "ledger.db"
    assert closed_cleanly(ledger)
    ok(run_cli("status", "-o", str(job.out), timeout=RUN_TIMEOUT))  # a reader changes nothing
    assert closed_cleanly(ledger)
    other = Ledger(ledger)  # written by something else: the stamp no longer matches
    other.set_meta({"note": "written elsewhere"})
    other.close()
    assert not closed_cleanly(ledger)


def test_accepted_identity_changes_are_adopted_others_refused(tmp_path):
    """The hook --keep-results uses: results whose identity differs only in accepted keys are kept."""
    from crawlproc.errors import IdentityMismatch
    from crawlproc.rebuild import rebuild_if_lost
    from crawlproc.run import RunOptions, run_job

    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b.txt": "b\n"})
    out = tmp_path / "out"
    outcome = run_job(RunOptions(data_dir=data, out=out, workers=1))
    assert outcome.exit_code == 0
    identity = _identity_of(out)
    (out / "ledger.db").unlink()
    edited = {**identity, "processor_version": "edited"}
    with pytest.raises(IdentityMismatch, match="processor_version: results have '1', this run 'edited'"):
        rebuild_if_lost(out, edited)
    line = rebuild_if_lost(out, edited, accept_changed=frozenset({"processor_version"}))
    assert "(2 done tasks kept)" in line
    assert query_ledger(out, "SELECT count(*) FROM tasks WHERE state = 'done'") == [(2,)]


def _identity_of(out: Path) -> dict:
    """The run identity a result file's trailer records."""
    return read_trailer(next((out / "results").rglob("*.jsonl"))).identity
