"""Walking DATA_DIR (crawlproc.walk.walk) and feeding the ledger (crawlproc.scanner.Scan)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import crawlproc.listing
from conftest import drop_dac_capabilities, make_tree
from crawlproc.ledger import Ledger
from crawlproc.listing import HelperLister, list_folder
from crawlproc.scanner import Scan
from crawlproc.walk import PathFilter, ScanOptions, dir_id, walk

WALK_TIMEOUT = 10


pytestmark = pytest.mark.usefixtures("lister")  # every walk runs twice: see conftest.lister


def collect(root: Path, options: ScanOptions | None = None) -> tuple[list[bytes], list[tuple[bytes, str]], list[bytes]]:
    """(relpaths yielded, skip reports, unreadable prefixes), with a deadline so a hang fails."""
    reports: list[tuple[bytes, str]] = []
    unreadable: list[bytes] = []
    found: list = []
    errors: list = []

    def target() -> None:
        try:
            found.extend(walk(os.fsencode(root), options or ScanOptions(), lambda p, r: reports.append((p, r)),
                              unreadable))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(WALK_TIMEOUT)
    assert not thread.is_alive(), "walk did not finish: it hangs"
    if errors:
        raise errors[0]
    return [e.relpath for e in found], reports, unreadable


def relpaths(root: Path, options: ScanOptions | None = None) -> list[bytes]:
    return collect(root, options)[0]


def tree_order(paths: list[bytes]) -> list[bytes]:
    """Depth-first order: in each folder its files by name, then its subfolders by name."""
    def key(path: bytes) -> tuple:
        parts = path.split(b"/")
        return tuple((0, p) if i == len(parts) - 1 else (1, p) for i, p in enumerate(parts))
    return sorted(paths, key=key)


def run_scan(ledger: Ledger, root: Path, options: ScanOptions | None = None, step: int = 2) -> Scan:
    reports: list = []
    scan = Scan(ledger, os.fsencode(root), options or ScanOptions(), lambda p, r: reports.append((p, r)))
    for _ in range(10_000):
        scan.step(step)
        if scan.finished:
            break
    assert scan.finished
    scan.reports = reports  # type: ignore[attr-defined]
    return scan


def states(ledger: Ledger) -> dict[bytes, str]:
    return dict(ledger.conn.execute("SELECT path_bytes, state FROM tasks"))


# -- plain walks -------------------------------------------------------------------------

def test_nested_folders_in_sorted_order_with_sizes_and_mtimes(tmp_path):
    files = {"b.txt": "bb", "a/z.txt": "z", "a/b/c.txt": "ccc", "a/a.txt": "", "c/d/e/f.txt": "f",
             "B.txt": "B", "a.txt": "a", "a/b.txt": "ab"}
    root = make_tree(tmp_path / "data", files)
    os.utime(root / "a/z.txt", ns=(1_000_000_000, 1_234_567_890_123))
    reports: list = []
    entries = list(walk(os.fsencode(root), ScanOptions(), lambda p, r: reports.append((p, r))))
    got = [e.relpath for e in entries]
    # Plain byte order of the relpaths: the ledger's order.
    assert got == sorted(p.encode() for p in files)
    by_path = {e.relpath: e for e in entries}
    assert by_path[b"b.txt"].size == 2 and by_path[b"a/a.txt"].size == 0
    assert by_path[b"a/z.txt"].mtime_ns == 1_234_567_890_123
    assert reports == []


# Names whose bytes sort around '/' (0x2f): a folder's files must come out at the
# place of "name/..." among its siblings, not at the place of "name".
TRICKY_PATHS = [b"a b/x", b"a!", b"a-b", b"a-c/d", b"a.txt", b"a/b", b"a/b-c", b"a/b.txt", b"a/b0", b"a/c/d",
                b"a/c.txt", b"a/c-d/e", b"a0", b"a0b/z", b"aa", b"a\xc3\xa9", b"b/.hidden", b"b/-dash",
                b"b/~tilde", b"b\xff", b"\xc3\xa9/x"]


def _tricky_tree(root: Path) -> list[bytes]:
    for raw in TRICKY_PATHS:
        full = os.fsencode(root) + b"/" + raw
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(raw)
    return list(TRICKY_PATHS)


def test_walk_yields_byte_order_for_names_around_the_slash(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    paths = _tricky_tree(root)
    assert relpaths(root) == sorted(paths)
    assert relpaths(root, ScanOptions(follow_symlinks=True)) == sorted(paths)


@pytest.mark.parametrize("step", [1, 2, 3, 1000])
def test_rescan_in_slices_of_an_unchanged_tree_changes_nothing(tmp_path, step):
    root = tmp_path / "data"
    root.mkdir()
    paths = _tricky_tree(root)
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        run_scan(ledger, root, step=step)
        assert states(ledger) == {p: "pending" for p in paths}
        ledger.conn.execute("UPDATE tasks SET state = 'done', attempts = 1")
        ledger.conn.execute("CREATE TEMP TABLE updates (id INTEGER)")
        ledger.conn.execute("CREATE TEMP TRIGGER log_updates AFTER UPDATE ON main.tasks "
                            "BEGIN INSERT INTO updates VALUES (new.id); END")
        scan = run_scan(ledger, root, step=step)
        assert scan.gone == 0 and scan.files == len(paths)
        assert states(ledger) == {p: "done" for p in paths}
        assert ledger.conn.execute("SELECT count(*) FROM updates").fetchone()[0] == 0
        # One file deleted, one changed, one added: exactly those are touched, whatever the slices.
        os.unlink(os.fsencode(root) + b"/a-b")
        with open(os.fsencode(root) + b"/a/b.txt", "ab") as f:
            f.write(b" more")
        (root / "a,new").write_text("new")
        scan = run_scan(ledger, root, step=step)
        assert scan.gone == 1
        expected = {p: "done" for p in paths}
        expected.update({b"a-b": "gone", b"a/b.txt": "pending", b"a,new": "pending"})
        assert states(ledger) == expected
    finally:
        ledger.close()


def test_walk_is_deterministic_and_yields_posix_relpaths(tmp_path):
    root = make_tree(tmp_path / "data", {f"d{i % 3}/f{i}.txt": str(i) for i in range(20)})
    first = relpaths(root)
    assert first == relpaths(root)
    assert all(not p.startswith(b"/") and b"\\" not in p for p in first)
    assert len(first) == 20


def test_empty_files_and_empty_folders(tmp_path):
    root = make_tree(tmp_path / "data", {"empty.txt": "", "sub/also_empty": ""})
    (root / "no_files" / "deeper").mkdir(parents=True)
    entries = list(walk(os.fsencode(root), ScanOptions()))
    assert {e.relpath: e.size for e in entries} == {b"empty.txt": 0, b"sub/also_empty": 0}


def test_non_utf8_name_is_yielded_with_exact_bytes(tmp_path):
    root = tmp_path / "data"
    (root / "dir").mkdir(parents=True)
    raw = os.fsencode(root) + b"/dir/caf\xe9.txt"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin-1 name\n")
    os.close(fd)
    (root / "dir" / "plain.txt").write_text("x")
    assert relpaths(root) == [b"dir/caf\xe9.txt", b"dir/plain.txt"]


def test_empty_data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    assert relpaths(tmp_path / "data") == []


# -- symlinks ----------------------------------------------------------------------------

@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    root = make_tree(tmp_path / "data", {"real/file.txt": "inside", "top.txt": "top"})
    make_tree(tmp_path / "outside", {"secret.txt": "outside"})
    os.symlink(root / "top.txt", root / "link_to_file")
    os.symlink("real", root / "link_to_dir")
    os.symlink(tmp_path / "outside", root / "link_outside")
    os.symlink(tmp_path / "outside" / "secret.txt", root / "link_outside_file")
    os.symlink("..", root / "real" / "loop")
    os.symlink("nowhere", root / "dangling")
    return root


def test_symlinks_are_not_followed_by_default(linked_tree):
    got, reports, _ = collect(linked_tree)
    assert got == [b"top.txt", b"real/file.txt"] or got == [b"real/file.txt", b"top.txt"]


def test_follow_symlinks_inside_yes_outside_no_loops_detected(linked_tree):
    got, reports, _ = collect(linked_tree, ScanOptions(follow_symlinks=True))
    assert got == sorted(got)
    assert set(got) == {b"top.txt", b"real/file.txt", b"link_to_file", b"link_to_dir/file.txt"}
    assert len(got) == len(set(got))
    reported = {path: reason for path, reason in reports}
    assert b"link_outside" in reported and "outside" in reported[b"link_outside"]
    assert b"link_outside_file" in reported
    loops = [p for p, reason in reports if "loop" in reason]
    assert b"real/loop" in loops
    assert not any(b"secret" in p for p in got)


def test_follow_symlinks_loop_to_itself_terminates(tmp_path):
    root = make_tree(tmp_path / "data", {"a/b/f.txt": "f"})
    os.symlink("../..", root / "a" / "b" / "up2")
    os.symlink(".", root / "a" / "self")
    os.symlink("a", root / "alias")  # not a loop: the same folder under another name
    got, reports, _ = collect(root, ScanOptions(follow_symlinks=True))
    assert set(got) == {b"a/b/f.txt", b"alias/b/f.txt"}
    loops = {p for p, reason in reports if "loop" in reason}
    assert {b"a/b/up2", b"a/self"} <= loops


# -- special files -------------------------------------------------------------------------

def test_fifo_is_skipped_with_a_report_and_does_not_hang(tmp_path):
    root = make_tree(tmp_path / "data", {"a.txt": "a", "z.txt": "z"})
    os.mkfifo(root / "pipe")
    os.mkfifo(root / "sub_pipe_dir_fifo")
    for follow in (False, True):
        got, reports, _ = collect(root, ScanOptions(follow_symlinks=follow))
        assert got == [b"a.txt", b"z.txt"]
        reported = dict(reports)
        assert "FIFO" in reported.get(b"pipe", "") and b"sub_pipe_dir_fifo" in reported


def test_fifo_does_not_hang_a_scan_into_the_ledger(tmp_path):
    root = make_tree(tmp_path / "data", {"a.txt": "a"})
    os.mkfifo(root / "pipe")
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        scan = run_scan(ledger, root)
        assert states(ledger) == {b"a.txt": "pending"}
        assert [p for p, _ in scan.reports] == [b"pipe"]
    finally:
        ledger.close()


# -- include / exclude ---------------------------------------------------------------------

FILTER_TREE = {"a.txt": "", "a.log": "", "docs/b.txt": "", "docs/b.md": "", "docs/deep/c.txt": "",
               "logs/x.log": "", "logs/sub/y.txt": "", "src/main.py": ""}


def test_include_without_slash_matches_the_name_in_any_folder(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    got = relpaths(root, ScanOptions(include=("*.txt",)))
    assert sorted(got) == [b"a.txt", b"docs/b.txt", b"docs/deep/c.txt", b"logs/sub/y.txt"]


def test_include_with_slash_matches_the_relpath(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    assert sorted(relpaths(root, ScanOptions(include=("docs/*.md",)))) == [b"docs/b.md"]
    # '*' crosses '/': docs/*.txt matches deeper files too.
    assert sorted(relpaths(root, ScanOptions(include=("docs/*.txt",)))) == [b"docs/b.txt", b"docs/deep/c.txt"]
    assert relpaths(root, ScanOptions(include=("b.txt/x",))) == []
    assert sorted(relpaths(root, ScanOptions(include=("**/c.txt",)))) == [b"docs/deep/c.txt"]


def test_several_includes_are_ored(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    assert sorted(relpaths(root, ScanOptions(include=("*.md", "src/*")))) == [b"docs/b.md", b"src/main.py"]


def test_exclude_by_name_and_by_path(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    assert sorted(relpaths(root, ScanOptions(exclude=("*.txt",)))) == \
        [b"a.log", b"docs/b.md", b"logs/x.log", b"src/main.py"]
    assert sorted(relpaths(root, ScanOptions(exclude=("docs/b.*",)))) == \
        [b"a.log", b"a.txt", b"docs/deep/c.txt", b"logs/sub/y.txt", b"logs/x.log", b"src/main.py"]


def test_exclude_wins_over_include(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    got = relpaths(root, ScanOptions(include=("*.txt",), exclude=("logs",)))
    assert sorted(got) == [b"a.txt", b"docs/b.txt", b"docs/deep/c.txt"]


def test_exclude_prunes_folders_without_entering_them(tmp_path):
    root = make_tree(tmp_path / "data", FILTER_TREE)
    os.mkfifo(root / "logs" / "sub" / "pipe")  # would be reported if the folder were walked
    got, reports, _ = collect(root, ScanOptions(exclude=("logs",)))
    assert not any(p.startswith(b"logs/") for p in got)
    assert reports == []
    got, reports, _ = collect(root, ScanOptions(exclude=("logs/sub",)))
    assert b"logs/x.log" in got and not any(p.startswith(b"logs/sub/") for p in got)
    assert reports == []
    got, reports, _ = collect(root, ScanOptions(exclude=("sub",)))  # a folder name at any depth
    assert b"logs/x.log" in got and reports == []


def test_path_filter_directly():
    f = PathFilter(include=["*.txt", "data/*.csv"], exclude=["tmp"])
    assert f.wants_file("x/y/z.txt", "z.txt")
    assert f.wants_file("data/a/b.csv", "b.csv")
    assert not f.wants_file("other/b.csv", "b.csv")
    assert not f.wants_file("x/tmp", "tmp")
    assert f.prunes_dir("a/tmp", "tmp")
    assert not f.prunes_dir("a/tmpx", "tmpx")
    everything = PathFilter([], [])
    assert everything.wants_file("any/thing", "thing") and not everything.prunes_dir("any", "any")


def test_filters_apply_to_non_utf8_names(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for name in (b"caf\xe9.txt", b"caf\xe9.log"):
        os.close(os.open(os.fsencode(root) + b"/" + name, os.O_WRONLY | os.O_CREAT, 0o644))
    assert relpaths(root, ScanOptions(include=("*.txt",))) == [b"caf\xe9.txt"]


# -- skip_dirs (OUT inside DATA_DIR) ---------------------------------------------------------

def test_skip_dirs_prunes_out_inside_data_dir(tmp_path):
    root = make_tree(tmp_path / "data", {"a.txt": "a", "out/ledger.db": "x", "out/results/00000/1.jsonl": "{}",
                                         "sub/out/keep.txt": "k"})
    options = ScanOptions(skip_dirs=frozenset({dir_id(root / "out")}))
    got, reports, _ = collect(root, options)
    assert sorted(got) == [b"a.txt", b"sub/out/keep.txt"]
    assert sorted(relpaths(root)) == [b"a.txt", b"out/ledger.db", b"out/results/00000/1.jsonl",
                                      b"sub/out/keep.txt"]


def test_skip_dirs_also_with_follow_symlinks(tmp_path):
    root = make_tree(tmp_path / "data", {"a.txt": "a", "out/ledger.db": "x"})
    os.symlink("out", root / "link_to_out")
    options = ScanOptions(follow_symlinks=True, skip_dirs=frozenset({dir_id(root / "out")}))
    assert relpaths(root, options) == [b"a.txt"]


def test_dir_id_of_missing_folder_is_none(tmp_path):
    assert dir_id(tmp_path / "missing") is None
    assert dir_id(tmp_path) == (os.stat(tmp_path).st_dev, os.stat(tmp_path).st_ino)


# -- Scan glue --------------------------------------------------------------------------------

def test_scan_feeds_ledger_in_slices_and_marks_vanished_files_gone(tmp_path):
    root = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x" * i for i in range(7)})
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        scan = run_scan(ledger, root, step=3)
        assert scan.files == 7 and scan.gone == 0
        assert set(states(ledger).values()) == {"pending"}
        size = dict(ledger.conn.execute("SELECT path_bytes, size FROM tasks"))
        assert size[b"f05.txt"] == 5
        (root / "f03.txt").unlink()
        (root / "f04.txt").write_text("changed")
        scan = run_scan(ledger, root, step=2)
        assert scan.files == 6 and scan.gone == 1
        assert states(ledger)[b"f03.txt"] == "gone"
        assert dict(ledger.conn.execute("SELECT path_bytes, size FROM tasks"))[b"f04.txt"] == 7
    finally:
        ledger.close()


def test_scan_of_empty_tree_finishes(tmp_path):
    (tmp_path / "data").mkdir()
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        scan = run_scan(ledger, tmp_path / "data")
        assert scan.files == 0 and ledger.counts()["pending"] == 0
    finally:
        ledger.close()


# -- unreadable folders -------------------------------------------------------------------------

def unreadable_scenario(base: str, mode: int = 0) -> dict:
    """Scan a tree, lock one folder (chmod `mode`: 000, or 444 to list it but stat nothing in
    it), scan again; report what happened."""
    base_path = Path(base)
    root = make_tree(base_path / "data", {"a.txt": "a", "locked/x.txt": "x", "locked/y/z.txt": "z",
                                          "gone.txt": "g", "locked_sibling.txt": "s", "locked_old.txt": "o"})
    ledger = Ledger(base_path / "ledger.db")
    try:
        run_scan(ledger, root)
        (root / "gone.txt").unlink()
        (root / "locked_old.txt").unlink()  # shares the prefix "locked", not the folder
        os.chmod(root / "locked", mode)
        try:
            readable = os.access(root / "locked", os.R_OK)
            walked, walk_reports, unreadable = collect(root)
            scan = run_scan(ledger, root)
        finally:
            os.chmod(root / "locked", 0o755)
        return {
            "readable_after_chmod": readable,
            "walked": [p.decode() for p in walked],
            "walk_reports": [[p.decode(), r] for p, r in walk_reports],
            "unreadable": [p.decode() for p in unreadable],
            "scan_reports": [p.decode() for p, _ in scan.reports],
            "gone": scan.gone,
            "states": {k.decode(): v for k, v in states(ledger).items()},
        }
    finally:
        ledger.close()


def unreadable_outcome(tmp_path: Path, mode: int) -> dict:
    """unreadable_scenario's outcome, in a child without DAC override when we are root."""
    probe = tmp_path / "probe"
    probe.mkdir()
    os.chmod(probe, 0)
    as_root = os.access(probe, os.R_OK)
    os.chmod(probe, 0o755)
    if not as_root:
        return unreadable_scenario(str(tmp_path), mode)
    # Root reads anything: run the scenario in a child without DAC override.
    script = ("import json, sys, test_scanner; "
              "print(json.dumps(test_scanner.unreadable_scenario(sys.argv[1], int(sys.argv[2]))))")
    try:
        proc = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(mode)], capture_output=True,
                              text=True, timeout=60, preexec_fn=drop_dac_capabilities,
                              cwd=Path(__file__).parent,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's DAC capabilities here: {exc}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_folder_whose_entries_cannot_be_stated_keeps_their_tasks(tmp_path):
    outcome = unreadable_outcome(tmp_path, 0o444)  # listable, but nothing in it can be stat'ed
    if outcome["readable_after_chmod"] and not outcome["walk_reports"]:
        pytest.skip("running with privileges that stat anything")
    assert sorted(outcome["walked"]) == ["a.txt", "locked_sibling.txt"]
    assert sorted(p for p, _ in outcome["walk_reports"]) == ["locked/x.txt", "locked/y"]
    assert all("cannot stat" in r for _, r in outcome["walk_reports"])
    assert outcome["gone"] == 2  # gone.txt and locked_old.txt only
    assert outcome["states"] == {"a.txt": "pending", "locked/x.txt": "pending", "locked/y/z.txt": "pending",
                                 "gone.txt": "gone", "locked_sibling.txt": "pending", "locked_old.txt": "gone"}


