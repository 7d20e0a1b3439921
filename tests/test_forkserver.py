"""crawlproc's own forkserver, with real processes: workers start, end, die, and are told apart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import wait_until

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
