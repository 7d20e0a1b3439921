"""`crawlproc watch`, end to end: real files, real watchdog events, a real subprocess.

Every test starts `python -m crawlproc watch DATA -o OUT` in the background and
talks to it only through the file system: it writes, renames and deletes files
under DATA, then polls the ledger (sqlite3 on OUT/ledger.db) or merged.jsonl
until a deadline. Nothing sleeps where a poll can say when it is time; the
sleeps left are part of what is tested (a slow writer pausing between pieces,
a temp file that must outlive rescans).
Every process is killed in a `finally`, whatever happens.

The processor (`record`, written into tmp_path) appends one line per call to
$WATCH_TEST_LOG, so "processed once" is counted on the processor's calls, not
guessed from the ledger; files named boom* raise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import crawlproc_patched, make_tree, run_cli, query_ledger

SETTLE = "0.5"
MERGE_INTERVAL = "0.3"
DEADLINE = 20.0  # seconds for any ordinary wait on the watcher
STOP_TIMEOUT = 30.0  # a signalled watch must have exited by then
BURST_FILES = 20_000
BURST_DEADLINE = 90.0

PROCESSOR_SOURCE = '''\
"""Processor for tests/test_watch.py: a record per file, a log line per call."""
import os
import time

from crawlproc import processor


@processor(version="1")
def record(task):
    data = task.read_bytes()
    delay = float(os.environ.get("WATCH_TEST_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    log = os.environ.get("WATCH_TEST_LOG")
    if log:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{task.relpath}\\t{len(data)}\\n".encode())
        finally:
            os.close(fd)
    if os.path.basename(task.relpath).startswith("boom"):
        raise ValueError(f"boom: {task.relpath}")
    return {"path": task.relpath, "bytes": len(data), "head": data[:64].decode("utf-8", "replace")}
'''


# -- helpers ----------------------------------------------------------------------

@pytest.fixture
def proc_spec(tmp_path: Path) -> str:
    path = tmp_path / "watch_processor.py"
    path.write_text(PROCESSOR_SOURCE)
    return f"{path}:record"


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    return data, tmp_path / "out"


class Watch:
    """A `crawlproc watch` subprocess; its stdout and stderr go to files in tmp_path.

    `prefix` goes before the command (a wrapper that execs it, keeping its pid)."""

    count = 0

    def __init__(self, data: Path, out: Path, processor: str, *args: str, sleep: float = 0.0,
                 settle: str = SETTLE, prefix: tuple[str, ...] = (), fallback_poll: float | None = None) -> None:
        Watch.count += 1
        self.out = out
        logs = data.parent  # beside DATA_DIR, never inside it
        self.log = logs / "calls.log"
        self.stderr_path = logs / f"watch-{Watch.count}.stderr"
        self.stdout_path = logs / f"watch-{Watch.count}.stdout"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "default",
               "WATCH_TEST_LOG": str(self.log), "WATCH_TEST_SLEEP": str(sleep)}
        # fallback_poll: seconds between the scans of a watch that fell back to polling by itself
        # (10 s for a user, who may choose with --poll), for the tests that would wait them out
        crawlproc = ([sys.executable, "-m", "crawlproc"] if fallback_poll is None else
                     crawlproc_patched("crawlproc.watch", DEFAULT_POLL_SECONDS=fallback_poll))
        cmd = [*prefix, *crawlproc, "watch", str(data), "-o", str(out), "-w", "2",
               "-p", processor, "--no-progress", "--settle", settle, "--merge-interval", MERGE_INTERVAL, *args]
        with open(self.stdout_path, "wb") as stdout, open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                         env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, signum: int = signal.SIGINT, *, group: bool = False) -> int:
        """Signal the watch (or its whole process group, like Ctrl-C) and wait for its exit code."""
        if group:
            os.killpg(self.pid, signum)
        else:
            os.kill(self.pid, signum)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"watch did not exit within {STOP_TIMEOUT}s of {signal.Signals(signum).name}:\n"
                        f"{self.stderr[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the watch and everything it started."""
        try:
            procs = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in [*procs]:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.kill()


