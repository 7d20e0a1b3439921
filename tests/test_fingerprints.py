"""Folder fingerprints: a rescan skips a folder of files whose listing is what the ledger recorded.

The skip must never hide a change. Each test here changes the tree (or the
ledger, the way a worker or watch mode does) between scans and checks that
the next scan sees it, with folders listed here and by helpers alike.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import make_tree
from crawlproc.ledger import Ledger
from crawlproc.scanner import Scan, _plan
from crawlproc.walk import ScanOptions

pytestmark = pytest.mark.usefixtures("lister")

PLAIN = ScanOptions()


def full_scan(ledger: Ledger, root: Path, options: ScanOptions = PLAIN, step: int = 3) -> Scan:
    scan = Scan(ledger, os.fsencode(root), options, lambda path, reason: None)
    for _ in range(10_000):
        scan.step(step)
        if scan.finished:
            return scan
    raise AssertionError("the scan did not finish")


def live(ledger: Ledger) -> dict[bytes, tuple]:
    """{path: (size, mtime_ns, state)} of the tasks not gone."""
    rows = ledger.conn.execute("SELECT path_bytes, size, mtime_ns, state FROM tasks WHERE state != 'gone'")
    return {r[0]: r[1:] for r in rows}


def recorded(ledger: Ledger, options: ScanOptions = PLAIN) -> set[bytes]:
    return set(ledger.known_folders(_plan(options)))


def bump(path: Path, by_ns: int = 1_000_000) -> None:
    """Same size, another mtime: a change only the stat shows."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + by_ns))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {
        "top.txt": "t",
        "a/1.txt": "1", "a/2.txt": "22", "a/3.txt": "333",
        "b/c/x.txt": "x", "b/c/y.txt": "yy",
        "b/d/z.txt": "z",
    })


@pytest.fixture
def ledger(tmp_path: Path):
    led = Ledger(tmp_path / "ledger.db")
    yield led
    led.close()


def test_a_scan_records_folders_of_files_only(ledger, tree):
    full_scan(ledger, tree)
    # 'b/' holds folders, and DATA_DIR holds a folder too: only folders of plain files count.
    assert recorded(ledger) == {b"a/", b"b/c/", b"b/d/"}
    files = dict(ledger.conn.execute("SELECT prefix, files FROM folders"))
    assert files == {b"a/": 3, b"b/c/": 2, b"b/d/": 1}


def test_an_unchanged_folder_is_skipped_without_reading_its_tasks(ledger, tree):
    full_scan(ledger, tree)
    # Damage a task row behind the ledger's back: a scan that read a's rows would repair it.
    ledger.conn.execute("UPDATE tasks SET size = 999 WHERE path_bytes = ?", (b"a/2.txt",))
    scan = full_scan(ledger, tree)
    assert scan.files == 7 and scan.gone == 0
    assert live(ledger)[b"a/2.txt"][0] == 999  # skipped: the recorded fingerprint vouched for it
    ledger.conn.execute("DELETE FROM folders")
    full_scan(ledger, tree)
    assert live(ledger)[b"a/2.txt"][0] == 2  # listed again: repaired


@pytest.mark.parametrize("change", ["mtime", "size", "added", "removed"])
def test_a_changed_file_in_a_recorded_folder_is_seen(ledger, tree, change):
    full_scan(ledger, tree)
    for task in ledger.conn.execute("SELECT id FROM tasks").fetchall():
        ledger.conn.execute("UPDATE tasks SET state = 'done' WHERE id = ?", task)
    target = tree / "a" / "2.txt"
    if change == "mtime":
        bump(target)
    elif change == "size":
        target.write_text("grown")
    elif change == "added":
        (tree / "a" / "4.txt").write_text("new")
    else:
        target.unlink()
    scan = full_scan(ledger, tree)
    tasks = live(ledger)
    if change == "removed":
        assert scan.gone == 1 and b"a/2.txt" not in tasks
    elif change == "added":
        assert tasks[b"a/4.txt"][2] == "pending"
    else:
        assert tasks[b"a/2.txt"][2] == "pending"
        assert tasks[b"a/2.txt"][:2] == (target.stat().st_size, target.stat().st_mtime_ns)
    others = {p: s for p, s in tasks.items() if p not in (b"a/2.txt", b"a/4.txt")}
    assert {s[2] for s in others.values()} == {"done"}  # nothing else redone