def test_unreadable_folder_is_reported_and_its_tasks_are_not_marked_gone(tmp_path):
    outcome = unreadable_outcome(tmp_path, 0)
    if outcome["readable_after_chmod"]:
        pytest.skip("running with privileges that read a chmod 000 folder")
    assert sorted(outcome["walked"]) == ["a.txt", "locked_sibling.txt"]
    assert [p for p, _ in outcome["walk_reports"]] == ["locked"]
    assert "cannot read" in outcome["walk_reports"][0][1]
    assert outcome["unreadable"] == ["locked/"]
    assert outcome["scan_reports"] == ["locked"]
    assert outcome["gone"] == 2
    assert outcome["states"] == {"a.txt": "pending", "locked/x.txt": "pending", "locked/y/z.txt": "pending",
                                 "gone.txt": "gone", "locked_sibling.txt": "pending", "locked_old.txt": "gone"}


# -- folders listed by helper processes ----------------------------------------------------

def helper_walk(root: Path, lister: HelperLister, options: ScanOptions | None = None) -> list:
    try:
        return [tuple(e) for e in walk(os.fsencode(root), options or ScanOptions(), lister=lister)]
    finally:
        lister.close()


def wide_tree(root: Path, folders: int = 60, files: int = 5) -> Path:
    return make_tree(root, {f"d{i:03d}/sub/f{j}.txt": "x" * (i + j) for i in range(folders) for j in range(files)})


