"""`--executor dask`, end to end, on a real Dask LocalCluster of worker processes (with nannies).

One cluster serves the whole module (its workers take seconds to start); a test that must kill the
scheduler starts a cluster of its own, as separate `dask scheduler` / `dask worker` processes.
Every run is a real `python -m crawlproc` subprocess; outputs are compared byte for byte with a
local run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import REPO, crawlproc_patched, make_tree, query_ledger, run_cli, wait_until

pytest.importorskip("distributed")

PROCESSORS = REPO / "tests" / "crash_processors.py"
CRASHY = f"{PROCESSORS}:crashy"
SLOW = f"{PROCESSORS}:slow"
GATED = f"{REPO / 'tests' / 'gated_processor.py'}:gated"  # tasks wait until a file the test makes exists
SLOW_SECONDS = "0.05"  # `slow` per file, here and on the cluster's workers (they inherit it)
ENV = {"CRASHY_SLOW_SECONDS": SLOW_SECONDS}


class Cluster:
    """A Dask scheduler and workers as processes of their own (not threads of the test process:
    a Dask client here would leave threads behind, and later tests fork)."""

    def __init__(self, root: Path, workers: int, *, nanny: bool = True) -> None:
        self.env = {**os.environ, **ENV}  # the workers inherit CRASHY_SLOW_SECONDS
        scheduler_file = root / "scheduler.json"
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)]
        wait_until(lambda: scheduler_file.exists() and scheduler_file.stat().st_size, 60, "the scheduler")
        self.scheduler_address = json.loads(scheduler_file.read_text())["address"]
        self.procs.append(self.add_worker("--nworkers", str(workers), *(() if nanny else ("--no-nanny",))))
        self.wait_for_workers(workers)

    def add_worker(self, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler_address,
             "--nthreads", "1", "--no-dashboard", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)

    @property
    def scheduler(self) -> subprocess.Popen:
        return self.procs[0]

    def workers(self) -> dict[str, dict]:
        """Dask worker address -> {name, pid}, asked of the scheduler by a short-lived client."""
        code = ("import json, os, sys; from distributed import Client\n"
                "with Client(sys.argv[1], timeout=30) as c:\n"
                "    pids = c.run(os.getpid)\n"
                "    info = c.scheduler_info()['workers']\n"
                "    print(json.dumps({a: {'name': str(w.get('name')), 'pid': pids.get(a)} for a, w in info.items()}))")
        result = subprocess.run([sys.executable, "-c", code, self.scheduler_address], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for_workers(self, n: int) -> None:
        wait_until(lambda: len(self.workers()) == n, 90, f"{n} Dask workers")

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """2 Dask worker processes (with nannies), 1 thread each, for the module."""
    lc = Cluster(tmp_path_factory.mktemp("dask"), 2)
    yield lc
    lc.close()


def crawl(data: Path, out: Path, *args: str, timeout: float = 120,
          sleep: str = SLOW_SECONDS) -> subprocess.CompletedProcess:
    """`crawlproc run`; `sleep`: `slow`'s time per file in a local run (the records are the same)."""
    return run_cli("run", str(data), "-o", str(out), "--no-progress", *args, env={"CRASHY_SLOW_SECONDS": sleep},
                   timeout=timeout)


def dask_args(cluster: Cluster) -> list[str]:
    return ["--executor", "dask", "--scheduler", cluster.scheduler_address]


SHORT_WAITS = 3.0  # seconds, for a run that must reach its scheduler first


def crawlproc_command(*args: str, waits: float | None = None) -> list[str]:
    """The command line of `crawlproc ARGS`; with `waits`, the Dask executor's waits (10 s to
    reach a scheduler, or to reconnect to one that went away; 60 s for a first worker) cut to
    that many seconds, and the cluster's workers read every half second (5 s): for the tests
    that would wait them out."""
    if waits is None:
        return [sys.executable, "-m", "crawlproc", *args]
    return [*crawlproc_patched("crawlproc.executors.dask", CONNECT_SECONDS=waits, CONNECT_GRACE_SECONDS=waits,
                               WORKERS_SECONDS=waits, WORKERS_REFRESH_SECONDS=0.5), *args]


def start_run(data: Path, out: Path, *args: str, waits: float | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        crawlproc_command("run", str(data), "-o", str(out), "--no-progress", *args, waits=waits),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"crawlproc did not finish within {timeout}s")
    return proc.returncode, err


def states(out: Path) -> dict[str, tuple]:
    return {r[0]: r[1:] for r in query_ledger(out, "SELECT relpath, state, attempts, error FROM tasks")}


def done_count(out: Path) -> int:
    rows = query_ledger(out, "SELECT count(*) FROM tasks WHERE state = 'done'")
    return rows[0][0] if rows else 0


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def status_json(out: Path) -> dict:
    result = run_cli("status", "-o", str(out), "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def failures_json(out: Path) -> list[dict]:
    result = run_cli("failures", "-o", str(out), "--json", timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def text_tree(root: Path, n: int = 120) -> Path:
    return make_tree(root, {f"d{i % 5}/f{i:03d}.txt": f"line {i} word\n" * (i % 13 + 1) for i in range(n)})


def assert_no_leftovers(out: Path) -> None:
    assert query_ledger(out, "PRAGMA integrity_check")[0][0] == "ok"
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")], "temp files left in OUT"


# -- 1. the same output as a local run ----------------------------------------------------------

@pytest.mark.parametrize("chunked", [False, True])
def test_output_matches_a_local_run(tmp_path, cluster, chunked):
    data = text_tree(tmp_path / "data")
    make_tree(data, {"big.txt": "".join(f"row {i} a b c\n" for i in range(4000)), "empty.txt": "",
                     "raise.bin": "x\n"})
    extra = ["-p", CRASHY, "--retries", "0"] + (["--chunk-size", "8KB"] if chunked else [])
    local = crawl(data, tmp_path / "local", "-w", "2", *extra)
    remote = crawl(data, tmp_path / "dask", *dask_args(cluster), *extra)
    assert local.returncode == remote.returncode == 1, remote.stderr  # raise.bin fails in both
    assert "Traceback" not in remote.stderr
    assert (tmp_path / "dask" / "merged.jsonl").read_bytes() == (tmp_path / "local" / "merged.jsonl").read_bytes()
    assert status_json(tmp_path / "dask")["counts"] == status_json(tmp_path / "local")["counts"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "traceback"} for r in rows]  # noqa: E731
    assert strip(failures_json(tmp_path / "dask")) == strip(failures_json(tmp_path / "local"))
    if chunked:
        assert query_ledger(tmp_path / "dask", "SELECT count(*) FROM tasks WHERE length IS NOT NULL")[0][0] > 1


def test_tiny_tasks_go_to_the_cluster_in_groups_of_batches(tmp_path, cluster):
    """Batches of tiny tasks (here 5 of them, well under a millisecond) would each cost a scheduler
    round trip: one Dask task runs a group of them, about 0.5 s of work, each batch with its own
    result file; the output is a local run's."""
    data = text_tree(tmp_path / "data", 600)
    local = crawl(data, tmp_path / "local", "-w", "2", "--batch-size", "5")
    remote = crawl(data, tmp_path / "dask", *dask_args(cluster), "--batch-size", "5")
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert (tmp_path / "dask" / "merged.jsonl").read_bytes() == (tmp_path / "local" / "merged.jsonl").read_bytes()
    batches = query_ledger(tmp_path / "dask", "SELECT count(DISTINCT batch_id) FROM tasks")[0][0]
    assert batches >= 120
    assert len(list((tmp_path / "dask" / "results").rglob("*.jsonl"))) == batches  # a result file per batch
    dask_tasks = status_json(tmp_path / "dask")["last_run"]["executor"]["dask_tasks"]
    assert 1 <= dask_tasks <= batches // 2, (dask_tasks, batches)
    shown = run_cli("status", "-o", str(tmp_path / "dask"), timeout=30)  # for people too, once finished
    assert f"on dask at {cluster.scheduler_address}: 2 workers, 2 threads, {dask_tasks} Dask task" in shown.stdout
    assert_no_leftovers(tmp_path / "dask")


def test_a_run_follows_the_workers_that_join_and_leave(tmp_path, cluster):
    """The cluster's size was read once: a worker that joined got no more work in flight, and
    status showed the start's size for the whole run, with no word of who came or went; -w,
    which sizes no cluster of the user's own, was taken in silence."""
    data = make_tree(tmp_path / "data", {**{f"f{i:02d}.txt": "x\n" for i in range(8)}, "last.txt": "y\n"})
    gate, last_gate, out = tmp_path / "gate", tmp_path / "last_gate", tmp_path / "out"
    gate.touch()  # every task but last.txt goes through
    proc = start_run(data, out, "-p", GATED, "--param", f"gate={gate}", "--param", f"last_gate={last_gate}",
                     *dask_args(cluster), "-w", "7", waits=SHORT_WAITS)

    def workers_shown() -> int | None:
        return ((status_json(out).get("last_run") or {}).get("executor") or {}).get("workers")

    try:
        # Tasks are done a Dask task (a group of batches) at a time: last.txt's keeps the run going.
        wait_until(lambda: done_count(out) > 0 or proc.poll() is not None, 90, "a task done on the cluster")
        assert proc.poll() is None, "the run ended before the cluster changed"
        extra = cluster.add_worker()
        try:
            wait_until(lambda: workers_shown() == 3, 90, "the run to see the worker that joined")
        finally:
            extra.kill()
            extra.wait(30)
        wait_until(lambda: workers_shown() == 2, 90, "the run to see it leave")
        last_gate.touch()
        code, err = finish(proc)
    finally:
        last_gate.touch()
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert "2 workers, 2 threads (-w 7 does not size a cluster of your own)" in err, err  # it sized nothing
    assert "joined the cluster (3 workers, 3 threads now)" in err, err
    assert "left the cluster; its batches go to the others (2 workers, 2 threads now)" in err, err
    assert done_count(out) == 9
    cluster.wait_for_workers(2)


def test_reducer_summary_matches_a_local_run(tmp_path, cluster):
    data = text_tree(tmp_path / "data", 200)
    assert crawl(data, tmp_path / "local", "-w", "2").returncode == 0
    result = crawl(data, tmp_path / "dask", *dask_args(cluster))
    assert result.returncode == 0, result.stderr
    assert summary(tmp_path / "dask")["reduced"] == summary(tmp_path / "local")["reduced"]
    assert (tmp_path / "dask" / "merged.jsonl").read_bytes() == (tmp_path / "local" / "merged.jsonl").read_bytes()


def slow_tree_and_clean_run(tmp_path: Path, n: int = 160) -> tuple[Path, bytes]:
    """A tree for `slow`, and the merged output of a clean local run over it."""
    data = make_tree(tmp_path / "data", {f"s{i:03d}.txt": f"{i}\n" * i for i in range(n)})
    return data, clean_output(data, tmp_path / "clean")


def clean_output(data: Path, out: Path) -> bytes:
    """The merged output of a clean local `slow` run, made without its sleep (same records)."""
    clean = run_cli("run", str(data), "-o", str(out), "--no-progress", "-p", SLOW, "-w", "2",
                    env={"CRASHY_SLOW_SECONDS": "0"})
    assert clean.returncode == 0, clean.stderr
    return (out / "merged.jsonl").read_bytes()


def start_and_wait(data: Path, out: Path, args: list[str], done: int, *,
                   waits: float | None = None) -> subprocess.Popen:
    """A `slow` run in the background, once `done` tasks are done (and it still runs)."""
    proc = start_run(data, out, "-p", SLOW, *args, "--batch-size", "4", waits=waits)
    try:
        wait_until(lambda: done_count(out) >= done or proc.poll() is not None, 90, "tasks done on the cluster")
        assert proc.poll() is None, "the run ended before it could be disturbed"
    except BaseException:
        proc.kill()
        raise
    return proc


# -- 2. kill -9 of a Dask worker ------------------------------------------------------------------

def test_kill9_of_a_dask_worker_loses_nothing(tmp_path, cluster):
    data, clean = slow_tree_and_clean_run(tmp_path)
    out = tmp_path / "out"
    proc = start_and_wait(data, out, dask_args(cluster), 20)
    try:
        # `status` shows the cluster of a run that is going
        executor = wait_until(lambda: (status_json(out)["last_run"] or {}).get("executor"), 60, "the cluster")
        assert (executor["executor"], executor["workers"], executor["threads"]) == ("dask", 2, 2)
        assert executor["scheduler"] == cluster.scheduler_address
        victim = sorted(w["pid"] for w in cluster.workers().values())[0]
        os.kill(victim, signal.SIGKILL)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert (out / "merged.jsonl").read_bytes() == clean
    rows = states(out)
    assert {r[0] for r in rows.values()} == {"done"}
    assert {r[1] for r in rows.values()} == {1}, "a task was charged for its Dask worker's death"
    assert_no_leftovers(out)
    cluster.wait_for_workers(2)  # the nanny brings it back for the next tests


# -- 3. kill -9 of the coordinator ----------------------------------------------------------------

def test_kill9_of_the_coordinator_then_resume(tmp_path, cluster):
    data, clean = slow_tree_and_clean_run(tmp_path)
    out = tmp_path / "out"
    proc = start_and_wait(data, out, dask_args(cluster), 20)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    on_the_cluster = f"--executor dask --scheduler {cluster.scheduler_address}"
    assert status_json(out)["run_command"].endswith(on_the_cluster)
    merged = run_cli("merge", "-o", str(out), env=ENV)  # merge and retry print the same way to carry on
    assert merged.returncode == 1 and on_the_cluster in merged.stderr, merged.stderr
    # Batches of the dead run may still finish on the cluster and write their result files:
    # the next run must neither record them nor let them clobber its own.
    again = crawl(data, out, "-p", SLOW, *dask_args(cluster))
    assert again.returncode == 0, again.stderr
    assert "went back to pending" in again.stderr
    assert (out / "merged.jsonl").read_bytes() == clean
    assert {r[0] for r in states(out).values()} == {"done"}
    local = crawl(data, out, "-p", SLOW, "-w", "2", sleep="0")  # and a local run after it agrees
    assert local.returncode == 0, local.stderr
    assert (out / "merged.jsonl").read_bytes() == clean
    assert_no_leftovers(out)


# -- 4. poison tasks fail alone -------------------------------------------------------------------

POISON = {
    "segfault.bin": "worker killed by SIGSEGV",
    "exit.bin": "worker exited with code 3",
    "raise.bin": "ValueError",
    "hang.bin": "timed out after 3s",
    "grab.bin": "memory above 150 MB",
}


def test_poison_tasks_fail_alone_with_their_reason(tmp_path, cluster):
    data = make_tree(tmp_path / "data", {**{name: "x\n" for name in POISON},
                                         **{f"ok{i:02d}.txt": f"{i}\n" for i in range(30)}})
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, *dask_args(cluster), "--retries", "1", "--retry-delay", "0",
                   "--timeout", "3", "--max-memory-per-task", "150MB", "--batch-size", "8")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = states(out)
    for name, reason in POISON.items():
        state, attempts, error = rows.pop(name)
        assert (state, attempts) == ("failed", 2), (name, state, attempts, error)
        assert reason in error, (name, error)
    assert {r[0] for r in rows.values()} == {"done"}
    assert {r[1] for r in rows.values()} == {1}, "an innocent task of a poisoned batch was charged"
    assert "failed on attempt" in result.stderr and " on tcp://" in result.stderr  # names the Dask worker
    assert len(cluster.workers()) == 2  # the Dask workers survived


