"""Fault tolerance, end to end: real processes, real signals, real crashes.

Every run is a `python -m crawlproc` subprocess; processors that misbehave on
purpose live in tests/crash_processors.py. Each wait has a deadline; nothing
sleeps where a poll can say when it is time. The long version is scripts/torture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import REPO, make_tree, query_ledger, run_cli, wait_until

PROCESSORS = REPO / "tests" / "crash_processors.py"
CRASHY = f"{PROCESSORS}:crashy"
SLOW = f"{PROCESSORS}:slow"
TORTURE = REPO / "scripts" / "torture.py"
RUN_TIMEOUT = 60  # no single crawlproc run of this file should come near it
SLOW_FILES = 40
SLOW_DELAY = "0.1"  # seconds per file of `slow` in the runs that get interrupted


# -- helpers --------------------------------------------------------------------

def env_with(**extra: str) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def start_run(data: Path, out: Path, *args: str, env: dict | None = None,
              new_session: bool = False) -> subprocess.Popen:
    """`crawlproc run DATA -o OUT ARGS` in the background (stdout/stderr captured)."""
    return subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or env_with(),
        start_new_session=new_session,
    )


def finish(proc: subprocess.Popen, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
    """Wait for a background run; returns (exit code, stderr)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.communicate()
        pytest.fail(f"crawlproc did not finish within {timeout}s")
    return proc.returncode, err