def test_helpers_list_the_same_entries_as_the_walk_here(tmp_path):
    root = wide_tree(tmp_path / "data")
    with open(os.fsencode(root / "d007") + b"/b\xff\xfe.bin", "wb") as f:  # not UTF-8
        f.write(b"odd")
    here = [tuple(e) for e in walk(os.fsencode(root), ScanOptions(), lister=crawlproc.listing.LocalLister())]
    listed = HelperLister(3)
    listed.LOCAL_FOLDERS = 2
    assert helper_walk(root, listed) == here
    assert len(here) == 60 * 5 + 1


def test_a_helper_that_dies_mid_walk_leaves_its_folders_to_the_walk(tmp_path):
    root = wide_tree(tmp_path / "data")
    expected = [tuple(e) for e in walk(os.fsencode(root), ScanOptions(), lister=crawlproc.listing.LocalLister())]
    lister = HelperLister(2)
    lister.LOCAL_FOLDERS = 0
    files = walk(os.fsencode(root), ScanOptions(), lister=lister)
    seen = [tuple(next(files)) for _ in range(10)]
    for helper in lister._helpers:  # noqa: SLF001 - the test needs the real processes
        helper.process.kill()
        helper.process.wait(WALK_TIMEOUT)
    seen += [tuple(e) for e in files]
    lister.close()
    assert seen == expected