# -- 5. the scheduler dies ---------------------------------------------------------------------------

@pytest.fixture
def own_cluster(tmp_path):
    """A cluster of one worker, so that the test may kill its scheduler."""
    lc = Cluster(tmp_path, 1)
    yield lc
    lc.close()


def test_scheduler_death_stops_the_run_cleanly_and_it_resumes(tmp_path, own_cluster):
    data, clean = slow_tree_and_clean_run(tmp_path)
    out = tmp_path / "out"
    proc = start_and_wait(data, out, ["--executor", "dask", "--scheduler", own_cluster.scheduler_address], 10,
                          waits=SHORT_WAITS)
    try:
        own_cluster.scheduler.kill()
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code not in (0, 130), err
    assert "Traceback" not in err, err
    assert "Dask scheduler" in err.strip().splitlines()[-1], err
    assert_no_leftovers(out)
    assert not [r for r, s in states(out).items() if s[0] == "running"]
    last = status_json(out)["last_run"]  # a stop crawlproc handled, not an abrupt end
    assert (last["state"], last["exit_code"]) == ("finished", code), last
    assert last["done"] == done_count(out) > 0, last  # its row ends with the counts reached, not a second older
    again = crawl(data, out, "-p", SLOW, "-w", "2", sleep="0")
    assert again.returncode == 0, again.stderr
    assert (out / "merged.jsonl").read_bytes() == clean