def crawl(data: Path, out: Path, *args: str, env: dict | None = None,
          timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return run_cli("run", str(data), "-o", str(out), "--no-progress", *args, timeout=timeout, env=env)


query = query_ledger


def states(out: Path) -> dict[str, str]:
    return dict(query(out, "SELECT relpath, state FROM tasks"))


def done_count(out: Path) -> int:
    rows = query(out, "SELECT count(*) FROM tasks WHERE state = 'done'")
    return rows[0][0] if rows else 0


def task_row(out: Path, relpath: str) -> dict:
    cols = ("state", "attempts", "error", "worker_pid", "finished_at")
    rows = query(out, f"SELECT {', '.join(cols)} FROM tasks WHERE relpath = ?", (relpath,))
    assert rows, f"{relpath} is not in the ledger"
    return dict(zip(cols, rows[0]))


def merged_paths(out: Path) -> list[str]:
    lines = (out / "merged.jsonl").read_text().splitlines()
    return [json.loads(line)["path"] for line in lines]


def assert_each_once(out: Path, expected: set[str]) -> None:
    """merged.jsonl holds exactly `expected`, each path once, in order."""
    paths = merged_paths(out)
    duplicated = sorted(p for p, n in Counter(paths).items() if n > 1)
    assert not duplicated, f"duplicated in merged output: {duplicated}"
    assert set(paths) == expected, (
        f"lost: {sorted(expected - set(paths))}, unexpected: {sorted(set(paths) - expected)}")
    assert paths == sorted(paths)


def integrity(out: Path) -> str:
    return query(out, "PRAGMA integrity_check")[0][0]


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


def assert_consistent(out: Path) -> None:
    """What any stop that let the coordinator commit must leave behind."""
    assert integrity(out) == "ok"
    running = [r for r, s in states(out).items() if s == "running"]
    assert not running, f"tasks left running after the coordinator exited: {running}"
    assert not temp_files(out), f"temp files left in OUT: {temp_files(out)}"
    done = {r for r, s in states(out).items() if s == "done"}
    assert_each_once(out, done)


def failures_json(out: Path) -> list[dict]:
    result = run_cli("failures", "-o", str(out), "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if _alive(p)]
    except psutil.NoSuchProcess:
        return []


def forkserver(coordinator: int) -> psutil.Process | None:
    try:
        children = psutil.Process(coordinator).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            pass
    return None


def workers(coordinator: int) -> list[psutil.Process]:
    """The live worker processes of a run: the forkserver's children."""
    server = forkserver(coordinator)
    if server is None:
        return []
    try:
        return [p for p in server.children() if _alive(p)]
    except psutil.NoSuchProcess:
        return []


def kill_a_worker(coordinator: int) -> bool:
    """SIGKILL one live worker of the run; False when there was none to kill."""
    for victim in workers(coordinator):
        try:
            victim.kill()
            return True
        except psutil.NoSuchProcess:
            continue
    return False


def _kill_tree(pid: int) -> None:
    """Clean up after a failed test: the run and everything it started."""
    procs = descendants(pid)
    try:
        procs.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


class PoolWatch:
    """Samples how many workers a run has alive at once, from another thread."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.most = 0
        self.pids: set[int] = set()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while self.proc.poll() is None:
            alive = workers(self.proc.pid)
            self.most = max(self.most, len(alive))
            self.pids.update(p.pid for p in alive)
            time.sleep(0.005)

    def join(self) -> None:
        self._thread.join(timeout=10)


# -- trees ------------------------------------------------------------------------

def plain_files(prefix: str, n: int) -> dict[str, str]:
    return {f"{prefix}{i:02d}.txt": f"line {i}\n" * (i + 1) for i in range(n)}


@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory) -> tuple[Path, bytes]:
    """40 files for `slow`, and the merged output of a clean, uninterrupted run over them."""
    root = tmp_path_factory.mktemp("slow")
    data = make_tree(root / "data", {f"d{i % 4}/f{i:02d}.txt": f"{i}\n" * i for i in range(SLOW_FILES)})
    out = root / "clean"
    result = crawl(data, out, "-p", SLOW, "-w", "2", env={"CRASHY_SLOW_SECONDS": "0"})
    assert result.returncode == 0, result.stderr
    return data, (out / "merged.jsonl").read_bytes()


SLOW_ENV = {"CRASHY_SLOW_SECONDS": SLOW_DELAY}
FAST_ENV = {"CRASHY_SLOW_SECONDS": "0"}


def resume_and_compare(data: Path, out: Path, clean: bytes) -> None:
    """The next plain `run` starts at once, finishes everything, and matches the clean run."""
    result = crawl(data, out, "-p", SLOW, "-w", "2", env=FAST_ENV)
    assert result.returncode != 3, f"OUT still locked after the run stopped: {result.stderr}"
    assert result.returncode == 0, result.stderr
    assert (out / "merged.jsonl").read_bytes() == clean
    assert set(states(out).values()) == {"done"}
    assert integrity(out) == "ok"
    assert not temp_files(out)


# -- 1. a crash fails only its own task -----------------------------------------------

CRASHES = {
    # file name: what the error must say
    "segfault.bin": "worker killed by SIGSEGV",
    "exit.bin": "worker exited with code 3",
    "sysexit.bin": "SystemExit",
    "raise.bin": "ValueError",
}


@pytest.mark.parametrize("name", list(CRASHES))
def test_crash_fails_only_its_task_after_retries(tmp_path, name):
    """The crash sits in the middle of a batch of 11: the 10 others are done once, unpenalised."""
    files = {**plain_files("a", 5), f"m/{name}": "boom\n", **plain_files("z", 5)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "1", "--batch-size", "11",
                   "--retries", "1", "--retry-delay", "0")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    crash = task_row(out, f"m/{name}")
    assert crash["state"] == "failed", crash
    assert crash["attempts"] == 2, crash
    assert CRASHES[name] in crash["error"]
    others = set(files) - {f"m/{name}"}
    assert_each_once(out, others)
    for relpath in others:
        row = task_row(out, relpath)
        assert (row["state"], row["attempts"]) == ("done", 1), (relpath, row)
    failed = failures_json(out)
    assert [(f["relpath"], f["attempts"]) for f in failed] == [(f"m/{name}", 2)]
    assert CRASHES[name] in failed[0]["error"]


@pytest.mark.parametrize("name", ["raise.bin", "sysexit.bin"])
def test_retry_due_at_once_is_not_forgotten(tmp_path, name):
    """--retry-delay 0: a failed attempt is due again at once; the run must not end with it pending.

    The failing task takes 0.7 s, longer than the pool's idle tick, so by the time it
    fails the pool has already found nothing more to claim (any run's tail looks so).
    """
    files = {**plain_files("a", 2), f"z/late-{name}": "x\n"}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "1", "--retry-delay", "0",
                   env={"CRASHY_SLOW_SECONDS": "0.7"})
    row = task_row(out, f"z/late-{name}")
    assert (row["state"], row["attempts"]) == ("failed", 2), row
    assert result.returncode == 1, result.stderr
    assert_each_once(out, set(plain_files("a", 2)))


def test_many_crashing_tasks_in_a_row_fail_only_themselves(tmp_path):
    """Twenty inputs that each segfault their worker: twenty failed tasks, not an aborted run."""
    files = {**{f"segfault{i:02d}": "x\n" for i in range(20)}, **plain_files("z", 10)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0")
    assert result.returncode == 1, result.stderr
    got = states(out)
    assert [r for r, s in got.items() if s != ("failed" if r.startswith("segfault") else "done")] == []
    assert_each_once(out, set(plain_files("z", 10)))


def test_systemexit_retires_workers_without_growing_the_pool(tmp_path):
    """Each SystemExit retires its worker; its successor replaces it, one for one."""
    files = {**{f"sysexit{i:02d}": "x\n" for i in range(40)}, **plain_files("n", 20)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", CRASHY, "-w", "2", "--retries", "0")
    watch = PoolWatch(proc)
    code, err = finish(proc)
    watch.join()
    assert code == 1, err
    assert watch.most <= 4, f"-w 2 had up to {watch.most} workers alive at once"
    assert len(failures_json(out)) == 40
    assert_each_once(out, set(plain_files("n", 20)))


# -- 2. --timeout -------------------------------------------------------------------------

def _marked_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if marker in (proc.info["cmdline"] or []) and _alive(proc):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def test_timeout_kills_the_hung_task_and_its_children(tmp_path):
    marker = f"crawlproc-test-{uuid.uuid4().hex}"
    files = {"hang.bin": "zzz\n", "spawn.bin": marker + "\n", **plain_files("ok", 6)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    started = time.monotonic()
    proc = start_run(data, out, "-p", CRASHY, "-w", "2", "--timeout", "1", "--retries", "0")
    try:
        wait_until(lambda: _marked_processes(marker) or proc.poll() is not None, 15,
                   "the processor of spawn.bin to start its child")
        code, err = finish(proc, timeout=30)
    finally:
        for child in _marked_processes(marker):
            child.kill()
    assert time.monotonic() - started < 20
    assert code == 1, err
    for name in ("hang.bin", "spawn.bin"):
        row = task_row(out, name)
        assert row["state"] == "failed", (name, row)
        assert "timed out" in row["error"], (name, row)
    assert_each_once(out, set(plain_files("ok", 6)))
    # The processor's own child shared the worker's process group: it went with it.
    wait_until(lambda: not _marked_processes(marker), 5, "the spawned grandchild to be killed")


# -- 3. recycling: memory and task limits ---------------------------------------------------

def test_memory_limit_recycles_workers_and_loses_nothing(tmp_path):
    files = {}
    for group in range(3):
        files[f"p{group}/leak.bin"] = "x\n"
        files.update(plain_files(f"p{group}/n", 6))
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", CRASHY, "-w", "1", "--max-memory-per-child", "200MB")
    watch = PoolWatch(proc)
    code, err = finish(proc)
    watch.join()
    assert code == 0, err
    assert_each_once(out, set(files))
    assert set(states(out).values()) == {"done"}
    rows = query(out, "SELECT relpath, worker_pid, finished_at, attempts FROM tasks")
    assert all(attempts == 1 for *_, attempts in rows)
    pids = {pid for _, pid, _, _ in rows}
    assert len(pids) >= 4, f"3 leaks with -w 1 need at least 4 workers, saw {len(pids)}"
    for group in range(3):
        leak = task_row(out, f"p{group}/leak.bin")
        later = [r for r, pid, at, _ in rows if pid == leak["worker_pid"] and at > leak["finished_at"]]
        assert not later, f"the worker that leaked on p{group}/leak.bin went on with {later}"
    assert watch.most <= 2, f"-w 1 had up to {watch.most} workers alive at once"


def test_task_limit_recycles_workers(tmp_path):
    files = plain_files("f", 50)
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-w", "2", "--max-tasks-per-child", "3")
    assert result.returncode == 0, result.stderr
    assert_each_once(out, set(files))
    per_worker = Counter(pid for (pid,) in query(out, "SELECT worker_pid FROM tasks WHERE state = 'done'"))
    assert len(per_worker) > 1
    assert len(per_worker) >= 17  # 50 tasks, at most 3 per worker
    assert max(per_worker.values()) <= 3, per_worker


def test_task_limit_recycling_keeps_the_pool_size(tmp_path):
    """-w 2: a retiring worker may overlap its successor (4 at most), never a growing crowd."""
    files = {f"slow{i:03d}": "x\n" for i in range(300)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", CRASHY, "-w", "2", "--max-tasks-per-child", "10",
                     env=env_with(CRASHY_SLOW_SECONDS="0.005"))
    watch = PoolWatch(proc)
    code, err = finish(proc)
    watch.join()
    assert code == 0, err
    assert_each_once(out, set(files))
    assert watch.most <= 4, f"-w 2 had up to {watch.most} workers alive at once"


# -- 4. records that are not JSON ---------------------------------------------------------------

def test_unserialisable_record_fails_its_task_with_a_clear_message(tmp_path):
    files = {"unserialisable.bin": "x\n", **plain_files("ok", 4)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0")
    assert result.returncode == 1, result.stderr
    row = task_row(out, "unserialisable.bin")
    assert row["state"] == "failed"
    assert "JSON" in row["error"], row["error"]
    assert_each_once(out, set(plain_files("ok", 4)))
    # Nothing half-written: the merged output is valid JSON lines.
    assert all(json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines())


# -- 5. kill -9 of the coordinator ---------------------------------------------------------------

@pytest.mark.parametrize("whole_group", [False, True], ids=["coordinator", "process-group"])
def test_kill9_coordinator_then_resume(tmp_path, slow_tree, whole_group):
    data, clean = slow_tree
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, "-w", "2", "--batch-size", "3",
                     env=env_with(**SLOW_ENV), new_session=True)
    try:
        wait_until(lambda: done_count(out) >= 6 or proc.poll() is not None, 30, "some tasks to be done")
        wait_until(lambda: len(workers(proc.pid)) == 2 or proc.poll() is not None, 10, "two workers")
        assert proc.poll() is None, "the run ended before it could be killed"
        family = descendants(proc.pid)  # forkserver, workers
        assert len(family) >= 3
        if whole_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # Orphaned workers notice the closed pipe and exit by themselves.
        wait_until(lambda: not [p for p in family if _alive(p)], 5,
                   "the dead coordinator's workers to exit by themselves")
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert 0 < done_count(out) < SLOW_FILES
    resume_and_compare(data, out, clean)


# -- 6. kill -9 of one worker ------------------------------------------------------------------------

def test_kill9_of_a_worker_retries_its_task(tmp_path, slow_tree):
    data, clean = slow_tree
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, "-w", "2", "--batch-size", "3", env=env_with(**SLOW_ENV))
    try:
        wait_until(lambda: done_count(out) >= 6 or proc.poll() is not None, 30, "some tasks to be done")
        # Kill as soon as a worker is seen: one that exits meanwhile (it recycled) is not one to kill.
        outcome = wait_until(lambda: "killed" if kill_a_worker(proc.pid) else "ended" if proc.poll() is not None
                             else None, 10, "a worker to kill")
        assert outcome == "killed", "the run ended before a worker could be killed"
        # status answers while the run goes on (retrying the killed worker's task)
        status = run_cli("status", "-o", str(out), "--json", timeout=30)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["total"] == SLOW_FILES
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert code == 0, err
    assert "SIGKILL" in err  # the death is reported
    assert (out / "merged.jsonl").read_bytes() == clean
    attempts = Counter(a for (a,) in query(out, "SELECT attempts FROM tasks"))
    # Exactly the task in the killed worker's slot (if it was inside one) paid an attempt.
    assert set(attempts) <= {1, 2} and attempts[2] <= 1, attempts
    assert not temp_files(out)


# -- 7. SIGINT / SIGTERM ----------------------------------------------------------------------------

@pytest.mark.parametrize("signum,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["SIGINT-to-group", "SIGTERM-to-coordinator", "SIGTERM-to-group"])
def test_signal_stops_gracefully_and_resumes(tmp_path, slow_tree, signum, to_group):
    data, clean = slow_tree
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, "-w", "2", "--batch-size", "2",
                     env=env_with(**SLOW_ENV), new_session=True)
    try:
        wait_until(lambda: done_count(out) >= 4 or proc.poll() is not None, 30, "some tasks to be done")
        assert proc.poll() is None, "the run ended before it could be interrupted"
        sent = time.monotonic()
        if to_group:
            os.killpg(proc.pid, signum)  # what Ctrl-C in a terminal, or `kill -TERM -PGID`, does
        else:
            os.kill(proc.pid, signum)
        code, err = finish(proc, timeout=30)
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert code == 130, err
    assert time.monotonic() - sent < 8  # in-flight batches (~0.4 s) finish well within the grace period
    assert "Traceback" not in err
    assert "resume" in err
    assert_consistent(out)
    assert done_count(out) < SLOW_FILES
    # The tasks in flight when the signal came were allowed to finish: none was charged.
    charged = query(out, "SELECT relpath, state, attempts, error FROM tasks WHERE error IS NOT NULL "
                         "OR attempts != (CASE state WHEN 'done' THEN 1 ELSE 0 END)")
    assert not charged, f"stopping the run charged tasks with a failed attempt: {charged}"
    resume_and_compare(data, out, clean)


def test_second_sigint_stops_at_once(tmp_path, slow_tree):
    data, clean = slow_tree
    out = tmp_path / "out"
    # Batches of 10 at 0.2 s per file: what is in flight would take ~4 s to finish.
    proc = start_run(data, out, "-p", SLOW, "-w", "2", "--batch-size", "10",
                     env=env_with(CRASHY_SLOW_SECONDS="0.2"), new_session=True)
    try:
        wait_until(lambda: len(workers(proc.pid)) == 2 or proc.poll() is not None, 30, "two workers")
        wait_until(lambda: query(out, "SELECT 1 FROM tasks WHERE state = 'running'") or proc.poll() is not None,
                   30, "tasks in flight")
        assert proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)  # the second Ctrl-C of an impatient user
        second = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        code, err = finish(proc, timeout=30)
        stopped_in = time.monotonic() - second
    finally:
        if proc.poll() is None:
            _kill_tree(proc.pid)
    assert code == 130, err
    assert stopped_in < 2, f"a second SIGINT took {stopped_in:.1f}s to stop the run"
    assert "Traceback" not in err
    assert_consistent(out)
    resume_and_compare(data, out, clean)


# -- 8. failure budget --------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,raising", [("2", 5), ("10%", 10)])
def test_failure_budget_stops_early(tmp_path, budget, raising):
    files = {**{f"raise{i:02d}": "x\n" for i in range(raising)},
             **{f"slow{i:02d}": "y\n" for i in range(40)}}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "2", "--batch-size", "2", "--retries", "0",
                   "--max-failures", budget, env={"CRASHY_SLOW_SECONDS": SLOW_DELAY})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    got = states(out)
    failed = [r for r, s in got.items() if s == "failed"]
    assert len(failed) > (2 if budget == "2" else 0.1 * len(files))
    assert all(r.startswith("raise") for r in failed)
    assert Counter(got.values())["done"] < 40, "the run did not stop early"
    assert_consistent(out)


def test_failure_budget_not_exceeded_runs_to_the_end(tmp_path):
    files = {**{f"raise{i:02d}": "x\n" for i in range(2)}, **plain_files("ok", 38)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "2", "--retries", "0", "--max-failures", "10%")
    assert result.returncode == 1, result.stderr
    assert Counter(states(out).values()) == {"done": 38, "failed": 2}


# -- 9. bad input: unreadable and vanished files --------------------------------------------------------

def _unprivileged_prefix() -> list[str] | None:
    """A command prefix under which file permissions apply; None if there is none.

    Root reads a mode-000 file anyway (CAP_DAC_OVERRIDE); setpriv drops that
    capability (and CAP_DAC_READ_SEARCH) for the run and everything it starts.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_unreadable_file_fails_with_permission_denied(tmp_path):
    prefix = _unprivileged_prefix()
    if prefix is None:
        pytest.skip("running as root without setpriv: a mode-000 file stays readable")
    data = make_tree(tmp_path / "data", {"secret.txt": "no\n", **plain_files("ok", 3)})
    out = tmp_path / "out"
    (data / "secret.txt").chmod(0)
    try:
        readable = subprocess.run(
            [*prefix, sys.executable, "-c", "import os, sys; sys.exit(os.access(sys.argv[1], os.R_OK))",
             str(data / "secret.txt")], timeout=30).returncode
        if readable:
            pytest.skip("this user can read a file with mode 000")
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress",
             "-w", "1", "--retries", "0"],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env_with())
    finally:
        (data / "secret.txt").chmod(0o644)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    row = task_row(out, "secret.txt")
    assert row["state"] == "failed"
    assert "Permission denied" in row["error"], row["error"]
    assert_each_once(out, set(plain_files("ok", 3)))
    assert [f["relpath"] for f in failures_json(out)] == ["secret.txt"]


def test_file_deleted_before_processing_ends_gone(tmp_path):
    # deleter.txt is processed before victim.txt (merge order) and deletes it.
    files = {"deleter.txt": "victim.txt\n", "victim.txt": "soon gone\n", **plain_files("z", 3)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0")
    assert result.returncode == 0, result.stderr
    assert task_row(out, "victim.txt")["state"] == "gone"
    assert failures_json(out) == []
    assert_each_once(out, {"deleter.txt", *plain_files("z", 3)})


# -- 10. retry --failed ----------------------------------------------------------------------------------

def test_retry_failed_then_rerun_processes_it_again(tmp_path):
    files = {"raise.txt": "x\n", **plain_files("ok", 3)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    first = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0")
    assert first.returncode == 1, first.stderr
    assert task_row(out, "raise.txt")["state"] == "failed"
    # A plain rerun leaves it failed (and says so), even though it would now succeed.
    again = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0", env={"CRASHY_NO_RAISE": "1"})
    assert again.returncode == 1, again.stderr
    assert task_row(out, "raise.txt")["state"] == "failed"
    retry = run_cli("retry", "-o", str(out), "--failed", timeout=30)
    assert retry.returncode == 0, retry.stderr
    assert task_row(out, "raise.txt")["state"] == "pending"
    final = crawl(data, out, "-p", CRASHY, "-w", "1", "--retries", "0", env={"CRASHY_NO_RAISE": "1"})
    assert final.returncode == 0, final.stderr
    assert task_row(out, "raise.txt")["state"] == "done"
    assert_each_once(out, set(files))
    assert failures_json(out) == []


# -- the torture script, short --------------------------------------------------------------------------

def test_torture_short(tmp_path):
    result = subprocess.run(
        [sys.executable, str(TORTURE), "--files", "300", "--coordinator-kills", "3", "--worker-kills", "5",
         "--seed", "7", "--workdir", str(tmp_path / "torture")],
        capture_output=True, text=True, timeout=120, env=env_with())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout
