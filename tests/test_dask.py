"""`--executor dask`, end to end, on a real Dask LocalCluster of worker processes (with nannies).

One cluster serves the whole module (its workers take seconds to start); a test that must kill the
scheduler starts a cluster of its own, as separate `dask scheduler` / `dask worker` processes.
Every run is a real `python -m crawlproc` subprocess; outputs are compared byte for byte with a
local run's.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, make_tree, query_ledger, run_cli, wait_until

distributed = pytest.importorskip("distributed")

PROCESSORS = REPO / "tests" / "crash_processors.py"
CRASHY = f"{PROCESSORS}:crashy"
SLOW = f"{PROCESSORS}:slow"
SLOW_SECONDS = "0.05"  # `slow` per file, here and on the cluster's workers (they inherit it)
ENV = {"CRASHY_SLOW_SECONDS": SLOW_SECONDS}


@pytest.fixture(scope="module")
def cluster():
    """A LocalCluster of 2 worker processes, 1 thread each, for the module."""
    old = os.environ.get("CRASHY_SLOW_SECONDS")
    os.environ["CRASHY_SLOW_SECONDS"] = SLOW_SECONDS  # the workers inherit the environment
    try:
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=50)
    finally:
        if old is None:
            del os.environ["CRASHY_SLOW_SECONDS"]
        else:
            os.environ["CRASHY_SLOW_SECONDS"] = old
    client = distributed.Client(lc)
    yield lc, client
    client.close()
    lc.close()


def crawl(data: Path, out: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_cli("run", str(data), "-o", str(out), "--no-progress", *args, env=ENV, timeout=timeout)


def dask_args(cluster) -> list[str]:
    return ["--executor", "dask", "--scheduler", cluster[0].scheduler_address]


def start_run(data: Path, out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress", *args],
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


def worker_pids(client) -> list[int]:
    return sorted(client.run(os.getpid).values())


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


def test_reducer_summary_matches_a_local_run(tmp_path, cluster):
    data = text_tree(tmp_path / "data", 200)
    assert crawl(data, tmp_path / "local", "-w", "2").returncode == 0
    result = crawl(data, tmp_path / "dask", *dask_args(cluster))
    assert result.returncode == 0, result.stderr
    assert summary(tmp_path / "dask")["reduced"] == summary(tmp_path / "local")["reduced"]
    assert (tmp_path / "dask" / "merged.jsonl").read_bytes() == (tmp_path / "local" / "merged.jsonl").read_bytes()


# -- 2. kill -9 of a Dask worker ------------------------------------------------------------------

def test_kill9_of_a_dask_worker_loses_nothing(tmp_path, cluster):
    data = make_tree(tmp_path / "data", {f"s{i:03d}.txt": f"{i}\n" * i for i in range(160)})
    clean = crawl(data, tmp_path / "clean", "-p", SLOW, "-w", "2")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, *dask_args(cluster), "--batch-size", "4")
    try:
        wait_until(lambda: done_count(out) >= 20 or proc.poll() is not None, 60, "tasks done on the cluster")
        assert proc.poll() is None, "the run ended before a worker could be killed"
        victim = worker_pids(cluster[1])[0]
        os.kill(victim, signal.SIGKILL)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()
    rows = states(out)
    assert {r[0] for r in rows.values()} == {"done"}
    assert {r[1] for r in rows.values()} == {1}, "a task was charged for its Dask worker's death"
    assert_no_leftovers(out)
    cluster[1].wait_for_workers(2, timeout=60)  # the nanny brings it back for the next tests


# -- 3. kill -9 of the coordinator ----------------------------------------------------------------

def test_kill9_of_the_coordinator_then_resume(tmp_path, cluster):
    data = make_tree(tmp_path / "data", {f"s{i:03d}.txt": f"{i}\n" * i for i in range(160)})
    clean = crawl(data, tmp_path / "clean", "-p", SLOW, "-w", "2")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, *dask_args(cluster), "--batch-size", "4")
    try:
        wait_until(lambda: done_count(out) >= 20 or proc.poll() is not None, 60, "tasks done on the cluster")
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Batches of the dead run may still finish on the cluster and write their result files:
    # the next run must neither record them nor let them clobber its own.
    again = crawl(data, out, "-p", SLOW, *dask_args(cluster))
    assert again.returncode == 0, again.stderr
    assert "went back to pending" in again.stderr
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()
    assert {r[0] for r in states(out).values()} == {"done"}
    local = crawl(data, out, "-p", SLOW, "-w", "2")  # and a local run after it agrees
    assert local.returncode == 0, local.stderr
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()
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
    cluster[1].wait_for_workers(2, timeout=60)
    assert len(cluster[1].scheduler_info()["workers"]) == 2  # the Dask workers survived


# -- 5. the scheduler dies ---------------------------------------------------------------------------

@pytest.fixture
def own_cluster(tmp_path):
    """A scheduler and a worker as separate processes, so the test may kill the scheduler."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, **ENV}
    scheduler = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                                  "--no-dashboard", "--scheduler-file", str(scheduler_file)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    procs = [scheduler]
    try:
        wait_until(lambda: scheduler_file.exists() and scheduler_file.stat().st_size, 60, "the scheduler")
        address = json.loads(scheduler_file.read_text())["address"]
        worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                   "--no-dashboard"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(worker)
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
        yield address, scheduler
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)