def test_an_idle_watch_notices_its_scheduler_died(tmp_path, own_cluster):
    """No batch in flight, so no future to fail: the watch learns it from its client, which gives
    up reconnecting after a while, and stops with one line instead of an error at the next file."""
    data = text_tree(tmp_path / "data", 5)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        crawlproc_command("watch", str(data), "-o", str(out), "--no-progress", "--settle", "0.2",
                          "--executor", "dask", "--scheduler", own_cluster.scheduler_address, waits=SHORT_WAITS),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        wait_until(lambda: done_count(out) >= 5 or proc.poll() is not None, 60, "the catch-up")
        assert proc.poll() is None
        own_cluster.scheduler.kill()
        code, err = finish(proc, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 2 and "Traceback" not in err and "internal error" not in err, err
    assert err.strip().splitlines()[-1].startswith(
        f"crawlproc: lost the connection to the Dask scheduler at {own_cluster.scheduler_address}"), err


# -- 6. watch on the cluster ---------------------------------------------------------------------------

def test_watch_processes_new_files_on_the_cluster(tmp_path, cluster):
    data = text_tree(tmp_path / "data", 10)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "watch", str(data), "-o", str(out), "--no-progress",
         "--settle", "0.2", "--merge-interval", "0.5", *dask_args(cluster)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV})
    try:
        wait_until(lambda: done_count(out) >= 10 or proc.poll() is not None, 60, "the catch-up")
        assert proc.poll() is None
        (data / "new.txt").write_text("fresh words here\n")
        wait_until(lambda: done_count(out) >= 11 or proc.poll() is not None, 60, "the new file")
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    paths = [json.loads(line)["path"] for line in (out / "merged.jsonl").read_text().splitlines()]
    assert "new.txt" in paths and len(paths) == 11
    pids = {r[0] for r in query_ledger(out, "SELECT DISTINCT worker_pid FROM tasks")}
    assert not pids & {proc.pid}


# -- 7. set-up errors: one line, exit 2 ----------------------------------------------------------------

