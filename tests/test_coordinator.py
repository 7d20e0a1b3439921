"""The coordinator's own rules, end to end: per-task memory limit, the default failure budget,
batch ids across runs, the per-batch log line, and runs from a thread that is not the main one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import REPO, make_tree, query_ledger, run_cli, wait_until
from crawlproc.batching import BATCH_ID_BLOCK, BatchIds
from crawlproc.ledger import Ledger

PROCESSORS = REPO / "tests" / "crash_processors.py"
CRASHY = f"{PROCESSORS}:crashy"
ALWAYS_FAILS = f"{PROCESSORS}:always_fails"
GATED = f"{REPO / 'tests' / 'gated_processor.py'}:gated"  # a file named last* waits until last_gate exists


def crawl(data: Path, out: Path, *args: str, env: dict | None = None):
    return run_cli("run", str(data), "-o", str(out), "--no-progress", *args, env=env)


def plain(prefix: str, n: int) -> dict[str, str]:
    return {f"{prefix}{i:03d}.txt": f"{prefix} {i}\n" for i in range(n)}


def test_memory_per_task_kills_the_task_alone(tmp_path):
    """A task whose worker passes --max-memory-per-task is killed and charged; the other tasks
    of its batch go back unpenalised and end done."""
    data = make_tree(tmp_path / "data", {"grab.bin": "x\n", **plain("a", 10), **plain("z", 10)})
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "2", "--batch-size", "50", "--retries", "1",
                   "--retry-delay", "0", "--max-memory-per-task", "150MB", env={"CRASHY_GRAB_MB": "400"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = {r[0]: r[1:] for r in query_ledger(out, "SELECT relpath, state, attempts, error FROM tasks")}
    state, attempts, error = rows.pop("grab.bin")
    assert (state, attempts) == ("failed", 2)
    assert "memory above 150 MB" in error and "worker killed" in error
    assert {r[0] for r in rows.values()} == {"done"}
    assert {r[1] for r in rows.values()} == {1}, "a task of the killed worker's batch was charged"


def test_memory_per_task_off_lets_the_task_finish(tmp_path):
    data = make_tree(tmp_path / "data", {"grab.bin": "x\n"})
    out = tmp_path / "out"
    # Held 3 s: many samples of the worker's memory (every 0.1 s or so), none of them a reason to kill.
    result = crawl(data, out, "-p", CRASHY, "-w", "1", env={"CRASHY_GRAB_MB": "50", "CRASHY_GRAB_SECONDS": "3"},
                   *["--max-memory-per-task", "1GB"])
    assert result.returncode == 0, result.stderr


def test_first_tasks_failing_with_one_error_stop_the_run(tmp_path):
    data = make_tree(tmp_path / "data", plain("f", 60))
    out = tmp_path / "out"
    result = crawl(data, out, "-p", ALWAYS_FAILS, "-w", "2", "--retry-delay", "0")
    assert result.returncode == 1, result.stderr
    err = result.stderr
    assert "Traceback" not in err
    assert err.count("stopped early: the run's first 10 failing tasks all failed with the same error") == 1, err
    assert "NameError" in err and "always_fails" not in err.split("stopped early")[0][-5:]
    warnings = [line for line in err.splitlines() if "failed on attempt" in line]
    assert len(warnings) <= 3, "one warning per task and attempt"
    counts = dict(query_ledger(out, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert counts.get("done", 0) == 0
    assert counts.get("pending", 0) >= 60 - 20, f"the run did not stop early: {counts}"
    # Not burnt: the stopped tasks keep their remaining attempts for the run after the fix.
    assert query_ledger(out, "SELECT max(attempts) FROM tasks")[0][0] <= 1


def test_max_failures_turns_the_same_error_rule_off(tmp_path):
    data = make_tree(tmp_path / "data", plain("f", 20))
    out = tmp_path / "out"
    result = crawl(data, out, "-p", ALWAYS_FAILS, "-w", "2", "--retries", "0", "--max-failures", "100")
    assert result.returncode == 1, result.stderr
    assert "stopped early" not in result.stderr
    assert dict(query_ledger(out, "SELECT state, count(*) FROM tasks GROUP BY state")) == {"failed": 20}


def test_mixed_errors_do_not_stop_the_run(tmp_path):
    """Bad files fail each in its own way: that is data, not a bug; the run goes on."""
    files = {f"raise{i:02d}": "x\n" for i in range(8)}
    files.update({f"sysexit{i:02d}": "x\n" for i in range(8)})
    data = make_tree(tmp_path / "data", {**files, **plain("z", 10)})
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "2", "--retries", "0")
    assert result.returncode == 1, result.stderr
    assert "stopped early" not in result.stderr
    counts = dict(query_ledger(out, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert counts == {"failed": 16, "done": 10}


def test_failure_budget_message_gives_the_final_count(tmp_path):
    files = {f"raise{i:02d}": "x\n" for i in range(12)}
    data = make_tree(tmp_path / "data", {**files, **plain("z", 30)})
    out = tmp_path / "out"
    result = crawl(data, out, "-p", CRASHY, "-w", "2", "--batch-size", "3", "--retries", "0",
                   "--max-failures", "2")
    assert result.returncode == 1, result.stderr
    failed = query_ledger(out, "SELECT count(*) FROM tasks WHERE state = 'failed'")[0][0]
    assert f"stopped early: {failed} tasks failed, more than --max-failures 2 allows" in result.stderr


def test_batch_ids_are_never_handed_out_twice(tmp_path):
    """Ids a run reserved stay taken even if no task ever refers to them (a dead run's batch may
    still write its result file)."""
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        ids = BatchIds(ledger)
        with ledger.transaction() as conn:
            first = [ids.take(conn) for _ in range(3)]
        assert first == [1, 2, 3]
        with ledger.transaction() as conn:  # a new run: nothing refers to 1-3, yet they are taken
            assert BatchIds(ledger).take(conn) == 1 + BATCH_ID_BLOCK
        assert ledger.next_batch_id() == 1 + 2 * BATCH_ID_BLOCK
    finally:
        ledger.close()


def test_verbose_logs_one_line_per_batch(tmp_path):
    data = make_tree(tmp_path / "data", plain("f", 30))
    out = tmp_path / "out"
    result = crawl(data, out, "-v", "-w", "2", "--batch-size", "5")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if " tasks in " in line and "by worker" in line]
    batches = query_ledger(out, "SELECT count(DISTINCT batch_id) FROM tasks")[0][0]
    assert len(lines) == batches >= 6


def test_run_from_another_thread(tmp_path):
    """A notebook runs jobs outside the main thread: no signal handler may be required."""
    from crawlproc.run import RunOptions, run_job

    data = make_tree(tmp_path / "data", plain("f", 5))
    box: list = []

    def job() -> None:
        try:
            box.append(run_job(RunOptions(data_dir=data, out=tmp_path / "out", workers=1)))
        except BaseException as exc:  # reported below
            box.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    thread.join(120)
    assert not thread.is_alive()
    outcome = box[0]
    assert not isinstance(outcome, BaseException), outcome
    assert outcome.exit_code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["done"] == 5


def test_a_batch_goes_to_an_idle_worker_not_behind_a_long_task(tmp_path):
    """Batches went to the first worker with room in its pipeline: with a long task on it, the
    next file queued behind that task while the other worker sat idle (in a watch: for as long
    as the long task took)."""
    data = make_tree(tmp_path / "data", {"last.txt": "long\n", "z.txt": "short\n"})  # claimed in this order
    gate, last_gate, out = tmp_path / "gate", tmp_path / "last_gate", tmp_path / "out"
    gate.touch()  # every task but last.txt goes through
    proc = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress",
                             "-w", "2", "--batch-size", "1", "-p", GATED, "--param", f"gate={gate}",
                             "--param", f"last_gate={last_gate}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def state(relpath: str) -> str | None:
        rows = query_ledger(out, "SELECT state FROM tasks WHERE relpath = ?", (relpath,))
        return rows[0][0] if rows else None

    try:
        wait_until(lambda: state("z.txt") == "done" or proc.poll() is not None, 60,
                   "z.txt done by the other worker while last.txt holds its own")
        assert state("last.txt") == "running"
    finally:
        last_gate.touch()
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    pids = dict(query_ledger(out, "SELECT relpath, worker_pid FROM tasks"))
    assert pids["last.txt"] != pids["z.txt"]