def test_a_folder_that_gains_and_loses_a_subfolder_loses_its_tasks(ledger, tree):
    full_scan(ledger, tree)
    make_tree(tree / "a" / "sub", {"deep.txt": "d"})
    full_scan(ledger, tree)
    assert b"a/sub/deep.txt" in live(ledger)
    shutil.rmtree(tree / "a" / "sub")
    # 'a' lists exactly as when it was first recorded: its old fingerprint must not vouch for it.
    scan = full_scan(ledger, tree)
    assert scan.gone == 1 and b"a/sub/deep.txt" not in live(ledger)


def test_a_folder_deleted_and_restored_identically_comes_back(ledger, tree, tmp_path):
    full_scan(ledger, tree)
    shutil.copytree(tree / "a", tmp_path / "saved", copy_function=shutil.copy2)  # keeps mtimes
    shutil.rmtree(tree / "a")
    assert full_scan(ledger, tree).gone == 3
    shutil.copytree(tmp_path / "saved", tree / "a", copy_function=shutil.copy2)
    full_scan(ledger, tree)
    assert {p for p in live(ledger) if p.startswith(b"a/")} == {b"a/1.txt", b"a/2.txt", b"a/3.txt"}


def test_a_tree_of_files_only_rescans_to_nothing_and_still_sees_deletions(ledger, tmp_path):
    root = make_tree(tmp_path / "flat", {f"f{i}.txt": "x" * i for i in range(5)})
    full_scan(ledger, root)
    assert recorded(ledger) == {b""}
    for _ in range(2):
        scan = full_scan(ledger, root)
        assert (scan.files, scan.gone) == (5, 0) and len(live(ledger)) == 5
    (root / "f3.txt").unlink()
    assert full_scan(ledger, root).gone == 1 and len(live(ledger)) == 4


def test_worker_and_watch_writes_forget_the_folders_they_touch(ledger, tree):
    full_scan(ledger, tree)
    ids = dict(ledger.conn.execute("SELECT path_bytes, id FROM tasks"))
    ledger.conn.execute("UPDATE tasks SET state = 'running'")
    with ledger.transaction() as conn:
        ledger.record_new_stat(conn, ids[b"a/1.txt"], 5, 5)  # a worker saw the file change
    assert recorded(ledger) == {b"b/c/", b"b/d/"}
    with ledger.transaction() as conn:
        ledger.mark_gone(conn, ids[b"b/c/x.txt"])  # a worker found it deleted
    assert recorded(ledger) == {b"b/d/"}
    with ledger.transaction() as conn:
        ledger.upsert_scanned(conn, [(b"b/d/new.txt", 0, None, 1, 1)])  # watch mode saw a new file
    assert recorded(ledger) == set()
    full_scan(ledger, tree)
    assert recorded(ledger) == {b"a/", b"b/c/", b"b/d/"}
    with ledger.transaction() as conn:
        ledger.mark_paths_gone(conn, [], [b"b/"])  # watch mode saw a folder deleted
    assert recorded(ledger) == {b"a/"}


def test_a_task_changed_by_a_worker_is_seen_again_even_if_the_file_reverts(ledger, tree):
    full_scan(ledger, tree)
    target = tree / "a" / "1.txt"
    original = target.stat()
    task_id = ledger.conn.execute("SELECT id FROM tasks WHERE path_bytes = ?", (b"a/1.txt",)).fetchone()[0]
    ledger.conn.execute("UPDATE tasks SET state = 'running' WHERE id = ?", (task_id,))
    with ledger.transaction() as conn:
        ledger.record_new_stat(conn, task_id, 42, original.st_mtime_ns + 1)
    # The file is back as the recorded fingerprint has it; the ledger is not: the scan must fix it.
    full_scan(ledger, tree)
    assert live(ledger)[b"a/1.txt"][:2] == (original.st_size, original.st_mtime_ns)


def test_other_scan_options_drop_the_fingerprints(ledger, tree):
    full_scan(ledger, tree)
    only_ones = ScanOptions(include=["1.txt", "x.txt", "z.txt"])
    assert recorded(ledger, only_ones) == set()  # recorded under other options: dropped
    full_scan(ledger, tree, only_ones)
    assert set(live(ledger)) == {b"a/1.txt", b"b/c/x.txt", b"b/d/z.txt"}
    assert recorded(ledger, only_ones) == {b"a/", b"b/c/", b"b/d/"}
    chunked = ScanOptions(chunk_size=1)
    assert recorded(ledger, chunked) == set()
    full_scan(ledger, tree, chunked)
    tasks = ledger.conn.execute("SELECT count(*) FROM tasks WHERE state != 'gone'").fetchone()[0]
    assert tasks == 1 + 1 + 2 + 3 + 1 + 2 + 1  # a task per byte