def test_unreachable_scheduler_is_one_line(tmp_path):
    data = text_tree(tmp_path / "data", 3)
    result = subprocess.run(crawlproc_command("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask",
                                              "--scheduler", "tcp://127.0.0.1:9", waits=1),
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr


@pytest.mark.parametrize("address", ["bogus", "tcp://127.0.0.1", "127.0.0.1:87x", "http://127.0.0.1:8786"])
def test_a_malformed_scheduler_address_is_one_line(tmp_path, address):
    data = text_tree(tmp_path / "data", 3)
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask", "--scheduler", address,
                     timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "internal error" not in result.stderr, result.stderr
    assert f"--scheduler {address!r} is not a Dask scheduler address" in result.stderr


def test_a_dask_workers_address_given_as_the_scheduler_says_so(tmp_path, cluster):
    """It said `Worker.identity() got an unexpected keyword argument 'n_workers'`."""
    worker = next(iter(cluster.workers()))
    result = crawl(text_tree(tmp_path / "data", 3), tmp_path / "out", "--executor", "dask", "--scheduler", worker)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"--scheduler '{worker}' is a Dask worker's address: give its scheduler's" in result.stderr
    assert "Worker.identity" not in result.stderr


def test_a_server_that_is_no_dask_scheduler_is_one_line(tmp_path):
    """It accepts the connection and never answers Dask's handshake: Dask would wait for ever."""
    import socket

    data = text_tree(tmp_path / "data", 3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        result = subprocess.run(crawlproc_command("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask",
                                                  "--scheduler", address, waits=1),
                                capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"no Dask scheduler answered at {address}" in result.stderr or "cannot reach" in result.stderr


@pytest.fixture
def lone_scheduler(tmp_path) -> Iterator[str]:
    """The address of a Dask scheduler that no worker joins."""
    scheduler_file = tmp_path / "scheduler.json"
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: scheduler_file.exists() and scheduler_file.stat().st_size, 60, "the scheduler")
        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        scheduler.kill()
        scheduler.wait(30)


def test_a_scheduler_without_workers_says_so(tmp_path, lone_scheduler):
    data = text_tree(tmp_path / "data", 3)
    result = subprocess.run(crawlproc_command("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask",
                                              "--scheduler", lone_scheduler, waits=1),
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"crawlproc: no Dask worker joined the scheduler at {lone_scheduler} within 1s"), \
        result.stderr
    assert "waiting up to 1s for a Dask worker" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_waiting_for_a_worker_interrupts(tmp_path, lone_scheduler, signum):
    """Ctrl-C or SIGTERM while the run waits for a first Dask worker: one line, exit 130 at once
    and the run's end recorded. SIGTERM killed it in silence, and `status` said it ended abruptly."""
    out = tmp_path / "out"
    proc = start_run(text_tree(tmp_path / "data", 3), out, "--executor", "dask", "--scheduler", lone_scheduler)
    log = out / "logs" / "crawlproc.log"
    try:
        wait_until(lambda: log.exists() and "waiting up to" in log.read_text() or proc.poll() is not None,
                   60, "the wait for a Dask worker")
        proc.send_signal(signum)
        code, err = finish(proc, timeout=30)  # the wait itself is 60 s
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "crawlproc: interrupted; run the same command again to resume", err
    assert "Traceback" not in err and "\n\n" not in err, err
    assert query_ledger(out, "SELECT exit_code FROM runs") == [(130,)]


WATCH_WITHOUT_ITS_SCHEDULER = """
import sys, threading
import crawlproc
import crawlproc.executors.dask as dask_executor
from crawlproc.errors import UsageError

dask_executor.CONNECT_SECONDS = 1.0  # 10 s for a user: the port refuses, and Dask tries again until then
before = set(threading.enumerate())
try:
    crawlproc.watch(sys.argv[1], out=sys.argv[2], executor="dask", scheduler="tcp://127.0.0.1:9", quiet=True)
except UsageError as exc:
    print("cannot reach" in str(exc))
print(sorted(type(t).__name__ for t in threading.enumerate() if t not in before and t.name != "IO loop"))
"""


def test_a_watch_that_cannot_reach_its_scheduler_leaves_no_watcher_thread(tmp_path):
    """From Python the process lives on: the file-event threads of a watch that never started
    must end with it (Dask's own event loop thread may stay, as with any Dask client)."""
    data = text_tree(tmp_path / "data", 3)
    result = subprocess.run([sys.executable, "-c", WATCH_WITHOUT_ITS_SCHEDULER, str(data), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "[]"], result.stdout


def test_no_scheduler_says_how_to_give_one(tmp_path):
    data = text_tree(tmp_path / "data", 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    result = subprocess.run([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(tmp_path / "out"),
                             "--executor", "dask"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "--scheduler tcp://HOST:8786" in result.stderr and "local" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()  # said before OUT is made
    wrong = run_cli("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask", "--scheduler", "local:x",
                    timeout=60)
    assert wrong.returncode == 2 and "write local or local:N" in wrong.stderr, wrong.stderr
    assert not (tmp_path / "out").exists()


def test_without_the_extra_says_what_to_install(tmp_path):
    data = text_tree(tmp_path / "data", 3)
    code = ("import sys; sys.modules['distributed'] = None; from crawlproc.cli import main; "
            f"sys.argv = ['crawlproc', 'run', {str(data)!r}, '-o', {str(tmp_path / 'out')!r}, "
            "'--executor', 'dask', '--scheduler', 'local']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install 'crawlproc[dask]'" in result.stderr
    assert not (tmp_path / "out").exists()


@contextlib.contextmanager
def worker_blind_to(folder: Path, cluster: Cluster) -> Iterator[str]:
    """One more Dask worker, in a mount namespace of its own where `folder` is an empty tmpfs;
    yields its address while it runs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to give one worker another view of the file system")
    before = len(cluster.workers())
    blind = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none "$0" && exec "$@"', str(folder), sys.executable, "-m",
         "distributed.cli.dask_worker", cluster.scheduler_address, "--nthreads", "1", "--no-dashboard",
         "--name", "blind"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cluster.env)
    try:
        wait_until(lambda: len(cluster.workers()) == before + 1 or blind.poll() is not None, 90, "one more worker")
        if blind.poll() is not None:
            pytest.skip("could not start a worker in a private mount namespace")
        yield next(a for a, w in cluster.workers().items() if w["name"] == "blind")
    finally:
        blind.kill()
        blind.wait(30)


def test_a_worker_that_does_not_see_out_is_named(tmp_path, cluster):
    """A Dask worker in its own mount namespace, where OUT's parent is an empty tmpfs."""
    base = tmp_path / "shared"
    data = text_tree(base / "data", 3)
    out = base / "out"
    with worker_blind_to(base, cluster) as blind_address:
        result = crawl(data, out, *dask_args(cluster))
    assert result.returncode == 2, result.stderr
    assert blind_address in result.stderr and "same path" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not query_ledger(out, "SELECT 1 FROM tasks")  # refused before any task was claimed
    cluster.wait_for_workers(2)


def test_a_worker_that_does_not_see_the_processor_file_is_named(tmp_path, cluster):
    """DATA_DIR and OUT are shared, the processor's folder is not (a file in someone's home):
    that worker's crawlproc processes could not load it and handed every batch back, for ever."""
    data = text_tree(tmp_path / "data", 3)
    out = tmp_path / "out"
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(PROCESSORS, home / "procs.py")
    with worker_blind_to(home, cluster) as blind_address:
        result = crawl(data, out, *dask_args(cluster), "-p", f"{home / 'procs.py'}:slow")
    assert result.returncode == 2, result.stderr
    assert blind_address in result.stderr and "processor file" in result.stderr and "same path" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not query_ledger(out, "SELECT 1 FROM tasks")  # refused before any task was claimed
    cluster.wait_for_workers(2)


def gated_run(data: Path, out: Path, gate: Path, *args: str, waits: float | None = None) -> subprocess.Popen:
    """A run whose tasks wait on the Dask workers until `gate` exists, once some are running."""
    proc = start_run(data, out, "-p", GATED, "--param", f"gate={gate}", "--param", f"last_gate={gate}",
                     "--batch-size", "2", *args, waits=waits)
    try:
        wait_until(lambda: query_ledger(out, "SELECT 1 FROM tasks WHERE state = 'running' LIMIT 1")
                   or proc.poll() is not None, 90, "tasks running on the cluster")
        assert proc.poll() is None, "the run ended before it could be disturbed"
    except BaseException:
        proc.kill()
        raise
    return proc


def test_a_worker_that_joins_blind_to_the_paths_is_set_aside(tmp_path, cluster):
    """A Dask worker that joins mid-run without OUT's file system (an autoscaled node without the
    mount) hands its batch back and gets no more: the run finishes on the others, as a clean run
    would, and no task is charged for it. (It used to stop the whole run, exit 2.)"""
    base = tmp_path / "shared"
    data = make_tree(base / "data", {f"g{i:03d}.txt": "x\n" for i in range(100)})
    opened = tmp_path / "opened"
    opened.touch()
    clean = crawl(data, tmp_path / "clean", "-p", GATED, "--param", f"gate={opened}", "-w", "2")
    assert clean.returncode == 0, clean.stderr
    out, gate = base / "out", tmp_path / "gate"
    proc = gated_run(data, out, gate, *dask_args(cluster))
    try:
        with worker_blind_to(base, cluster) as blind_address:
            # the good workers hold their batches at the gate: the run gives the new worker one
            wait_until(lambda: "gets no more batches" in (out / "logs" / "crawlproc.log").read_text()
                       or proc.poll() is not None, 90, "the worker blind to OUT to be set aside")
            gate.touch()
            code, err = finish(proc)
    finally:
        gate.touch()
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    set_aside = [line for line in err.splitlines() if "gets no more batches" in line]
    assert len(set_aside) == 1 and blind_address in set_aside[0] and "same path" in set_aside[0], err
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()
    assert set(states(out).values()) == {("done", 1, None)}  # nobody blamed for it
    assert_no_leftovers(out)
    cluster.wait_for_workers(2)


def test_a_run_left_with_only_workers_set_aside_stops(tmp_path):
    """Once the one worker that saw the paths was gone, its batches went to the worker set aside,
    came back blaming nobody, and were sent to it again, for ever."""
    base = tmp_path / "shared"
    data = make_tree(base / "data", {f"g{i:03d}.txt": "x\n" for i in range(100)})
    own = Cluster(tmp_path, 1, nanny=False)  # no nanny: a killed worker stays gone
    try:
        out, gate = base / "out", tmp_path / "gate"  # never opened
        proc = gated_run(data, out, gate, *dask_args(own), waits=SHORT_WAITS)
        try:
            with worker_blind_to(base, own):
                wait_until(lambda: "gets no more batches" in (out / "logs" / "crawlproc.log").read_text()
                           or proc.poll() is not None, 90, "the blind worker to be set aside")
                own.procs[1].kill()  # the worker that sees the paths
                code, err = finish(proc, timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        own.close()
    assert code == 2, err
    assert "no other Dask worker is left" in err.strip().splitlines()[-1], err
    assert set(states(out).values()) == {("pending", 0, None)}  # nobody was charged


# -- 8. a cluster of our own: --scheduler local:N ----------------------------------------------------

def test_local_cluster_of_our_own(tmp_path):
    """`--scheduler local:2` starts (and stops) a LocalCluster itself; a kill -9 of the coordinator
    leaves neither the lock on OUT held nor Dask processes behind."""
    data, clean = slow_tree_and_clean_run(tmp_path, 120)
    out = tmp_path / "out"
    proc = start_and_wait(data, out, ["--executor", "dask", "--scheduler", "local:2"], 10)
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert started, "the run started no Dask worker processes"
    hint = shlex.split(status_json(out)["run_command"])  # what `status` tells a user to run
    assert hint[-4:] == ["--executor", "dask", "--scheduler", "local:2"], hint
    again = crawl(data, out, *hint[5:], sleep="0")
    assert again.returncode == 0, again.stderr  # 3 would mean a forked worker kept OUT locked
    assert (out / "merged.jsonl").read_bytes() == clean
    assert_no_leftovers(out)
    wait_until(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
               60, "the dead run's Dask processes to end")


def test_a_cluster_of_our_own_leaves_port_8787_alone(tmp_path):
    """Dask's scheduler serves HTTP on 8787 unless told otherwise: next to a Dask dashboard of the
    user's, a run on `--scheduler local` printed Dask's warning that the port was taken."""
    import socket

    data = text_tree(tmp_path / "data", 3)
    with socket.socket() as dashboard:
        try:
            dashboard.bind(("127.0.0.1", 8787))
            dashboard.listen()
        except OSError:  # taken already: as well
            pass
        result = crawl(data, tmp_path / "out", "--executor", "dask", "--scheduler", "local:1")
    assert result.returncode == 0, result.stderr
    assert "8787" not in result.stderr and "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_our_cluster_starts_ends_the_run_in_one_line(tmp_path, signum):
    """Ctrl-C (or a SIGTERM to the whole group, as `timeout` and systemd send it) while the
    LocalCluster starts: its half-made cluster printed tracebacks at exit, and a worker forked
    with the coordinator's SIGTERM handler ignored the terminate that multiprocessing's exit hook
    sends, which then waited for it for ever."""
    data = text_tree(tmp_path / "data", 20)
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress",
                                 "--executor", "dask", "--scheduler", "local:2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            coordinator = psutil.Process(proc.pid)
            wait_until(lambda: coordinator.children() or proc.poll() is not None, 60, "the first Dask worker")
            family = coordinator.children(recursive=True)
            os.killpg(proc.pid, signum)
            code, err = finish(proc, timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if code == 0:
            continue  # it had finished: nothing was interrupted
        assert code == 130, err
        assert err.strip().splitlines()[-1] == "crawlproc: interrupted; run the same command again to resume", err
        assert "Traceback" not in err and "Exception ignored" not in err, err
        wait_until(lambda: not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
                   60, "the cluster's processes to end")


NO_MAIN_GUARD = """
import os, sys, threading
import dask, distributed
import crawlproc

with open(sys.argv[2], "a") as marks:  # top-level code: a worker that imports this script runs it again
    marks.write(f"{os.getpid()}\\n")
if sys.argv[4] == "thread":  # another thread, as a notebook or a timer has: no fork from here
    threading.Thread(target=threading.Event().wait, args=(600,), daemon=True).start()
before = dask.config.get("distributed.worker.multiprocessing-method")
outcome = crawlproc.run(sys.argv[1], out=sys.argv[3], processor="linecount", executor="dask",
                        scheduler="local:2", quiet=True)
after = dask.config.get("distributed.worker.multiprocessing-method")
print(outcome.exit_code, outcome.counts["done"], before == after)
"""


@pytest.mark.parametrize("threads", ["thread", "alone"])
def test_a_script_without_a_main_guard_runs_once_on_a_cluster_of_our_own(tmp_path, threads):
    """With another thread running, the cluster is started by a process of its own (whose
    workers never import the caller's __main__); alone, its workers fork from the caller. Either
    way the script runs once, and Dask's settings are as they were after the run."""
    data = text_tree(tmp_path / "data", 12)
    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD)
    marks = tmp_path / "marks.txt"
    result = subprocess.run([sys.executable, str(script), str(data), str(marks), str(tmp_path / "out"), threads],
                            capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "12", "True"], (result.stdout, result.stderr)
    assert len(marks.read_text().splitlines()) == 1, marks.read_text()


def test_local_alone_starts_as_many_dask_workers_as_w_says(tmp_path):
    data = text_tree(tmp_path / "data", 4)
    result = crawl(data, tmp_path / "out", "-v", "-w", "1", "--executor", "dask", "--scheduler", "local")
    assert result.returncode == 0, result.stderr
    assert ": 1 worker, 1 thread" in result.stderr, result.stderr


RUN_BESIDE_A_THREAD = """
import sys, threading
import crawlproc

threading.Thread(target=threading.Event().wait, args=(600,), daemon=True).start()
crawlproc.run(sys.argv[1], out=sys.argv[2], processor=sys.argv[3], executor="dask", scheduler="local:2",
              batch_size=4, quiet=True)
"""


def test_a_cluster_process_ends_with_a_coordinator_killed_with_9(tmp_path):
    """The cluster of a caller with threads runs in a process of its own: a kill -9 of the
    caller ends it and its workers too, and the next run finishes the job."""
    data, clean = slow_tree_and_clean_run(tmp_path, 120)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", RUN_BESIDE_A_THREAD, str(data), str(out), SLOW],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ENV}, cwd=tmp_path)
    try:
        wait_until(lambda: done_count(out) >= 10 or proc.poll() is not None, 90, "tasks done on the cluster")
        assert proc.poll() is None, proc.stderr.read()
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("cluster_process" in " ".join(p.cmdline()) for p in started), [p.cmdline() for p in started]
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_until(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
               60, "the cluster process and its workers to end")
    again = crawl(data, out, "-p", SLOW, "-w", "2", sleep="0")
    assert again.returncode == 0, again.stderr
    assert (out / "merged.jsonl").read_bytes() == clean


FORKED_WORKER = """
import os, signal, sys, time
from crawlproc.executors import lifeline

lifeline.follow_me()
pid = os.fork()
if pid == 0:  # what a worker forked by our LocalCluster does as it starts, then nothing
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lifeline.dask_setup(None)
    while True:
        time.sleep(60)
print(pid, flush=True)
time.sleep(600)
"""


def test_a_forked_worker_ends_with_the_coordinator_that_forked_it(tmp_path):
    """The lifeline preload: a worker process forked from a coordinator ends when the
    coordinator dies, whatever descriptors it holds (without the preload, this child would
    sleep forever: nothing else tells it)."""
    coordinator = subprocess.Popen([sys.executable, "-c", FORKED_WORKER], stdout=subprocess.PIPE, text=True,
                                   cwd=REPO)
    worker = None
    try:
        worker = psutil.Process(int(coordinator.stdout.readline()))
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        coordinator.kill()
        coordinator.communicate(timeout=30)
        wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 30,
                   "the forked worker to end with its coordinator")
    finally:
        for process in (coordinator, worker):
            try:
                process.kill()
            except (ProcessLookupError, psutil.Error, AttributeError):
                pass


OWN_CLUSTER_THREADS = """
import json, threading
from crawlproc.executors.dask import _local_cluster
from distributed import Client

cluster = _local_cluster(1, "local:1")
with Client(cluster.scheduler_address, set_as_default=False) as client:
    names = client.run(lambda: sorted(t.name for t in threading.enumerate()))
cluster.close()
print(json.dumps(list(names.values())))
"""


def test_the_workers_of_our_own_cluster_carry_the_lifeline(tmp_path):
    """`--scheduler local`'s workers run the lifeline preload (see the test above for what it does)."""
    proc = subprocess.run([sys.executable, "-c", OWN_CLUSTER_THREADS], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (threads,) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "crawlproc-lifeline" in threads, threads


ENV_PROCESSOR = """
import os
from crawlproc import processor

@processor(version="1")
def environment(task):
    return {"path": task.relpath, "trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "slow": os.environ.get("CRASHY_SLOW_SECONDS")}
"""


def test_workers_on_the_cluster_run_without_the_nannys_malloc_trim_threshold(tmp_path, cluster):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ for its workers, which turns every large read
    buffer into an mmap and a munmap (2.5x the CPU per tiny file): crawlproc's worker processes
    there run without it, as local ones do, and keep the rest of the worker's environment."""
    code = ("import os, sys; from distributed import Client\n"
            "def trim(): return os.environ.get('MALLOC_TRIM_THRESHOLD_')\n"
            "with Client(sys.argv[1], timeout=30) as c:\n"
            "    print(sorted(set(c.run(trim).values())))")
    seen = subprocess.run([sys.executable, "-c", code, cluster.scheduler_address], capture_output=True, text=True,
                          timeout=60)
    assert seen.returncode == 0, seen.stderr
    assert seen.stdout.strip() == "['65536']"  # what the Dask workers themselves run with
    processor_file = tmp_path / "env_processor.py"
    processor_file.write_text(ENV_PROCESSOR)
    data = text_tree(tmp_path / "data", 20)
    result = crawl(data, tmp_path / "out", *dask_args(cluster), "-p", f"{processor_file}:environment")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (tmp_path / "out" / "merged.jsonl").read_text().splitlines()]
    assert len(records) == 20
    assert {r["trim"] for r in records} == {None}
    assert {r["slow"] for r in records} == {SLOW_SECONDS}  # the rest of the environment is the worker's


def test_a_trim_threshold_the_user_chose_is_kept(monkeypatch):
    import distributed  # noqa: F401  (registers Dask's defaults, as in a Dask worker)

    from crawlproc.executors.remote import worker_environment

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    assert "MALLOC_TRIM_THRESHOLD_" not in worker_environment()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert worker_environment()["MALLOC_TRIM_THRESHOLD_"] == "1048576"


def test_the_status_page_shows_the_cluster(tmp_path, cluster):
    from test_serve import Gates, Served, status_json

    gates = Gates(tmp_path)
    run = Served(tmp_path, *gates.run_args("--retries", "0", "--serve", "0", *dask_args(cluster)), name="run")
    try:
        executor = wait_until(lambda: ((status_json(run.url)["live"] or {}).get("executor") or {}).get("threads"),
                              60, "the cluster on the status page")
        live = status_json(run.url)["live"]
        assert live["executor"] == {"executor": "dask", "scheduler": cluster.scheduler_address,
                                    "scheduler_option": cluster.scheduler_address, "workers": 2, "threads": executor,
                                    "dask_tasks": live["executor"]["dask_tasks"]}
        assert live["executor"]["dask_tasks"] >= 1
        assert live["workers"] == []  # its tasks run in processes on the Dask workers, not here
        gates.first.touch()
        gates.last.touch()
        assert run.finish() == 1  # the <script> file failed
    finally:
        run.kill()


def test_grouping_joins_only_short_full_batches_up_to_the_target():
    from crawlproc.executors.dask import MAX_GROUP, Grouping
    from crawlproc.worker import BatchReport, WorkBatch

    def batch(batch_id: int, tasks: int) -> WorkBatch:
        return WorkBatch(batch_id, tuple((batch_id * 1000 + i, b"f", 0, None, 1, 1) for i in range(tasks)))

    def claimed(grouping: Grouping, batches: list[WorkBatch]) -> list[WorkBatch]:
        for one in batches:  # as the executor's assign() notes each batch it gets
            grouping.note(one)
        return batches

    grouping = Grouping(0.5)
    tiny = claimed(grouping, [batch(i, 512) for i in range(40)])
    assert [len(g) for g in grouping.split(tiny)] == [1] * 40  # task times unknown yet: alone
    grouping.learn([BatchReport(0, 1, [(i, "done", None, 0.00002) for i in range(512)])])
    sizes = [len(g) for g in grouping.split(tiny)]  # 512 x 20 us = 10 ms a batch
    assert sizes == [MAX_GROUP, MAX_GROUP, 40 - 2 * MAX_GROUP]
    assert [b.batch_id for g in grouping.split(tiny) for b in g] == list(range(40))  # claim order kept
    tail = claimed(grouping, [batch(100 + i, 60) for i in range(4)])  # smaller than the largest so far: a tail
    assert [len(g) for g in grouping.split(tiny[:3] + tail)] == [3, 1, 1, 1, 1]
    slow = Grouping(0.5)
    slow.learn([BatchReport(0, 1, [(i, "done", None, 0.002) for i in range(250)])])
    assert [len(g) for g in slow.split(claimed(slow, [batch(i, 250) for i in range(6)]))] == [1] * 6  # 0.5 s each already
    assert [len(g) for g in slow.split(claimed(slow, [batch(i, 100) for i in range(6)]))] == [1] * 6  # a smaller batch: alone
    assert [len(g) for g in slow.split(claimed(slow, [batch(i, 300) for i in range(6)]))] == [1] * 6  # over the target