def test_scheduler_death_stops_the_run_cleanly_and_it_resumes(tmp_path, own_cluster):
    address, scheduler = own_cluster
    data = make_tree(tmp_path / "data", {f"s{i:03d}.txt": f"{i}\n" * i for i in range(160)})
    clean = crawl(data, tmp_path / "clean", "-p", SLOW, "-w", "2")
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, "--executor", "dask", "--scheduler", address, "--batch-size", "4")
    try:
        wait_until(lambda: done_count(out) >= 10 or proc.poll() is not None, 60, "tasks done on the cluster")
        assert proc.poll() is None
        scheduler.kill()
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code not in (0, 130), err
    assert "Traceback" not in err, err
    assert "Dask scheduler" in err.strip().splitlines()[-1], err
    assert_no_leftovers(out)
    assert not [r for r, s in states(out).items() if s[0] == "running"]
    again = crawl(data, out, "-p", SLOW, "-w", "2")
    assert again.returncode == 0, again.stderr
    assert clean.returncode == 0, clean.stderr
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()


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
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "--executor", "dask",
                     "--scheduler", "tcp://127.0.0.1:9", timeout=90)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in result.stderr


def test_no_scheduler_says_how_to_give_one(tmp_path):
    data = text_tree(tmp_path / "data", 3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    result = subprocess.run([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(tmp_path / "out"),
                             "--executor", "dask"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 2
    assert "--scheduler tcp://HOST:8786" in result.stderr and "local" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_the_extra_says_what_to_install(tmp_path):
    data = text_tree(tmp_path / "data", 3)
    code = ("import sys; sys.modules['distributed'] = None; from crawlproc.cli import main; "
            f"sys.argv = ['crawlproc', 'run', {str(data)!r}, '-o', {str(tmp_path / 'out')!r}, "
            "'--executor', 'dask', '--scheduler', 'local']; main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install 'crawlproc[dask]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_worker_that_does_not_see_out_is_named(tmp_path, cluster):
    """A Dask worker in its own mount namespace, where OUT's parent is an empty tmpfs."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to give one worker another view of the file system")
    base = tmp_path / "shared"
    data = text_tree(base / "data", 3)
    out = base / "out"
    mount = f"mount -t tmpfs none {base} && exec {sys.executable} -m distributed.cli.dask_worker " \
            f"{cluster[0].scheduler_address} --nthreads 1 --no-dashboard --name blind"
    blind = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", mount],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(cluster[1].scheduler_info()["workers"]) == 3 or blind.poll() is not None,
                   60, "the third worker")
        if blind.poll() is not None:
            pytest.skip("could not start a worker in a private mount namespace")
        blind_address = next(a for a, w in cluster[1].scheduler_info()["workers"].items() if w.get("name") == "blind")
        result = crawl(data, out, *dask_args(cluster))
    finally:
        blind.kill()
        blind.wait(30)
    assert result.returncode == 2, result.stderr
    assert blind_address in result.stderr and "same path" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert not query_ledger(out, "SELECT 1 FROM tasks WHERE state != 'pending' AND state != 'running'")
    wait_until(lambda: len(cluster[1].scheduler_info()["workers"]) == 2, 60, "the third worker to leave")


# -- 8. a cluster of our own: --scheduler local:N ----------------------------------------------------

def test_local_cluster_of_our_own(tmp_path):
    """`--scheduler local:2` starts (and stops) a LocalCluster itself; a kill -9 of the coordinator
    leaves neither the lock on OUT held nor Dask processes behind."""
    data = make_tree(tmp_path / "data", {f"s{i:03d}.txt": f"{i}\n" * i for i in range(120)})
    clean = crawl(data, tmp_path / "clean", "-p", SLOW, "-w", "2")
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "out"
    proc = start_run(data, out, "-p", SLOW, "--executor", "dask", "--scheduler", "local:2", "--batch-size", "4")
    try:
        wait_until(lambda: done_count(out) >= 10 or proc.poll() is not None, 90, "tasks done on the cluster")
        assert proc.poll() is None
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert started, "the run started no Dask worker processes"
    again = crawl(data, out, "-p", SLOW, "--executor", "dask", "--scheduler", "local:2")
    assert again.returncode == 0, again.stderr  # 3 would mean a forked worker kept OUT locked
    assert (out / "merged.jsonl").read_bytes() == (tmp_path / "clean" / "merged.jsonl").read_bytes()
    assert_no_leftovers(out)
    wait_until(lambda: not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE],
               60, "the dead run's Dask processes to end")


def test_the_status_page_shows_the_cluster(tmp_path, cluster):
    from test_serve import Gates, Served, status_json

    gates = Gates(tmp_path)
    run = Served(tmp_path, *gates.run_args("--retries", "0", "--serve", "0", *dask_args(cluster)), name="run")
    try:
        executor = wait_until(lambda: ((status_json(run.url)["live"] or {}).get("executor") or {}).get("threads"),
                              60, "the cluster on the status page")
        live = status_json(run.url)["live"]
        assert live["executor"] == {"executor": "dask", "scheduler": cluster[0].scheduler_address,
                                    "workers": 2, "threads": executor}
        assert live["workers"] == []  # its tasks run in processes on the Dask workers, not here
        gates.first.touch()
        gates.last.touch()
        assert run.finish() == 1  # the <script> file failed
    finally:
        run.kill()
