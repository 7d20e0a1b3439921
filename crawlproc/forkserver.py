"""The workers' forkserver: a process that has imported what a worker needs and forks one on request.

    coordinator ──control socket: slot number + [worker's end of its pipe, status pipe]──> forkserver
                                                                                  └─fork──> worker
    coordinator <──status pipe: the worker's pid, later its exit code── forkserver (it reaps workers)

Workers are recycled every --max-tasks-per-child tasks, so starting one must be
cheap. multiprocessing's forkserver makes each new process unpickle a Process
object and its parent's preparation data before the target runs: about 3 ms of
CPU and 500 page faults a worker on the project's machine. Here a child goes
straight to `worker_main`; everything it needs was imported once, here, and
frozen out of the cyclic GC's way (a collection would touch, and so copy, every
inherited page).

Run as `python -m crawlproc.forkserver FD [MODULE,...]` by processes.ForkServer,
which sends the WorkerConfig and the modules to import first (in a memfd: a
processor sent by value may not fit in one message). The MODULEs, given when
the server is started before the job is set up (processes.start_early), are
imported while it waits for that. Before it forks any worker, it runs the
processor's preload hook, whose data the workers then share. SIGINT and SIGTERM are
ignored: it shares the coordinator's process group, and stopping is the
coordinator's job. It exits when the coordinator's end of the control socket
closes; workers notice that on their own pipes.
"""

from __future__ import annotations

import gc
import importlib
import mmap
import os
import pickle
import select
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection  # what a worker talks through: imported once, here

SLOT_FIELDS = 2  # [task id (0 = between tasks), start time in monotonic ns], int64 each
REQUEST_BYTES = 8


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))  # held while it was spawned
    _whole_lines()
    with socket.socket(fileno=int(sys.argv[1])) as control:
        control.set_inheritable(False)
        _import_ahead(filter(None, sys.argv[2].split(",")) if len(sys.argv) > 2 else ())
        message, fds, _, _ = socket.recv_fds(control, REQUEST_BYTES, 2)
        if not message or len(fds) != 2:
            return
        with os.fdopen(fds[1], "rb") as setup:  # a file, not the message: a processor sent by value can be big
            config, preload = pickle.load(setup)
        for name in preload:
            importlib.import_module(name)
        _prepare_processor(config)
        slots = memoryview(mmap.mmap(fds[0], 0)).cast("q")
        os.close(fds[0])
        gc.freeze()  # after the preload hook: its data stays in pages no collection writes to
        _Server(control, config, slots).serve()


def _import_ahead(names) -> None:
    """What the coordinator expects the processor to need, imported before the setup says what it
    needs (processes.start_early); the setup's imports then find them done. A module that fails
    here is imported again then, and its error reported the usual way."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:
            pass


def _prepare_processor(config) -> None:
    """Import the processor once, here (a module, a file, a plugin or one sent by value: each is
    cached where the worker's own load finds it), the modules it imports when it runs, and run its
    preload hook, so that every worker shares the data. If it cannot load, each worker reports that itself; a preload that fails is
    reported by each worker with its first batch (see processors/hooks.py)."""
    from crawlproc.processors.hooks import preload
    from crawlproc.processors.shipping import load_for_worker

    try:
        processor = load_for_worker(config.processor, config.shipped, config.import_paths)
        for name in processor.imports:  # what the processor imports when it runs
            importlib.import_module(name)
    except Exception:
        return
    preload(processor, config.params)


class _Server:
    def __init__(self, control: socket.socket, config, slots: memoryview) -> None:
        self.control = control
        self.config = config
        self.slots = slots
        self.status: dict[int, int] = {}  # worker pid -> write end of its status pipe
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select through the wakeup fd
        while True:
            ready, _, _ = select.select([self.control, self.wake_r], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
            self._reap()
            if self.control in ready and not self._fork_requested_worker():
                return  # the coordinator is gone

    def _fork_requested_worker(self) -> bool:
        try:
            message, fds, _, _ = socket.recv_fds(self.control, REQUEST_BYTES, 2)
        except OSError:
            return False
        if len(message) < REQUEST_BYTES or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return False
        slot = int.from_bytes(message, "little")
        conn_fd, status_w = fds
        for fd in fds:  # received fds are inheritable: no program a worker runs may hold them
            os.set_inheritable(fd, False)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: say so instead of a pid
            pid = -(exc.errno or 1)
        if pid == 0:
            self._become_worker(conn_fd, slot)
        os.close(conn_fd)
        if _tell(status_w, pid) and pid > 0:
            self.status[pid] = status_w
        else:
            os.close(status_w)
        return True

    def _become_worker(self, conn_fd: int, slot: int) -> None:
        """The child: run worker_main. It keeps its own status pipe's write end open, so that
        if this server dies, the coordinator still sees the worker end when it ends."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            self.control.close()
            for fd in (self.wake_r, self.wake_w, *self.status.values()):
                os.close(fd)  # another worker's status pipe must not wait for this one
            from crawlproc.worker import worker_main  # preloaded: already in sys.modules

            first = slot * SLOT_FIELDS
            worker_main(self.config, Connection(conn_fd), self.slots[first:first + SLOT_FIELDS])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)

    def _reap(self) -> None:
        """Tell the coordinator the exit code of every worker that ended (any child is ours)."""
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            status_w = self.status.pop(pid, None)
            if status_w is not None:
                _tell(status_w, os.waitstatus_to_exitcode(wait_status))
                os.close(status_w)


def _whole_lines() -> None:
    """A processor's prints go out a line at a time, in one write each (its workers inherit
    this): lines of workers printing at once were torn and mixed mid-line (unbuffered, as
    PYTHONUNBUFFERED makes them, a print is several writes; block-buffered, a block ends
    anywhere)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):  # not a text stream we can set (None, or replaced)
            pass


def _tell(status_w: int, value: int) -> bool:
    """Write a pid or an exit code to the coordinator; False if it stopped listening."""
    try:
        os.write(status_w, value.to_bytes(8, "little", signed=True))
    except OSError:  # it gave up on this worker (a stop while we forked), or it is gone
        return False
    return True


if __name__ == "__main__":
    main()
    # Its workers are processes of their own and it buffers nothing: the interpreter's teardown
    # (~15-30 ms with pyarrow loaded) would only delay the coordinator, which waits for this
    # exit at the end of every run.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
