"""What a scan takes in and what it leaves out, at the edges: OUT is never input, a folder that
cannot be read is a failure the user sees, files no longer selected are told apart from deleted
ones, entries skipped on purpose are counted, and links inside OUT are refused."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import drop_dac_capabilities, make_tree, query_ledger, run_cli, wait_until
from crawlproc.ledger import Ledger
from crawlproc.walk import ScanOptions, WalkFindings, walk
from crawlproc.watch import Watcher

TREE = {"a.txt": "one two\n", "b/c.txt": "x\n", "b/d/e.log": "hello\n", "z.txt": "z\n"}
WATCH_DEADLINE = 20.0


def crawl(data: Path, out: Path, *args: str, unprivileged: bool = False):
    return run_cli("run", str(data), "-o", str(out), "--no-progress", "-w", "1", *args, unprivileged=unprivileged)


def ok(result) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr


def one_line_error(result, code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def merged_paths(out: Path) -> list[str]:
    return [json.loads(line)["path"] for line in (out / "merged.jsonl").read_text().splitlines()]


def json_of(*args: str):
    result = run_cli(*args, "--json")
    ok(result)
    return json.loads(result.stdout)


def states(out: Path) -> dict[str, str]:
    return dict(query_ledger(out, "SELECT relpath, state FROM tasks"))


def make_crawlproc_ledger(folder: Path) -> None:
    """A real crawlproc ledger (what every OUT holds), made by the Ledger itself."""
    folder.mkdir(parents=True, exist_ok=True)
    Ledger(folder / "ledger.db").close()


def tree_state(root: Path) -> list[tuple]:
    """Every entry under root with its size and mtime: to show that nothing was written there."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            found.append((os.path.relpath(os.path.join(folder, name), root), st.st_size, st.st_mtime_ns))
    return sorted(found)


def walk_with_findings(root: Path, options: ScanOptions | None = None):
    """(relpaths yielded, findings, skip reports) of a whole walk."""
    findings = WalkFindings()
    reports: list[tuple[bytes, str]] = []
    entries = list(walk(os.fsencode(root), options or ScanOptions(), lambda p, r: reports.append((p, r)),
                        findings=findings))
    return [e.relpath for e in entries], findings, reports


# -- 1. OUT is never input ----------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["same", "dot", "link"])
def test_out_equal_to_data_dir_is_refused_before_anything_is_written(tmp_path, spelling):
    data = make_tree(tmp_path / "data", TREE)
    out = {"same": data, "dot": data / ".", "link": tmp_path / "alias"}[spelling]
    if spelling == "link":
        os.symlink(data, out)
    before = tree_state(data)
    line = one_line_error(crawl(data, out), 2)
    assert "is DATA_DIR" in line and str(data) in line
    assert tree_state(data) == before  # no ledger, lock, logs or results in DATA_DIR
    hint = re.search(r"-o (\S+)$", line)
    assert hint, line
    ok(crawl(data, Path(shlex.split(hint.group(1))[0])))  # the hint runs as printed


@pytest.mark.usefixtures("lister")
def test_walk_skips_every_folder_holding_a_crawlproc_ledger(tmp_path):
    root = make_tree(tmp_path / "data", {"a.txt": "a", "old-out/results/00000/1.jsonl": "{}\n",
                                         "old-out/summary.json": "{}", "deep/x/out2/lock": "1",
                                         "deep/x/keep.txt": "k", "notes/ledger.db": "my own notes",
                                         "other-app/data.txt": "d"})
    make_crawlproc_ledger(root / "old-out")
    make_crawlproc_ledger(root / "deep/x/out2")
    other_app = sqlite3.connect(root / "other-app" / "ledger.db")  # another program's SQLite file
    other_app.execute("PRAGMA application_id=7")
    other_app.execute("CREATE TABLE t (x)")
    other_app.close()
    got, findings, reports = walk_with_findings(root)
    assert sorted(got) == [b"a.txt", b"deep/x/keep.txt", b"notes/ledger.db", b"other-app/data.txt",
                           b"other-app/ledger.db"]
    assert findings.skipped["crawlproc_outs"] == 2
    assert sorted(p for p, reason in reports if "crawlproc ledger" in reason) == [b"deep/x/out2", b"old-out"]


def test_a_folder_that_becomes_an_out_leaves_the_output_on_the_next_run(tmp_path):
    data = make_tree(tmp_path / "data", {**TREE, "later/f.txt": "f\n"})
    out = tmp_path / "out"
    ok(crawl(data, out))
    assert "later/f.txt" in merged_paths(out)
    other = make_tree(tmp_path / "other", {"o.txt": "o\n"})
    ok(crawl(other, data / "later"))  # another job puts its OUT there
    result = crawl(data, out)
    ok(result)
    assert merged_paths(out) == sorted(TREE)
    assert states(out)["later/f.txt"] == "gone"
    assert re.search(r"INFO .*skipped later: holds a crawlproc ledger", result.stderr), result.stderr
    assert summary(out)["skipped"]["crawlproc_outs"] == 1


