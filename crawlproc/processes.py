"""Worker processes as the coordinator sees them: start, kill, and say how they died.

Workers fork from our own forkserver (crawlproc/forkserver.py), which has
imported the worker and the processor once, so replacing one costs a few
milliseconds of CPU. The forkserver ignores SIGINT/SIGTERM (spawned with them held,
see stop_signals_held): it shares the coordinator's process group, and stopping is the coordinator's job
(if it dies anyway, its workers run on: see WorkerProcess). Each worker leads
its own process group (see worker.py), so `kill_group` takes whatever it
started along with it.
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for
from typing import Any

from crawlproc.children import STOP_SIGNALS, ended_within
from crawlproc.errors import CrawlprocError
from crawlproc.forkserver import SLOT_FIELDS
from crawlproc.worker import WorkerConfig

WORKER_MODULE = "crawlproc.worker"   # what every worker runs: the forkserver imports it first

# Each worker ever started gets the next slot (wrapping round): 16 MB of address space,
# of which one page is touched per 256 workers.
SLOTS = 1 << 20


@dataclass
class WorkerHandle:
    """One worker process, its pipe, its shared slot, and what the coordinator sent it."""

    process: WorkerProcess
    conn: Any
    slot: Any
    inflight: deque = field(default_factory=deque)  # WorkBatch, oldest first
    tasks_sent: int = 0
    retiring: bool = False
    kill_reason: str | None = None
    reported: bool = False
    replaced: bool = False  # a successor has been started for it

    @property
    def pid(self) -> int:
        return self.process.pid


class WorkerStartCancelled(Exception):
    """The pool began to stop while a worker was being started."""


class WorkerProcess:
    """A worker as its forkserver reports it: the pid, then (on `sentinel`) its exit code.

    The worker holds the write end of its status pipe too, so the sentinel also
    fires when it ends after the server died; its exit code is then unknown
    (None, and `status_lost`).
    """

    def __init__(self, pid: int, sentinel: int) -> None:
        self.pid = pid
        self.sentinel = sentinel  # readable once the worker has ended
        self.exitcode: int | None = None
        self.status_lost = False
        self._ended = False

    def is_alive(self) -> bool:
        self.join(0)
        return not self._ended

    def join(self, timeout: float | None = None) -> None:
        if not self._ended and wait_for([self.sentinel], timeout):
            self._read_exit()

    def close(self) -> None:
        os.close(self.sentinel)

    def _read_exit(self) -> None:
        self._ended = True
        data = os.read(self.sentinel, 8)
        if len(data) == 8:
            self.exitcode = int.from_bytes(data, "little", signed=True)
        else:
            self.status_lost = True  # the server died before the worker ended


class ForkServer:
    """The coordinator's side of crawlproc.forkserver: start it once, then ask it for workers."""

    def __init__(self, config: WorkerConfig, *, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.env = env  # the server's and so its workers' environment (None: ours)
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._slots: memoryview | None = None
        self._next_slot = 0
        self.started_at: float | None = None  # time.monotonic() of the last start

    def start(self) -> None:
        """Start the server if it is not running (or take over the one start_early made); it
        does not wait for its imports."""
        if self._process is not None:
            return
        self.started_at = time.monotonic()
        slots_fd = _shared_memory_fd()
        setup_fd = _shared_memory_fd()
        ours = None
        try:
            os.ftruncate(slots_fd, SLOTS * SLOT_FIELDS * 8)
            self._slots = memoryview(mmap.mmap(slots_fd, 0)).cast("q")
            _write_setup(setup_fd, pickle.dumps((self.config, _preload_modules(self.config))))
            self._process, ours = _take_early_server() if self.env is None else (None, None)
            if self._process is None:
                self._process, ours = _spawn_server((), self.env)
            socket.send_fds(ours, [b"setup".ljust(8)], [slots_fd, setup_fd])
        except BaseException:
            if ours is not None:
                ours.close()
            if self._process is not None:  # started but never told what to do: no use
                self._process.kill()
                self._process.wait(timeout=5)
                self._process = None
            raise
        finally:
            os.close(slots_fd)
            os.close(setup_fd)
        self._control = ours

    def start_worker(self, cancelled: Callable[[], bool] = lambda: False) -> WorkerHandle:
        """A new worker. Waits until it is forked (at first, until the server has imported
        what workers need), or until `cancelled()` says to give up (WorkerStartCancelled)."""
        try:
            return self._request_worker(cancelled)
        except OSError as exc:
            if self._process is not None and self._process.poll() is None:  # the server is fine:
                raise CrawlprocError(f"cannot start a worker process: {exc.strerror or exc}") from None
        self.close()  # the server died: start another one, once
        try:
            return self._request_worker(cancelled)
        except OSError as exc:
            raise CrawlprocError(f"cannot start worker processes: {exc.strerror or exc}") from None

    def _request_worker(self, cancelled: Callable[[], bool]) -> WorkerHandle:
        self.start()
        ours, theirs = socket.socketpair()
        status_r, status_w = os.pipe()
        try:
            slot = self._next_slot
            self._next_slot = (slot + 1) % SLOTS
            view = self._slots[slot * SLOT_FIELDS:(slot + 1) * SLOT_FIELDS]
            view[0] = view[1] = 0
            try:
                socket.send_fds(self._control, [slot.to_bytes(8, "little")], [theirs.fileno(), status_w])
            finally:
                theirs.close()
                os.close(status_w)
            pid = self._read_pid(status_r, cancelled)
        except BaseException:
            ours.close()
            os.close(status_r)
            raise
        from multiprocessing.connection import Connection

        return WorkerHandle(WorkerProcess(pid, status_r), Connection(ours.detach()), view)

    def _read_pid(self, status_r: int, cancelled: Callable[[], bool]) -> int:
        while not wait_for([status_r], 0.1):
            if cancelled():
                raise WorkerStartCancelled()
            if self._process.poll() is not None:
                break
        data = os.read(status_r, 8) if wait_for([status_r], 0) else b""
        if len(data) < 8:
            raise OSError(errno.EPIPE, "the workers' forkserver stopped")
        pid = int.from_bytes(data, "little", signed=True)
        if pid < 0:
            raise CrawlprocError(f"cannot start a worker process: {os.strerror(-pid)}")
        return pid

    def close(self) -> None:
        """Stop the server (closing its control socket ends it); running workers go on."""
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._process is not None:
            if not ended_within(self._process, 5):
                self._process.kill()
                self._process.wait(timeout=5)
            self._process = None


def _write_setup(fd: int, data: bytes) -> None:
    """What the forkserver reads first, from the start of `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)


def _shared_memory_fd() -> int:
    """A file only in memory (memfd on Linux; an unlinked temp file elsewhere)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create("crawlproc-slots")
    import tempfile

    with tempfile.TemporaryFile() as f:
        return os.dup(f.fileno())


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread while the server is spawned: it inherits the
    block across exec, so that no Ctrl-C reaches it before it ignores them (then it unblocks
    them), and one that comes meanwhile waits here for the coordinator. Ignoring them here
    instead lost it: a watch told to stop in that moment never stopped."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _spawn_server(head_start: Iterable[str], env: Mapping[str, str] | None) -> tuple[subprocess.Popen, socket.socket]:
    """A forkserver process, importing `head_start` until its setup comes; our end of its socket."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        with stop_signals_held():  # inherited across exec: the server never sees a Ctrl-C
            process = subprocess.Popen(
                [sys.executable, "-m", "crawlproc.forkserver", str(theirs.fileno()), ",".join(head_start)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,  # no worker reads our terminal
                env=env)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    return process, ours


_early_server: tuple[subprocess.Popen, socket.socket] | None = None


def start_early(head_start: Iterable[str]) -> None:
    """Start the workers' forkserver before the job is set up, importing the worker and
    `head_start` meanwhile (csv-stats' pyarrow: ~0.2 s that the coordinator's own start then
    overlaps). The next ForkServer.start() with our environment takes it over; end_early() ends
    it if none did."""
    global _early_server
    end_early()
    _early_server = _spawn_server([WORKER_MODULE, *head_start], None)


def end_early() -> None:
    """Kill the forkserver start_early made if no ForkServer took it over."""
    process, ours = _take_early_server()
    if process is not None:
        ours.close()
        process.kill()
        process.wait(timeout=5)


def _take_early_server() -> tuple[subprocess.Popen | None, socket.socket | None]:
    global _early_server
    taken, _early_server = _early_server, None
    if taken is None or taken[0].poll() is not None:  # never started, or already gone
        if taken is not None:
            taken[1].close()
        return None, None
    return taken


def _preload_modules(config: WorkerConfig) -> list[str]:
    """Modules every worker needs besides its processor (which the server loads too): the
    worker, and psutil when it reads worker memory (~15 ms a time if each worker did)."""
    return [WORKER_MODULE, *(["psutil"] if config.max_memory else [])]


def describe_death(exitcode: int | None, *, in_a_task: bool = True) -> str:
    if exitcode is None:
        return "worker vanished"
    if exitcode < 0:
        try:
            return f"worker killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker killed by signal {-exitcode}"
    return f"worker exited with code {exitcode}{' during the task' if in_a_task else ''}"


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
