"""Per-worker set-up for processors: @p.preload (once, before the workers fork) and @p.setup
(once per worker process, its teardown when the worker retires or stops), on real processes.

Each hook appends a line "<hook> <pid>" to a log file (O_APPEND: lines from several processes
never mix), so a test counts calls per process after the run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import make_tree, query_ledger, run_cli, wait_until
from test_run import write_processor

TIMEOUT = 120
WAIT_SECONDS = 60
MB = 1 << 20

HOOKED = '''
import os
import time
from crawlproc import processor


def note(params, what):
    with open(params["log"], "a") as log:
        log.write(f"{what} {os.getpid()}\\n")


@processor(version="1")
def hooked(task):
    release = task.params.get("release")
    deadline = time.monotonic() + 30
    while release and not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"path": task.relpath, "pid": os.getpid(), "context": task.context, "preloaded": task.preloaded}


@hooked.preload
def table(params):
    note(params, "preload")
    if params.get("fail") == "preload":
        raise ValueError("no table here")
    return "the table"


@hooked.setup
def connection(params, preloaded):
    note(params, "setup")
    if params.get("fail") == "setup":
        raise RuntimeError("cannot connect")
    yield {"pid": os.getpid(), "preloaded": preloaded}
    note(params, "teardown")
'''

# 2 workers read every page of one 500 MB preloaded array, then measure, together, the
# proportional set size (PSS) of both and of the server they forked from.
SHARED = '''
import os
import time
from crawlproc import processor

SIZE = 500 << 20


@processor(version="1")
def measure(task):
    data = task.preloaded
    assert data.count(b"\\2") == 0  # reads every page of it
    marks = task.params["marks"]
    open(os.path.join(marks, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(marks)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the other worker has read it too
    pids = sorted({int(name) for name in os.listdir(marks)} | {os.getppid()})
    return {"path": task.relpath, "pss_kb": {pid: kb(pid, "Pss") for pid in pids},
            "private_kb": kb(os.getpid(), "Private_Dirty") + kb(os.getpid(), "Private_Clean"),
            "server": os.getppid()}


def kb(pid, field):
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@measure.preload
def array(params):
    return b"\\1" * SIZE
'''


@pytest.fixture
def hooked(tmp_path: Path) -> str:
    return f"{write_processor(tmp_path, 'hooked', HOOKED)}:hooked"


def calls(log: Path) -> Counter:
    """(hook, pid) -> how many times it ran."""
    text = log.read_text() if log.exists() else ""
    return Counter(tuple(line.split()) for line in text.splitlines())


def pids_of(counts: Counter, hook: str) -> set[str]:
    return {pid for what, pid in counts if what == hook}


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]


def test_setup_runs_once_per_worker_and_its_teardown_when_it_retires(tmp_path, hooked):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(12)})
    out, log = tmp_path / "out", tmp_path / "hooks.log"
    result = run_cli("run", str(data), "-o", str(out), "-p", hooked, "-w", "1", "--max-tasks-per-child", "3",
                     "--batch-size", "1", "--param", f"log={log}", "--no-progress")
    assert result.returncode == 0, result.stderr
    counts = calls(log)
    setups, teardowns = pids_of(counts, "setup"), pids_of(counts, "teardown")
    assert all(n == 1 for n in counts.values()), counts  # once per process, never per task
    assert teardowns == setups and len(setups) >= 4  # 12 tasks, 3 per worker: recycled at least 3 times
    done = records(out)
    assert len(done) == 12 and {str(r["pid"]) for r in done} <= setups
    assert all(r["context"] == {"pid": r["pid"], "preloaded": "the table"} for r in done)
    assert all(r["preloaded"] == "the table" for r in done)
    (server,) = pids_of(counts, "preload")  # once, in the forkserver, for every worker it forked
    assert server not in setups


def test_teardown_runs_when_the_run_is_stopped_by_sigint(tmp_path, hooked):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(8)})
    out, log, release = tmp_path / "out", tmp_path / "hooks.log", tmp_path / "release"
    command = [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-p", hooked, "-w", "2",
               "--batch-size", "1", "--param", f"log={log}", "--param", f"release={release}", "--no-progress"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as run:
        try:
            wait_until(lambda: len(pids_of(calls(log), "setup")) == 2, WAIT_SECONDS, "both workers set up")
            wait_until(lambda: query_ledger(out, "SELECT 1 FROM tasks WHERE state = 'running'"), WAIT_SECONDS,
                       "tasks running")
            run.send_signal(signal.SIGINT)
        finally:
            release.touch()  # the tasks in flight end, well within the grace period
        assert run.wait(TIMEOUT) == 130, run.stderr.read()
    counts = calls(log)
    assert pids_of(counts, "teardown") == pids_of(counts, "setup") and len(pids_of(counts, "setup")) == 2


@pytest.mark.parametrize("hook, line", [
    ("setup", "setup connection failed in worker process"),
    ("preload", "preload table failed before the workers started"),
])
def test_a_failing_hook_stops_the_start_with_one_line_and_fails_no_task(tmp_path, hooked, hook, line):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(20)})
    out, log = tmp_path / "out", tmp_path / "hooks.log"
    result = run_cli("run", str(data), "-o", str(out), "-p", hooked, "-w", "2", "--param", f"log={log}",
                     "--param", f"fail={hook}", "--no-progress")
    assert result.returncode == 2, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert line in errors[0] and "hooked.py" in errors[0]
    assert ("RuntimeError: cannot connect" if hook == "setup" else "ValueError: no table here") in errors[0]
    assert query_ledger(out, "SELECT count(*) FROM tasks WHERE state IN ('failed', 'done') OR attempts > 0") == [(0,)]
    assert len(pids_of(calls(log), "setup")) <= 4  # not once per task


PICKY = '''
import sys
from crawlproc import processor

if getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", None) == "crawlproc.forkserver":
    raise ImportError("not importable in a worker process (as where its file is not shared)")


@processor(version="1")
def picky(task):
    return {"path": task.relpath}
'''


@pytest.mark.parametrize("executor", [[], ["--executor", "dask", "--scheduler", "local:1"]], ids=["local", "dask"])
def test_a_processor_the_workers_cannot_load_stops_the_start_with_one_line(tmp_path, executor):
    """The coordinator loads it, its workers cannot: on Dask, each worker process died before its
    first task and handed its batch back, for ever, with nothing said."""
    if executor:
        pytest.importorskip("distributed")
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(20)})
    out = tmp_path / "out"
    picky = f"{write_processor(tmp_path, 'picky', PICKY)}:picky"
    result = run_cli("run", str(data), "-o", str(out), "-p", picky, "-w", "2", *executor, "--no-progress", "-q")
    assert result.returncode == 2, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "processor" in errors[0] and "picky.py:picky cannot be loaded in worker process" in errors[0]
    assert "ImportError: not importable in a worker process" in errors[0]
    assert ("on Dask worker tcp://" in errors[0]) == bool(executor)
    assert query_ledger(out, "SELECT count(*) FROM tasks WHERE state IN ('failed', 'done') OR attempts > 0") == [(0,)]


DOOMED = '''
import os
import sys
from crawlproc import processor

if getattr(getattr(sys.modules["__main__"], "__spec__", None), "name", None) == "crawlproc.forkserver":
    if "DOOMED_SERVER" not in os.environ:  # the forkserver: its workers import this again, and die
        os.environ["DOOMED_SERVER"] = str(os.getpid())
        raise ImportError("not here")
    os._exit(3)


@processor(version="1")
def doomed(task):
    return {"path": task.relpath}
'''


def test_worker_processes_on_a_dask_worker_that_keep_dying_before_any_task_stop_the_run(tmp_path):
    """A death before any task blames no task and hands its batch back: on Dask that went on for
    ever; as locally, ten in a row stop the run."""
    pytest.importorskip("distributed")
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(20)})
    out = tmp_path / "out"
    doomed = f"{write_processor(tmp_path, 'doomed', DOOMED)}:doomed"
    result = run_cli("run", str(data), "-o", str(out), "-p", doomed, "--executor", "dask", "--scheduler", "local:1",
                     "--no-progress", "-q")
    assert result.returncode == 2, result.stderr
    assert "crawlproc worker processes keep dying here before running any task (worker exited with code 3)" \
        in result.stderr
    assert "on Dask worker tcp://" in result.stderr
    assert query_ledger(out, "SELECT count(*) FROM tasks WHERE state IN ('failed', 'done') OR attempts > 0") == [(0,)]


def test_workers_share_preloaded_data_instead_of_copying_it(tmp_path):
    """PSS counts a page shared by n processes as 1/n in each: the server and 2 workers that
    share a 500 MB array add up to about 500 MB; copies would make it 1.5 GB."""
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "x\n" for i in range(6)})
    (tmp_path / "marks").mkdir()
    shared = f"{write_processor(tmp_path, 'shared', SHARED)}:measure"
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "-p", shared, "-w", "2", "--batch-size", "1",
                     "--param", f"marks={tmp_path / 'marks'}", "--no-progress")
    assert result.returncode == 0, result.stderr
    measured = records(tmp_path / "out")
    together = [r for r in measured if len(r["pss_kb"]) == 3]  # both workers and the server, at once
    assert together, measured
    total_mb = max(sum(r["pss_kb"].values()) for r in together) / 1024
    print(f"PSS of the forkserver and 2 workers sharing a 500 MB preload: {total_mb:.0f} MB")
    assert 450 < total_mb < 650, total_mb
    assert max(r["private_kb"] for r in measured) / 1024 < 100  # no worker holds a copy of its own


def test_setup_runs_once_per_crawlproc_worker_process_on_dask(tmp_path, hooked):
    pytest.importorskip("distributed")
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": "x\n" for i in range(12)})
    out, log = tmp_path / "out", tmp_path / "hooks.log"
    result = run_cli("run", str(data), "-o", str(out), "-p", hooked, "--executor", "dask", "--scheduler", "local:1",
                     "--max-tasks-per-child", "4", "--batch-size", "2", "--param", f"log={log}", "--no-progress")
    assert result.returncode == 0, result.stderr
    counts = calls(log)
    setups = pids_of(counts, "setup")
    assert all(n == 1 for n in counts.values()), counts
    assert pids_of(counts, "teardown") == setups and 3 <= len(setups) < 12
    done = records(out)
    assert len(done) == 12 and all(r["context"]["pid"] == r["pid"] for r in done)
    assert {str(r["pid"]) for r in done} <= setups and os.getpid() not in {r["pid"] for r in done}