def test_watch_events_inside_a_folder_holding_a_ledger_are_dropped(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    make_crawlproc_ledger(data / "old-out")
    ledger = Ledger(tmp_path / "ledger.db")
    reports: list[tuple[bytes, str]] = []
    watcher = Watcher(ledger, os.fsencode(data), ScanOptions(), settle=0.0, rescan_interval=3600.0,
                      out_relpath=None, on_skip=lambda p, r: reports.append((p, r)))
    try:
        recorded = lambda: {r[0] for r in ledger.conn.execute("SELECT relpath FROM tasks")}  # noqa: E731

        def settled(paths: set[str]):
            watcher.step(1000)
            info = watcher.info()
            return paths <= recorded() and not info["scanning"] and not info["queue_depth"]

        wait_until(lambda: settled({"a.txt"}), WATCH_DEADLINE, "the catch-up")
        make_tree(data, {"old-out/results/00000/1.jsonl": "{}\n", "old-out/lock": "1\n"})  # a new folder, a file
        make_tree(data, {"b.txt": "b\n"})  # last: once it is recorded, the events before it were handled
        wait_until(lambda: settled({"a.txt", "b.txt"}), WATCH_DEADLINE, "b.txt recorded")
        assert recorded() == {"a.txt", "b.txt"}
        assert any(p.startswith(b"old-out") and "crawlproc ledger" in reason for p, reason in reports)
    finally:
        watcher.stop()
        ledger.close()


def test_watch_counts_a_file_once_however_often_it_rescans(tmp_path):
    # The progress line says "watching, N files recorded": a periodic rescan walks the same files.
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b.txt": "b\n", "c/d.txt": "d\n"})
    ledger = Ledger(tmp_path / "ledger.db")
    now = [0.0]
    watcher = Watcher(ledger, os.fsencode(data), ScanOptions(), settle=0.0, rescan_interval=60.0,
                      out_relpath=None, on_skip=lambda p, r: None, monotonic=lambda: now[0])
    try:
        def idle() -> bool:
            watcher.step(1000)
            return watcher.caught_up and not watcher.info()["scanning"] and not watcher.info()["queue_depth"]

        wait_until(idle, WATCH_DEADLINE, "the catch-up")
        assert watcher.files == 3
        for _ in range(3):
            now[0] += 61.0  # a rescan is due
            rescans = watcher.stats["rescans"]
            wait_until(lambda: idle() and watcher.stats["rescans"] > rescans, WATCH_DEADLINE, "a rescan")
        assert watcher.files == 3
        make_tree(data, {"e.txt": "e\n"})
        wait_until(lambda: idle() and watcher.files == 4, WATCH_DEADLINE, "e.txt recorded")
    finally:
        watcher.stop()
        ledger.close()


# -- 2. a folder that cannot be read -----------------------------------------------------------

def require_unreadable(path: Path) -> None:
    """Skip unless a crawlproc started with run_cli(unprivileged=True) cannot list `path`."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import os, sys; os.listdir(sys.argv[1])", str(path)],
                               capture_output=True, timeout=30,
                               preexec_fn=drop_dac_capabilities if os.geteuid() == 0 else None)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's DAC capabilities here: {exc}")
    if probe.returncode == 0:
        pytest.skip("running with privileges that read a chmod 000 folder")


def test_unreadable_folder_is_a_failure_the_user_sees_until_a_run_reads_it(tmp_path):
    data = make_tree(tmp_path / "data", {"m.txt": "m\n", "locked/x.txt": "x\n", "locked/y/z.txt": "z\n"})
    out = tmp_path / "out"
    ok(crawl(data, out))
    for name in ("a.secret", "z.secret"):  # new files no one may read: failed tasks around locked/
        make_tree(data, {name: "s\n"})
        os.chmod(data / name, 0)
    os.chmod(data / "locked", 0)
    try:
        require_unreadable(data / "locked")
        result = crawl(data, out, "--retries", "0", unprivileged=True)
        assert result.returncode == 1, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "locked/" in line]
        assert len(warnings) == 1 and "cannot read folder: Permission denied" in warnings[0], result.stderr
        assert f"crawlproc failures -o {out}" in warnings[0]
        assert "not scanned: 1 path" in result.stderr

        failures = json_of("failures", "-o", str(out))
        assert [(f["relpath"], f["kind"]) for f in failures] == [
            ("a.secret", "task"), ("locked/", "scan"), ("z.secret", "task")]
        assert failures[1] == {"relpath": "locked/", "offset": None, "attempts": 0,
                               "error": "cannot read folder: Permission denied", "traceback": None, "kind": "scan"}
        status = json_of("status", "-o", str(out))
        assert {"counts", "total", "out"} <= set(status)
        assert [(p["relpath"], p["error"]) for p in status["scan_problems"]] == [
            ("locked/", "cannot read folder: Permission denied")]
        table = " ".join(run_cli("status", "-o", str(out)).stdout.split())  # as one line, however it wraps
        assert "not scanned: locked/ (cannot read folder: Permission denied)" in table
        assert f"see: crawlproc failures -o {out}" in table
        assert [p["relpath"] for p in summary(out)["scan_problems"]] == ["locked/"]
        # Its tasks stay as they were: done, in the output.
        assert states(out)["locked/x.txt"] == "done" and "locked/y/z.txt" in merged_paths(out)
    finally:
        os.chmod(data / "locked", 0o755)
    for name in ("a.secret", "z.secret"):
        os.chmod(data / name, 0o644)
    ok(crawl(data, out, "--retry-failed"))
    assert json_of("failures", "-o", str(out)) == []
    assert json_of("status", "-o", str(out))["scan_problems"] == []
    assert summary(out)["scan_problems"] == []


# -- 3. files no longer selected ---------------------------------------------------------------

def test_files_dropped_by_a_changed_filter_are_excluded_not_disappeared(tmp_path):
    data = make_tree(tmp_path / "data", {**TREE, "logs/x.txt": "l\n", "gone.txt": "g\n"})
    out = tmp_path / "out"
    ok(crawl(data, out))
    (data / "gone.txt").unlink()
    result = crawl(data, out, "--exclude", "*.log", "--exclude", "logs")
    ok(result)
    assert "1 file disappeared since the last scan; their records leave the output" in result.stderr
    assert "2 files no longer selected by --include/--exclude; their records leave the output" in result.stderr
    assert merged_paths(out) == ["a.txt", "b/c.txt", "z.txt"]
    result = crawl(data, out, "--include", "a.txt")
    ok(result)
    assert "2 files no longer selected" in result.stderr and "disappeared" not in result.stderr


# -- 4. entries skipped on purpose -------------------------------------------------------------

@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "data", {"a.txt": "a\n", "real/f.txt": "f\n"})
    make_tree(tmp_path / "outside", {"secret.txt": "s\n"})
    os.symlink("a.txt", root / "link_to_file")
    os.symlink("real", root / "link_to_dir")
    os.symlink(tmp_path / "outside", root / "link_outside")
    os.symlink("nowhere", root / "broken")
    os.symlink("..", root / "real" / "up")
    os.mkfifo(root / "fifo")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock"))
    server.close()
    make_crawlproc_ledger(root / "old-out")
    return root


@pytest.mark.usefixtures("lister")
@pytest.mark.parametrize("follow", [False, True])
def test_skipped_entries_are_counted_by_kind(odd_tree, follow):
    got, findings, _ = walk_with_findings(odd_tree, ScanOptions(follow_symlinks=follow))
    # Followed, real/up loops twice: under real/ and under link_to_dir/.
    expected = {"symlinks": 5, "special_files": 2, "crawlproc_outs": 1} if not follow else {
        "links_outside": 1, "broken_links": 1, "symlink_loops": 2, "special_files": 2, "crawlproc_outs": 1}
    assert {kind: n for kind, n in findings.skipped_counts().items() if n} == expected
    assert findings.problems == []
    assert set(got) >= {b"a.txt", b"real/f.txt"}


def test_skipped_entries_are_in_summary_and_log(odd_tree, tmp_path):
    out = tmp_path / "out"
    result = crawl(odd_tree, out)
    ok(result)
    assert summary(out)["skipped"] == {"symlinks": 5, "links_outside": 0, "broken_links": 0, "symlink_loops": 0,
                                       "special_files": 2, "crawlproc_outs": 1}
    assert ("skipped 5 symlinks (not followed without --follow-symlinks), 2 special files (FIFOs, sockets or "
            "devices), 1 folder (holding a crawlproc ledger: an OUT, never input)") in result.stderr
    result = crawl(odd_tree, out, "--follow-symlinks")
    ok(result)
    assert summary(out)["skipped"]["symlinks"] == 0 and summary(out)["skipped"]["links_outside"] == 1


# -- 5. links inside OUT -------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["ledger.db", "ledger.db-wal", "ledger.db-shm", "lock", "results", "logs",
                                   "summary.json"])
@pytest.mark.parametrize("command", ["run", "merge"])
def test_out_entries_that_are_symlinks_are_refused(tmp_path, entry, command):
    data = make_tree(tmp_path / "data", TREE)
    out = tmp_path / "out"
    ok(crawl(data, out))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if (out / entry).exists():
        os.replace(out / entry, elsewhere / entry)
    os.symlink(elsewhere / entry, out / entry)  # dangling for -wal and -shm: still a link
    before = tree_state(elsewhere)
    result = crawl(data, out) if command == "run" else run_cli("merge", "-o", str(out))
    line = one_line_error(result, 2)
    assert f"{out / entry} is a symlink" in line and f"rm {out / entry}" in line
    assert tree_state(elsewhere) == before