def test_reprocess_drops_the_fingerprints(ledger, tree):
    ledger.check_identity({"processor": "a"}, reprocess=False)
    full_scan(ledger, tree)
    assert recorded(ledger)
    assert ledger.check_identity({"processor": "b"}, reprocess=True)
    assert recorded(ledger) == set()


@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_slices_of_any_size_end_in_the_same_ledger(ledger, tmp_path, step):
    files = {f"d{i}/f{j}.txt": "x" * j for i in range(4) for j in range(i + 2)}
    files |= {f"d1/e{k}/g.txt": "g" for k in range(3)}
    root = make_tree(tmp_path / "data", files)
    full_scan(ledger, root, step=step)
    first = live(ledger)
    bump(root / "d2" / "f1.txt")
    (root / "d3" / "f0.txt").unlink()
    (root / "d0" / "new.txt").write_text("n")
    scan = full_scan(ledger, root, step=step)
    assert scan.gone == 1 and scan.files == len(first)
    now = live(ledger)
    assert set(now) == set(first) - {b"d3/f0.txt"} | {b"d0/new.txt"}
    changed = {p for p in now if p in first and now[p] != first[p]}
    assert changed == {b"d2/f1.txt"}
    again = full_scan(ledger, root, step=step)  # now all recorded: a rescan changes nothing
    assert (again.files, again.gone) == (len(now), 0) and live(ledger) == now


def test_a_folder_split_across_slices_is_not_recorded(ledger, tmp_path):
    """The pool runs between slices: a worker may change a task of a folder's first slice
    before the scan reaches the folder's end, so only a folder one slice covered is vouched for."""
    root = make_tree(tmp_path / "data", {f"big/f{i}.txt": "x" * (i + 1) for i in range(6)})
    scan = Scan(ledger, os.fsencode(root), PLAIN, lambda path, reason: None)
    scan.step(1)  # a slice ends after 4 files at most: mid-folder
    assert not scan.finished and len(live(ledger)) == 4
    task_id = ledger.conn.execute("SELECT id FROM tasks WHERE path_bytes = ?", (b"big/f0.txt",)).fetchone()[0]
    ledger.conn.execute("UPDATE tasks SET state = 'running' WHERE id = ?", (task_id,))
    with ledger.transaction() as conn:
        ledger.record_new_stat(conn, task_id, 42, 42)
    while not scan.finished:
        scan.step(1)
    assert recorded(ledger) == set()
    full_scan(ledger, root)  # so the next scan lists the folder and puts the task right
    assert live(ledger)[b"big/f0.txt"][:2] == (1, (root / "big" / "f0.txt").stat().st_mtime_ns)


def test_a_step_over_unchanged_folders_stays_short(ledger, tmp_path):
    root = make_tree(tmp_path / "data", {f"d{i:02d}/f{j}.txt": "x" for i in range(20) for j in range(5)})
    full_scan(ledger, root)
    scan = Scan(ledger, os.fsencode(root), PLAIN, lambda path, reason: None)
    steps = 0
    while not scan.finished:
        scan.step(10)
        steps += 1
    assert scan.files == 100 and steps >= 10  # ten files (two folders) a step, not the whole tree


def test_a_file_deleted_while_its_task_runs_is_not_vouched_for(ledger, tree):
    """Its worker may still report it done after the scan listed the folder without it: the
    folder must be listed again next time, so that the task then becomes gone."""
    full_scan(ledger, tree)
    ledger.conn.execute("UPDATE tasks SET state = 'running' WHERE path_bytes = ?", (b"a/2.txt",))
    (tree / "a" / "2.txt").unlink()
    full_scan(ledger, tree)
    assert live(ledger)[b"a/2.txt"][2] == "running"  # left to its worker
    assert b"a/" not in recorded(ledger)
    ledger.conn.execute("UPDATE tasks SET state = 'done' WHERE path_bytes = ?", (b"a/2.txt",))  # it reports
    assert full_scan(ledger, tree).gone == 1 and b"a/2.txt" not in live(ledger)
    assert b"a/" in recorded(ledger)
