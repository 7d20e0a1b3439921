"""crawlproc's own forkserver, with real processes: workers start, end, die, and are told apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import wait_until

from crawlproc import processes
from crawlproc.processes import ForkServer, WorkerStartCancelled, describe_death
from crawlproc.worker import WorkBatch, WorkerConfig

DEADLINE = 20


@pytest.fixture
def server(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("one\ntwo\n")
    config = WorkerConfig(data_dir=os.fsencode(data), out=str(tmp_path / "out"), processor="linecount", params={})
    forkserver = ForkServer(config)
    yield forkserver
    forkserver.close()


def ended(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def server_process(forkserver: ForkServer) -> psutil.Process:
    return psutil.Process(forkserver._process.pid)  # noqa: SLF001 - the test needs the real process


def test_a_worker_runs_a_batch_and_its_clean_exit_is_reported(server):
    worker = server.start_worker()
    assert worker.pid in [p.pid for p in server_process(server).children()]
    worker.conn.send(WorkBatch(1, ((7, b"a.txt", 0, None, 8, os.stat(
        os.fsdecode(server.config.data_dir) + "/a.txt").st_mtime_ns, 0),)))
    assert worker.conn.poll(DEADLINE)
    report = worker.conn.recv()
    assert [o[:2] for o in report.outcomes] == [(7, "done")]
    worker.conn.send(None)
    worker.process.join(DEADLINE)
    assert not worker.process.is_alive() and worker.process.exitcode == 0
    worker.process.close()


def test_a_killed_worker_is_reported_with_its_signal(server):
    worker = server.start_worker()
    assert worker.process.is_alive()
    os.kill(worker.pid, signal.SIGKILL)
    worker.process.join(DEADLINE)
    assert worker.process.exitcode == -signal.SIGKILL
    assert describe_death(worker.process.exitcode) == "worker killed by SIGKILL"


def test_workers_write_their_slot_and_each_gets_its_own(server):
    first, second = server.start_worker(), server.start_worker()
    first.slot[0] = 11
    assert second.slot[0] == 0
    second.slot[0] = 22
    assert (first.slot[0], second.slot[0]) == (11, 22)
    for worker in (first, second):
        worker.conn.send(None)
        worker.process.join(DEADLINE)


def test_the_server_ignores_ctrl_c_and_sigterm(server):
    server.start()
    process = server_process(server)
    for signum in (signal.SIGINT, signal.SIGTERM):
        os.kill(process.pid, signum)
    worker = server.start_worker()  # still serving
    worker.conn.send(None)
    worker.process.join(DEADLINE)
    assert worker.process.exitcode == 0 and process.is_running()


def test_a_dead_server_leaves_its_workers_running_and_another_one_starts(server):
    worker = server.start_worker()
    old = server_process(server)
    old.kill()
    old.wait(DEADLINE)
    worker.process.join(0.2)
    assert worker.process.is_alive()  # it holds its own end of the status pipe
    replacement = server.start_worker()
    assert server_process(server).pid != old.pid
    worker.conn.send(None)  # now it ends: seen at once, with no exit code to tell
    worker.process.join(DEADLINE)
    assert not worker.process.is_alive() and worker.process.status_lost and worker.process.exitcode is None
    replacement.conn.send(None)
    replacement.process.join(DEADLINE)
    assert replacement.process.exitcode == 0 and not replacement.process.status_lost


def test_a_worker_start_can_be_cancelled_while_the_server_imports(tmp_path):
    slow = tmp_path / "slow_module.py"
    slow.write_text("import time\ntime.sleep(30)\ndef f(task):\n    return None\n")
    config = WorkerConfig(data_dir=os.fsencode(tmp_path), out=str(tmp_path / "out"), processor=f"{slow}:f",
                          params={})
    forkserver = ForkServer(config)
    started = time.monotonic()
    try:
        with pytest.raises(WorkerStartCancelled):
            forkserver.start_worker(cancelled=lambda: time.monotonic() - started > 0.5)
        assert time.monotonic() - started < 5
    finally:
        forkserver._process.kill()  # noqa: SLF001 - it would import for 30 s
        forkserver.close()


def test_received_pipes_are_not_passed_to_programs_a_worker_runs(server):
    worker = server.start_worker()
    worker.conn.send(WorkBatch(1, ()))  # a round trip: it is past its start-up now
    assert worker.conn.poll(DEADLINE) and worker.conn.recv().outcomes == []
    inheritable = []
    for fd in os.listdir(f"/proc/{worker.pid}/fd"):
        flags = int(open(f"/proc/{worker.pid}/fdinfo/{fd}").read().split("flags:")[1].split()[0], 8)
        if not flags & os.O_CLOEXEC and int(fd) > 2:
            inheritable.append((fd, os.readlink(f"/proc/{worker.pid}/fd/{fd}")))
    assert inheritable == []
    worker.conn.send(None)
    worker.process.join(DEADLINE)


def test_closing_stops_the_server_and_running_workers_notice_the_coordinator_is_gone(server):
    worker = server.start_worker()
    process = server_process(server)
    server.close()
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    worker.conn.close()  # the coordinator's end: the worker stops by itself
    wait_until(lambda: ended(worker.pid), DEADLINE, "the worker to stop")


# -- a head start: the server started before the job is set up ------------------------------

def test_a_server_started_early_imports_ahead_and_the_job_takes_it_over(server, tmp_path, monkeypatch):
    marker = tmp_path / "ahead.txt"
    (tmp_path / "ahead_module.py").write_text(
        f"import os\nopen({str(marker)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.rename({str(marker)!r} + '.tmp', {str(marker)!r})\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    processes.start_early(["no_such_module_here", "ahead_module"])  # one that fails is skipped
    early = processes._early_server[0]  # noqa: SLF001 - the test needs the real process
    wait_until(marker.exists, DEADLINE, "the early server's imports")
    assert int(marker.read_text()) == early.pid
    server.start()
    assert server._process is early and processes._early_server is None  # noqa: SLF001
    test_a_worker_runs_a_batch_and_its_clean_exit_is_reported(server)


def test_an_early_server_that_no_job_takes_over_is_ended(tmp_path):
    processes.start_early(["json"])
    early = processes._early_server[0]  # noqa: SLF001
    other = ForkServer(WorkerConfig(data_dir=os.fsencode(tmp_path), out=str(tmp_path / "out"),
                                    processor="linecount", params={}), env=dict(os.environ))
    other.start()  # its own environment: a server of its own, not the early one
    try:
        assert other._process is not early and processes._early_server[0] is early  # noqa: SLF001
        processes.end_early()
        assert early.returncode is not None and processes._early_server is None  # noqa: SLF001
        processes.end_early()  # nothing left to end
    finally:
        other.close()


def test_a_taken_over_server_that_died_meanwhile_is_replaced(server):
    processes.start_early([])
    early = processes._early_server[0]  # noqa: SLF001
    early.kill()
    early.wait(DEADLINE)
    worker = server.start_worker()
    assert server._process is not early  # noqa: SLF001
    worker.conn.send(None)
    worker.process.join(DEADLINE)
    assert worker.process.exitcode == 0


def test_a_run_that_fails_before_its_workers_leaves_no_early_server(tmp_path):
    tag = f"crawlproc-test-{os.getpid()}-{time.monotonic_ns()}"
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("a,b\n1,2\n")
    (tmp_path / "out").write_text("a file where OUT should be")  # refused after the head start

    def tagged() -> list[int]:
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                if process.environ().get("CRAWLPROC_TEST_TAG") == tag:
                    found.append(process.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    for out, code in ((tmp_path / "out", 2), (tmp_path / "new-out", 0)):
        # output to files, not pipes: waiting for the CLI alone, not for what holds its pipes
        with open(tmp_path / "stderr", "w+") as stderr:
            cli = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out),
                                    "-p", "csv-stats", "-q", "--no-progress"], stdout=subprocess.DEVNULL,
                                   stderr=stderr, env={**os.environ, "CRAWLPROC_TEST_TAG": tag})
            assert cli.wait(timeout=120) == code, stderr.seek(0) or stderr.read()
        assert tagged() == []  # the early server was ended (or taken over) before the CLI exited


HELD_SIGNALS = """
import os, signal, subprocess, sys
from crawlproc.processes import stop_signals_held

received = []
signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
with stop_signals_held():
    os.kill(os.getpid(), signal.SIGTERM)
    held = list(received)
    spawned = subprocess.run([sys.executable, "-c", "import signal; print(sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))"],
                             capture_output=True, text=True).stdout.strip()
print(held, received, spawned)
"""


def test_a_stop_signal_while_the_server_is_spawned_is_kept_for_the_coordinator():
    """The server is spawned with SIGINT and SIGTERM held, so that it never sees a Ctrl-C; they
    were ignored instead, and a SIGTERM that came in that moment was lost (a watch never stopped).
    In a process of one thread, as the coordinator is then (with more, another thread takes it)."""
    result = subprocess.run([sys.executable, "-c", HELD_SIGNALS], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "[15]", f"[{int(signal.SIGINT)},", f"{int(signal.SIGTERM)}]"], result.stdout