def wait_until(predicate, what: str, timeout: float = DEADLINE, watch: Watch | None = None,
               interval: float = 0.05):
    """Poll `predicate` until it is true; fail (with the watch's stderr) at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if watch is not None and not watch.alive():
            pytest.fail(f"watch exited ({watch.proc.returncode}) while waiting for {what}:\n{watch.stderr[-3000:]}")
        if time.monotonic() > deadline:
            tail = f"\nwatch stderr:\n{watch.stderr[-3000:]}" if watch is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(interval)


query = query_ledger


def task(out: Path, relpath: str) -> dict | None:
    cols = ("state", "attempts", "size", "error", "finished_at")
    rows = query(out, f"SELECT {', '.join(cols)} FROM tasks WHERE relpath = ?", (relpath,))
    return dict(zip(cols, rows[0])) if rows else None


def state_of(out: Path, relpath: str) -> str | None:
    row = task(out, relpath)
    return row["state"] if row else None


def all_done(out: Path, relpaths) -> bool:
    wanted = set(relpaths)
    done = {r for (r,) in query(out, "SELECT relpath FROM tasks WHERE state = 'done'")}
    return wanted <= done


def ledger_paths(out: Path) -> set[str]:
    return {r for (r,) in query(out, "SELECT relpath FROM tasks")}


def merged(out: Path) -> dict[str, dict]:
    """merged.jsonl by path; asserts that no path appears twice."""
    path = out / "merged.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()]
    paths = [r["path"] for r in records]
    duplicated = sorted(p for p, n in Counter(paths).items() if n > 1)
    assert not duplicated, f"paths twice in merged.jsonl: {duplicated[:10]}"
    assert paths == sorted(paths), "merged.jsonl is not in path order"
    return {r["path"]: r for r in records}


def calls(log: Path) -> Counter:
    """How many times the processor ran on each relpath."""
    if not log.exists():
        return Counter()
    return Counter(line.split("\t")[0] for line in log.read_text().splitlines())


def call_sizes(log: Path, relpath: str) -> list[int]:
    return [int(line.split("\t")[1]) for line in log.read_text().splitlines()
            if line.split("\t")[0] == relpath]


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def assert_clean_stderr(text: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    assert "Warning" not in text.replace("WARNING", ""), text[-3000:]


def status_json(out: Path) -> dict:
    result = run_cli("status", "-o", str(out), "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def write_file(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def started(watch: Watch, data: Path, name: str = "_started.txt") -> None:
    """Wait until the watch follows events: a file written now gets processed."""
    write_file(data / name, "ping\n")
    wait_until(lambda: state_of(watch.out, name) == "done", f"{name} to be processed", watch=watch)


# -- 1. catch-up ------------------------------------------------------------------

def test_catch_up_on_start_and_after_downtime(dirs, proc_spec):
    data, out = dirs
    make_tree(data, {"a.txt": "one\n", "sub/b.txt": "two two\n", "sub/deep/c.txt": "three\n"})
    with Watch(data, out, proc_spec) as w:
        wait_until(lambda: all_done(out, ["a.txt", "sub/b.txt", "sub/deep/c.txt"]), "catch-up", watch=w)
        wait_until(lambda: set(merged(out)) == {"a.txt", "sub/b.txt", "sub/deep/c.txt"}, "merged", watch=w)
        assert w.stop() == 0
    # While it is down: one new file, one new folder, one changed, one deleted.
    write_file(data / "d.txt", "four\n")
    write_file(data / "new/e.txt", "five\n")
    write_file(data / "a.txt", "one changed\n")
    (data / "sub/b.txt").unlink()
    with Watch(data, out, proc_spec) as w:
        wanted = {"a.txt", "sub/deep/c.txt", "d.txt", "new/e.txt"}
        wait_until(lambda: set(merged(out)) == wanted and merged(out)["a.txt"]["bytes"] == 12,
                   "the second catch-up in merged.jsonl", watch=w)
        assert state_of(out, "sub/b.txt") == "gone"
        assert w.stop() == 0
    assert calls(w.log) == Counter({"a.txt": 2, "sub/b.txt": 1, "sub/deep/c.txt": 1, "d.txt": 1, "new/e.txt": 1})


# -- 2. settling -------------------------------------------------------------------

def test_new_files_are_processed_once_and_whole(dirs, proc_spec):
    data, out = dirs
    # --settle 1, not 0.5: the writer's 0.3 s pauses stay well under it on a loaded machine.
    with Watch(data, out, proc_spec, settle="1") as w:
        started(w, data)
        write_file(data / "quick.txt", "written at once\n")
        # A slow writer through ONE handle: pieces 0.3 s apart (less than --settle), then close.
        pieces = [f"piece {i} ".encode() * 50 + b"\n" for i in range(6)]
        with open(data / "slow.txt", "wb") as f:
            for piece in pieces:
                f.write(piece)
                f.flush()
                time.sleep(0.3)
            assert state_of(out, "slow.txt") is None, "a file still being written became a task"
        size = sum(map(len, pieces))
        wait_until(lambda: all_done(out, ["quick.txt", "slow.txt"]), "both files processed", watch=w)
        wait_until(lambda: {"quick.txt", "slow.txt"} <= set(merged(out)), "merged", watch=w)
        assert merged(out)["slow.txt"]["bytes"] == size
        assert merged(out)["quick.txt"]["bytes"] == len("written at once\n")
        assert w.stop() == 0
    assert task(out, "slow.txt")["attempts"] == 1
    assert task(out, "quick.txt")["attempts"] == 1
    assert call_sizes(w.log, "slow.txt") == [size], "slow.txt was processed before it was complete"
    assert call_sizes(w.log, "quick.txt") == [16]


def test_settle_counts_from_the_last_change_when_no_close_is_seen(dirs, proc_spec):
    """--settle 2: a file seen without its close event (found by the catch-up scan,
    or still held open) is processed once it has been unchanged for 2 s: not before,
    and not twice as late."""
    data, out = dirs
    write_file(data / "early.txt", "written just before the watch started\n")
    early_mtime = (data / "early.txt").stat().st_mtime
    with Watch(data, out, proc_spec, settle="2") as w:
        wait_until(lambda: state_of(out, "early.txt") == "done", "early.txt processed", watch=w)
        with open(data / "open.txt", "wb") as f:
            f.write(b"held open\n")
            f.flush()
            open_mtime = (data / "open.txt").stat().st_mtime
            wait_until(lambda: state_of(out, "open.txt") == "done", "open.txt processed while open", watch=w)
        write_file(data / "after.txt", "after\n")  # events after open.txt's close are handled by now
        wait_until(lambda: state_of(out, "after.txt") == "done", "after.txt processed", watch=w)
        assert w.stop() == 0
    assert call_sizes(w.log, "open.txt") == [10], "closing an unchanged, settled file processed it again"
    early = task(out, "early.txt")["finished_at"] - early_mtime
    held = task(out, "open.txt")["finished_at"] - open_mtime
    seen = f"processed after the last write: early.txt {early:.2f}s, open.txt {held:.2f}s (--settle 2)"
    assert early >= 1.95 and held >= 1.95, seen
    assert early < 4.0 and held < 3.2, seen


# -- 3. temp names --------------------------------------------------------------------

TEMP_NAMES = {"x.part": "x.txt", ".y.txt.tmp": "y.txt", "z.txt.tmp": "z.txt"}


def test_write_then_rename_only_the_final_name_becomes_a_task(dirs, proc_spec):
    data, out = dirs
    with Watch(data, out, proc_spec, "--rescan-interval", "0.5") as w:
        started(w, data)
        for temp in TEMP_NAMES:
            write_file(data / temp, f"content of {temp}\n")
        # The temp files outlive --settle and two rescans (what is tested, not a wait for a result).
        time.sleep(1.2)
        write_file(data / "_later.txt", "later\n")
        wait_until(lambda: state_of(out, "_later.txt") == "done", "a file after the temp ones", watch=w)
        assert not set(TEMP_NAMES) & ledger_paths(out), "a temp name became a task"
        for temp, final in TEMP_NAMES.items():
            os.rename(data / temp, data / final)
        wait_until(lambda: set(TEMP_NAMES.values()) <= set(merged(out)), "the final names merged", watch=w)
        assert w.stop() == 0
    expected = {"_started.txt", "_later.txt", *TEMP_NAMES.values()}
    assert set(merged(out)) == expected
    assert merged(out)["y.txt"]["head"] == "content of .y.txt.tmp\n"
    assert ledger_paths(out) == expected, "a temp name became a task"
    assert calls(w.log) == Counter(expected)


# -- 4. filters --------------------------------------------------------------------

def test_include_and_exclude_apply_to_events(dirs, proc_spec, tmp_path):
    data, out = dirs
    (data / "keep").mkdir()
    staged = make_tree(tmp_path / "staging", {"skip/c.txt": "c\n", "inner/skip/d.txt": "d\n",
                                               "hidden/.cache/g.txt": "g\n", "moved/ok.txt": "ok\n",
                                               "moved/skip/h.txt": "h\n"})
    with Watch(data, out, proc_spec, "--include", "*.txt", "--exclude", "skip",
               "--exclude", "logs/old-*") as w:
        started(w, data)
        write_file(data / "a.txt", "a\n")
        write_file(data / "b.log", "b\n")
        write_file(data / "logs/old-e.txt", "e\n")
        write_file(data / "logs/new-f.txt", "f\n")
        os.rename(data / "b.log", data / "b2.log")  # a rename keeps the filter too
        write_file(data / "skip2/skip/i.txt", "i\n")  # an excluded folder made in place
        # Excluded folders that arrive whole (renamed in with their files), so the scan of
        # the new folder is what sees the files:
        os.rename(staged / "skip", data / "skip")  # excluded by name at the top
        os.rename(staged / "inner/skip", data / "keep/skip")  # ... and at any depth
        os.rename(staged / "hidden/.cache", data / ".cache")  # a dot-folder: watch's temp-name rule
        os.rename(staged / "moved", data / "moved")  # a wanted folder holding an excluded one
        write_file(data / "z.txt", "last\n")  # after the unwanted ones: they were seen by now
        wait_until(lambda: all_done(out, ["a.txt", "logs/new-f.txt", "moved/ok.txt", "z.txt"]), "wanted files",
                   watch=w)
        assert w.stop() == 0
    assert ledger_paths(out) == {"_started.txt", "a.txt", "logs/new-f.txt", "moved/ok.txt", "z.txt"}


def test_links_and_fifos_made_while_watching_follow_the_scan_rules(dirs, proc_spec, tmp_path):
    """A symlink or FIFO that appears while watch runs is judged as a scan judges it: without
    --follow-symlinks no link is taken (one to a file outside DATA_DIR was processed, its
    content read), and a FIFO is never handed to a worker (it blocked one until Ctrl-C)."""
    data, out = dirs
    outside = make_tree(tmp_path / "outside", {"secret.txt": "not yours\n"})
    with Watch(data, out, proc_spec) as w:
        started(w, data)
        write_file(data / "inside.txt", "inside\n")
        os.symlink(outside / "secret.txt", data / "link-out.txt")
        os.symlink(data / "inside.txt", data / "link-in.txt")
        os.mkfifo(data / "pipe.txt")  # last: once it is judged (after --settle), so are the links
        wait_until(lambda: "pipe.txt: not a regular file (FIFO)" in w.stderr, "the FIFO to be skipped", watch=w)
        wait_until(lambda: all_done(out, ["inside.txt"]), "the plain file", watch=w)
        assert w.stop() == 0
    assert ledger_paths(out) == {"_started.txt", "inside.txt"}


def test_with_follow_symlinks_watch_takes_links_inside_data_dir_only(dirs, proc_spec, tmp_path):
    data, out = dirs
    outside = make_tree(tmp_path / "outside", {"secret.txt": "not yours\n", "folder/s.txt": "s\n"})
    (data / "real").mkdir()
    with Watch(data, out, proc_spec, "--follow-symlinks") as w:
        started(w, data)
        write_file(data / "real/in.txt", "in\n")
        os.symlink(outside / "secret.txt", data / "link-out.txt")
        os.symlink(outside / "folder", data / "linked-out")
        os.symlink(data / "real/in.txt", data / "link-in.txt")
        os.symlink(data / "real", data / "linked-folder")
        os.symlink(data, data / "real/loop")  # a scan of it would take DATA_DIR in again, without end
        write_file(data / "z.txt", "last\n")
        wait_until(lambda: all_done(out, ["real/in.txt", "link-in.txt", "linked-folder/in.txt", "z.txt"]),
                   "the files and the links inside DATA_DIR", watch=w)
        wait_until(lambda: "real/loop: symlink loop" in w.stderr, "the loop to be skipped", watch=w)
        assert w.stop() == 0
    assert ledger_paths(out) == {"_started.txt", "real/in.txt", "link-in.txt", "linked-folder/in.txt", "z.txt"}
    assert merged(out)["link-in.txt"] == {**merged(out)["real/in.txt"], "path": "link-in.txt"}


# -- 5. changes, deletes, folders ----------------------------------------------------

def test_changed_deleted_and_new_folders(dirs, proc_spec, tmp_path):
    data, out = dirs
    with Watch(data, out, proc_spec) as w:
        started(w, data)
        write_file(data / "a.txt", "first\n")
        write_file(data / "b.txt", "to be deleted\n")
        wait_until(lambda: {"a.txt", "b.txt"} <= set(merged(out)), "a.txt and b.txt merged", watch=w)

        write_file(data / "a.txt", "second version, longer\n")
        wait_until(lambda: merged(out).get("a.txt", {}).get("bytes") == 23, "a.txt's record updated", watch=w)

        (data / "b.txt").unlink()
        wait_until(lambda: "b.txt" not in merged(out), "b.txt out of merged.jsonl", watch=w)
        assert state_of(out, "b.txt") == "gone"

        # A finished folder moved in at once (rename from outside DATA_DIR).
        staged = tmp_path / "staging"
        make_tree(staged, {f"m/n/f{i}.txt": f"moved {i}\n" for i in range(10)})
        os.rename(staged / "m", data / "m")
        # A folder tree copied in (folders created as the files are written).
        make_tree(staged, {f"c/d/g{i}.txt": f"copied {i}\n" for i in range(10)})
        shutil.copytree(staged / "c", data / "c")
        # `mkdir -p p/q && cp files p/q/`
        make_tree(staged, {f"loose/h{i}.txt": f"cp {i}\n" for i in range(10)})
        subprocess.run(f"mkdir -p '{data}/p/q' && cp '{staged}'/loose/* '{data}/p/q/'", shell=True,
                       check=True, timeout=30)
        folders = ([f"m/n/f{i}.txt" for i in range(10)] + [f"c/d/g{i}.txt" for i in range(10)]
                   + [f"p/q/h{i}.txt" for i in range(10)])
        wait_until(lambda: set(folders) <= set(merged(out)), "every file of the new folders merged", watch=w)

        # A folder renamed inside DATA_DIR: old paths gone, new ones processed.
        os.rename(data / "m", data / "m2")
        renamed = [f"m2/n/f{i}.txt" for i in range(10)]
        wait_until(lambda: set(renamed) <= set(merged(out)) and not any(p.startswith("m/") for p in merged(out)),
                   "the renamed folder in merged.jsonl under its new name only", watch=w)
        shutil.rmtree(data / "c")
        wait_until(lambda: not any(p.startswith("c/") for p in merged(out)), "a deleted folder's files out",
                   watch=w)
        assert w.stop() == 0
    final = merged(out)
    assert set(final) == {"_started.txt", "a.txt", *renamed, *(f"p/q/h{i}.txt" for i in range(10))}
    assert final["a.txt"]["head"] == "second version, longer\n"
    counted = calls(w.log)
    assert all(counted[p] == 1 for p in folders), {p: counted[p] for p in folders if counted[p] != 1}


# -- 6. a burst -------------------------------------------------------------------------

def test_burst_of_20000_files_all_processed_exactly_once(dirs, proc_spec):
    """SLOW, the longest test of this file: 11 s on an idle 2-core machine, ~20 s on a busy one.

    20,000 files as fast as Python can write them. Half arrive while the watch
    runs. The other half arrive while the coordinator is stopped (SIGSTOP), in
    folders it already watches: about 3 events per file overflow the inotify
    queue (/proc/sys/fs/inotify/max_queued_events, 16384 by default), and the
    files whose events were lost can only be found by the rescan the overflow
    triggers (the periodic rescan stays at its default of 300 s).
    """
    data, out = dirs
    half = BURST_FILES // 2
    with Watch(data, out, proc_spec, "-q") as w:
        for folder in ("a0", "a1", "b0", "b1"):
            write_file(data / f"burst/{folder}/_first.txt", "watched\n")
        wait_until(lambda: all_done(out, [f"burst/{f}/_first.txt" for f in ("a0", "a1", "b0", "b1")]),
                   "the burst folders watched", watch=w)

        def create(folders: tuple[str, ...]) -> list[str]:
            names = []
            for folder in folders:
                for i in range(half // len(folders)):
                    name = f"burst/{folder}/f{i:05d}.txt"
                    with open(data / name, "wb") as f:
                        f.write(b"%d\n" % i)
                    names.append(name)
            return names

        def done_under(prefix: str) -> int:
            rows = query(out, "SELECT count(*) FROM tasks WHERE state = 'done' AND relpath LIKE ? "
                              "AND relpath NOT LIKE '%/\\_first.txt' ESCAPE '\\'", (prefix + "%",))
            return rows[0][0] if rows else 0

        t0 = time.monotonic()
        names = create(("a0", "a1"))
        created_a = time.monotonic() - t0
        wait_until(lambda: done_under("burst/a") == half, f"{half} files done", timeout=BURST_DEADLINE,
                   watch=w, interval=0.2)
        took_a = time.monotonic() - t0

        os.kill(w.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            names += create(("b0", "b1"))
            created_b = time.monotonic() - t0
        finally:
            os.kill(w.pid, signal.SIGCONT)
        wait_until(lambda: done_under("burst/b") == half, f"{half} files done after an overflow",
                   timeout=BURST_DEADLINE, watch=w, interval=0.2)
        took_b = time.monotonic() - t0
        wait_until(lambda: sum(p.startswith("burst/") for p in merged(out)) == BURST_FILES + 4,
                   "all burst files in merged.jsonl", watch=w)
        assert w.stop() == 0
        stderr = w.stderr
    print(f"\nburst, running: {half} files created in {created_a:.1f}s, all done after {took_a:.1f}s; "
          f"stopped: {half} files created in {created_b:.1f}s, all done after {took_b:.1f}s")
    assert "inotify queue overflow" in stderr, f"no overflow was detected:\n{stderr[-3000:]}"
    assert {p for p in merged(out) if p.startswith("burst/") and not p.endswith("/_first.txt")} == set(names)
    counted = calls(w.log)
    wrong = [p for p in names if counted[p] != 1]
    assert not wrong, (f"{len(wrong)} burst files not processed exactly once, "
                       f"e.g. {[(p, counted[p]) for p in wrong[:5]]}")
    assert "Traceback" not in stderr, stderr[-3000:]


# -- 7. periodic merge and status ------------------------------------------------------

def test_merge_interval_and_status_while_watching(dirs, proc_spec):
    data, out = dirs
    with Watch(data, out, proc_spec) as w:
        started(w, data)
        for i in range(3):
            write_file(data / f"m{i}.txt", f"file {i}\n")
            wait_until(lambda: f"m{i}.txt" in merged(out), f"merged.jsonl refreshed with m{i}.txt", watch=w)
        assert (out / "summary.json").exists()
        assert w.alive()

        def watch_info() -> dict | None:
            info = status_json(out)["last_run"]["watch"]
            return info if info and info.get("last_event") else None

        info = wait_until(watch_info, "status --json to show the watcher with a last event", watch=w)
        status = status_json(out)
        assert status["running_pid"] == w.pid
        assert status["last_run"]["command"] == "watch" and status["last_run"]["finished"] is None
        assert isinstance(info["watching_since"], float) and info["watching_since"] <= time.time()
        assert isinstance(info["queue_depth"], int) and info["queue_depth"] >= 0
        assert info["watching_since"] <= info["last_event"] <= time.time()
        # Two files in quick succession, then quiet: status must show the second one's
        # event (the first one's turn may just have written the run's info).
        write_file(data / "later1.txt", "later\n")
        wait_until(lambda: state_of(out, "later1.txt") == "done", "later1.txt processed", watch=w, interval=0.01)
        t_write = time.time()
        write_file(data / "later2.txt", "later\n")
        wait_until(lambda: state_of(out, "later2.txt") == "done", "later2.txt processed", watch=w, interval=0.01)
        wait_until(lambda: (status_json(out)["last_run"]["watch"] or {}).get("last_event", 0) >= t_write,
                   "status to show the newest event once the watcher is quiet", timeout=5, watch=w)
        assert status_json(out)["last_run"]["done"] >= 6  # _started, m0-m2, later1, later2
        human = run_cli("status", "-o", str(out), timeout=30)
        assert human.returncode == 0 and "watching since" in human.stdout, human.stdout + human.stderr
        assert w.stop() == 0


# -- 8. stopping --------------------------------------------------------------------

@pytest.mark.parametrize("signum, group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["SIGINT-to-group", "SIGTERM"])
def test_signal_stops_with_exit_0_and_a_merged_output(dirs, proc_spec, signum, group):
    data, out = dirs
    make_tree(data, {f"f{i:03d}.txt": f"line {i}\n" for i in range(60)})
    with Watch(data, out, proc_spec, sleep=0.05) as w:
        # Stop while tasks are in flight: 60 files at 0.05 s each on 2 workers take ~1.5 s.
        wait_until(lambda: (query(out, "SELECT count(*) FROM tasks WHERE state = 'done'") or [(0,)])[0][0] >= 5,
                   "some tasks done", watch=w)
        rc = w.stop(signum, group=group)
        stderr = w.stderr
    assert rc == 0, stderr[-3000:]
    assert (out / "summary.json").exists()
    assert not temp_files(out), temp_files(out)
    states = dict(query(out, "SELECT relpath, state FROM tasks"))
    assert "running" not in states.values(), "in-flight tasks were neither finished nor handed back"
    assert set(merged(out)) == {r for r, s in states.items() if s == "done"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == len(merged(out))
    assert_clean_stderr(stderr)


def test_kill9_of_watch_then_run_finishes_the_job(dirs, proc_spec, tmp_path):
    data, out = dirs
    make_tree(data, {f"d{i % 5}/f{i:03d}.txt": f"{i} " * (i % 7 + 1) + "\n" for i in range(150)})
    with Watch(data, out, proc_spec, sleep=0.02) as w:
        wait_until(lambda: (query(out, "SELECT count(*) FROM tasks WHERE state = 'done'") or [(0,)])[0][0] >= 10,
                   "some tasks done", watch=w)
        make_tree(data, {f"late/g{i}.txt": f"late {i}\n" for i in range(20)})  # arrive while it runs
        wait_until(lambda: "late/g0.txt" in ledger_paths(out), "a late file recorded", watch=w)
        done_before = query(out, "SELECT count(*) FROM tasks WHERE state = 'done'")[0][0]
        assert done_before < 170, "everything was done before the kill: the test would prove nothing"
        os.kill(w.pid, signal.SIGKILL)
        w.proc.wait(timeout=STOP_TIMEOUT)
    resumed = run_cli("run", str(data), "-o", str(out), "-w", "2", "-p", proc_spec, "--no-progress", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    clean_out = tmp_path / "clean"
    clean = run_cli("run", str(data), "-o", str(clean_out), "-w", "2", "-p", proc_spec, "--no-progress",
                    timeout=120)
    assert clean.returncode == 0, clean.stderr
    assert len(merged(clean_out)) == 170
    assert (out / "merged.jsonl").read_bytes() == (clean_out / "merged.jsonl").read_bytes()


# -- 9. fault tolerance ------------------------------------------------------------------

def test_a_raising_task_fails_alone_and_watch_goes_on(dirs, proc_spec):
    data, out = dirs
    with Watch(data, out, proc_spec, "--retries", "1", "--retry-delay", "0") as w:
        started(w, data)
        write_file(data / "good1.txt", "fine\n")
        write_file(data / "boom.txt", "raises\n")
        write_file(data / "good2.txt", "fine too\n")
        wait_until(lambda: state_of(out, "boom.txt") == "failed", "boom.txt to fail", watch=w)
        write_file(data / "after.txt", "still watching\n")
        wait_until(lambda: all_done(out, ["good1.txt", "good2.txt", "after.txt"]), "the other files", watch=w)
        wait_until(lambda: "after.txt" in merged(out), "after.txt merged", watch=w)
        failures = json.loads(run_cli("failures", "-o", str(out), "--json", timeout=30).stdout)
        assert w.stop() == 0
    assert [(f["relpath"], f["attempts"]) for f in failures] == [("boom.txt", 2)]
    assert "ValueError" in failures[0]["error"] and "boom" in failures[0]["traceback"]
    assert calls(w.log)["boom.txt"] == 2
    assert set(merged(out)) == {"_started.txt", "good1.txt", "good2.txt", "after.txt"}


def test_retries_of_tasks_failed_a_moment_apart_each_come_due(dirs, proc_spec):
    """Failed a moment apart, their retries come due a moment apart: the watch claimed the first
    at its time and forgot the later ones, which waited, pending, for a new file or the next
    rescan (five minutes by default) to wake it."""
    data, out = dirs
    names = [f"boom{i}.txt" for i in range(8)]
    with Watch(data, out, proc_spec, "--retries", "2", "--retry-delay", "0.2", "--batch-size", "1",
               "--rescan-interval", "3600") as w:
        started(w, data)
        for name in names:
            write_file(data / name, f"raises {name}\n")
        wait_until(lambda: all(state_of(out, name) == "failed" for name in names), "every retry of every file",
                   watch=w)
        assert w.stop() == 0
    assert {name: calls(w.log)[name] for name in names} == dict.fromkeys(names, 3)


def test_a_watch_stopped_before_it_caught_up_says_what_is_left(dirs, proc_spec):
    """Exit 0 (a stop is how a watch ends) and '100 done ... of 1000 tasks', with no word that the
    rest is still to do."""
    data, out = dirs
    make_tree(data, {f"f{i:02d}.txt": f"{i}\n" for i in range(40)})
    with Watch(data, out, proc_spec, sleep=0.2) as w:  # a catch-up of 4 s at least
        wait_until(lambda: len(calls(w.log)) >= 2, "the catch-up to start", watch=w)
        assert w.stop() == 0
    pending = query(out, "SELECT count(*) FROM tasks WHERE state = 'pending'")[0][0]
    assert pending > 0, "the catch-up ended before the stop"
    assert f"{pending} tasks still to process: run the same command again to carry on" in w.stderr, w.stderr


def test_data_dir_moved_away_and_made_again_is_watched_again(dirs, proc_spec):
    """An inbox rotated by renaming its folder: file events stayed with the folder moved away, so
    files written into the new one waited, in silence, for the next rescan (five minutes)."""
    data, out = dirs
    with Watch(data, out, proc_spec, "--rescan-interval", "3600") as w:
        started(w, data)
        data.rename(data.parent / "data.old")
        data.mkdir()
        write_file(data / "fresh.txt", "in the new folder\n")
        wait_until(lambda: state_of(out, "fresh.txt") == "done", "a file of the new DATA_DIR", watch=w)
        wait_until(lambda: set(merged(out)) == {"fresh.txt"}, "the moved files to leave the output", watch=w)
        write_file(data / "later.txt", "by file events again\n")
        wait_until(lambda: state_of(out, "later.txt") == "done", "a file written after", watch=w)
        assert w.stop() == 0
    told = [line for line in w.stderr.splitlines() if "is another folder now" in line]
    assert len(told) == 1 and "instead of by file events" not in w.stderr, w.stderr


def test_data_dir_removed_is_said_and_watched_for(dirs, proc_spec):
    """Removed, DATA_DIR was said to be 'the file-event thread stopped', and polled for."""
    data, out = dirs
    with Watch(data, out, proc_spec, "--rescan-interval", "3600") as w:
        started(w, data)
        shutil.rmtree(data)
        wait_until(lambda: "is gone" in w.stderr, "the warning", watch=w)
        data.mkdir()
        write_file(data / "back.txt", "it came back\n")
        wait_until(lambda: state_of(out, "back.txt") == "done", "a file of DATA_DIR made again", watch=w)
        assert w.stop() == 0
    assert "file-event thread stopped" not in w.stderr and "instead of by file events" not in w.stderr, w.stderr
    assert "is back: watching it again" in w.stderr and "is another folder now" not in w.stderr, w.stderr


# -- 10. workers and the observer thread ------------------------------------------------------

def test_workers_are_forkserver_children_and_stderr_is_clean(dirs, proc_spec):
    data, out = dirs
    make_tree(data, {"a.txt": "a\n"})
    with Watch(data, out, proc_spec) as w:
        wait_until(lambda: state_of(out, "a.txt") == "done", "catch-up", watch=w)
        for i in range(20):
            write_file(data / f"n{i}.txt", f"{i}\n")
        wait_until(lambda: all_done(out, [f"n{i}.txt" for i in range(20)]), "new files", watch=w)
        coordinator = psutil.Process(w.pid)
        children = coordinator.children()
        cmdlines = [" ".join(c.cmdline()) for c in children]
        # Forked straight from the coordinator (which runs the observer thread), a worker
        # would carry its command line; forkserver workers are the server's children.
        assert not any("crawlproc" in c and "watch" in c for c in cmdlines), cmdlines
        server = [c for c, line in zip(children, cmdlines) if "forkserver" in line]
        assert server, cmdlines
        assert len(server[0].children()) >= 1
        assert w.stop() == 0
        stderr = w.stderr
    assert_clean_stderr(stderr)


def test_out_inside_data_dir_is_not_watched(tmp_path, proc_spec):
    data = tmp_path / "data"
    out = data / "crawl-out"
    make_tree(data, {"a.txt": "a\n"})
    with Watch(data, out, proc_spec) as w:
        wait_until(lambda: "a.txt" in merged(out), "catch-up merged", watch=w)
        write_file(data / "b.txt", "b\n")
        wait_until(lambda: "b.txt" in merged(out), "b.txt merged", watch=w)
        assert w.stop() == 0
    assert ledger_paths(out) == {"a.txt", "b.txt"}