def test_long_folder_names_never_deadlock_the_helpers(tmp_path):
    # Requests of several KB each: more than a pipe buffer's worth is never left unanswered.
    name = "n" * 200
    files = {f"{i:02d}{name}/{name}/{name}/{name}/{name}/f.txt": "x" for i in range(40)}
    root = make_tree(tmp_path / "data", files)
    lister = HelperLister(2)
    lister.LOCAL_FOLDERS = 0
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(helper_walk(root, lister)), daemon=True)
    thread.start()
    thread.join(WALK_TIMEOUT)
    assert not thread.is_alive(), "walk with helpers did not finish: it hangs"
    assert len(outcome[0]) == 40


def test_a_scan_stops_its_helpers_when_it_finishes(tmp_path):
    root = wide_tree(tmp_path / "data")
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        scan = Scan(ledger, os.fsencode(root), ScanOptions(), lambda p, r: None, list_helpers=2)
        scan._lister.LOCAL_FOLDERS = 0  # noqa: SLF001
        scan.step(10)
        helpers = [h.process for h in scan._lister._helpers]  # noqa: SLF001
        assert len(helpers) == 2 and all(p.poll() is None for p in helpers)
        while not scan.finished:
            scan.step(100)
        assert scan.files == 300
        assert all(p.poll() is not None for p in helpers)
    finally:
        ledger.close()


def test_list_folder_reports_missing_and_unreadable_folders(tmp_path):
    assert list_folder(os.fsencode(tmp_path / "missing"))[0] == crawlproc.listing.VANISHED
    (tmp_path / "file").write_text("x")
    status, error = list_folder(os.fsencode(tmp_path / "file"))
    assert status == crawlproc.listing.UNREADABLE and "directory" in error.lower()


def test_folders_the_walk_has_passed_are_forgotten_even_with_listings_held(tmp_path):
    root = make_tree(tmp_path / "data", {f"a{i:02d}/b{j:02d}/f.txt": "x" for i in range(20) for j in range(20)})
    lister = HelperLister(2)
    lister.LOCAL_FOLDERS = 0
    lister.MAX_HELD_ENTRIES = 1  # as if a huge folder were waiting to be taken: nothing more is sent
    largest = 0
    try:
        for _ in walk(os.fsencode(root), ScanOptions(), lister=lister):
            largest = max(largest, len(lister._expected))  # noqa: SLF001 - the bound under test
    finally:
        lister.close()
    assert largest <= 2 * 20 + 1  # one folder's subfolders plus its parent's, never the whole tree
