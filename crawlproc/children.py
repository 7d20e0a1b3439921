"""Forked children that talk to the coordinator over two pipes (listing helpers, the reducer).

A fork starts in a millisecond with everything already imported, where a new
interpreter takes tens of ms. The price is that a child inherits the whole
process: it must end with os._exit (never the parent's cleanup), and may drop
the descriptors it does not need (the ledger, worker pipes); it never keeps
the lock on OUT.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import subprocess


_KEPT_FROM_CHILDREN: set[int] = set()  # descriptors no child may hold (see keep_from_children)


def keep_from_children(fd: int) -> None:
    """A forked child closes `fd` first thing: the lock on OUT, which a child outliving a
    killed coordinator must not keep (the next run would find OUT locked). This holds for
    every fork of this process: ours, and those of libraries (a Dask LocalCluster forks its
    workers from here)."""
    _KEPT_FROM_CHILDREN.add(fd)


def forget_kept(fd: int) -> None:
    _KEPT_FROM_CHILDREN.discard(fd)


def _close_kept_in_child() -> None:
    for fd in _KEPT_FROM_CHILDREN:
        try:
            os.close(fd)
        except OSError:
            pass
    _KEPT_FROM_CHILDREN.clear()


os.register_at_fork(after_in_child=_close_kept_in_child)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_stop_handlers: list[Callable] = []  # those stop_handler() has set now, innermost last


@contextmanager
def stop_handler(handler: Callable, signums: tuple[int, ...] = STOP_SIGNALS, *,
                 over_default_only: bool = False) -> Iterator[None]:
    """`handler` for `signums` while the block runs, then what was there before. Only on the
    main thread (where Python allows handlers; elsewhere the caller stops the job), and with
    `over_default_only` only for a signal nobody handles. No process forked meanwhile keeps it
    (_default_signals_in_child)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = tuple(s for s in signums if not over_default_only or signal.getsignal(s) == signal.SIG_DFL)
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    _stop_handlers.append(handler)
    try:
        yield
    finally:
        _stop_handlers.remove(handler)
        for signum, before in previous.items():
            signal.signal(signum, before)


def _default_signals_in_child() -> None:
    """A child forked while one of the coordinator's handlers is set (ours, or Dask's nanny
    forking a worker from its thread) must end on SIGTERM as a plain process does, or whoever
    terminates it (Dask, multiprocessing at exit) waits for it for ever; and it leaves a
    Ctrl-C, which reaches the whole process group, to the coordinator, as crawlproc's own
    workers do. Run by the fork itself, before any signal reaches the child's code."""
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.SIG_IGN)):
        if signal.getsignal(signum) in _stop_handlers:
            signal.signal(signum, default)
    _stop_handlers.clear()


os.register_at_fork(after_in_child=_default_signals_in_child)


def forking_is_safe() -> bool:
    """No other thread runs here: a fork cannot copy a lock held mid-operation that the
    child would then wait on forever (the status page of --serve runs in a process of its
    own, and keeps no thread here)."""
    return threading.active_count() == 1


def fork_child(run: Callable[[int, int], None], *, close_others: bool = False) -> tuple[int, int, int] | None:
    """Fork a child that calls run(read_fd, write_fd) and then ends.

    Returns (pid, fd to write to the child, fd to read from it), or None when
    the fork fails. With `close_others` the child keeps only its two pipe ends
    and stdin, stdout and stderr.
    """
    flush_std_streams()  # or the child would write our buffered output again
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        for fd in (to_child_r, to_child_w, from_child_r, from_child_w):
            os.close(fd)
        return None
    if pid == 0:
        try:  # the lock on OUT is closed already (see _close_kept_in_child)
            os.close(to_child_w)
            os.close(from_child_r)
            if close_others:
                close_all_but(0, 1, 2, to_child_r, from_child_w)
            run(to_child_r, from_child_w)
        finally:
            os._exit(0)
    os.close(to_child_r)
    os.close(from_child_w)
    return pid, to_child_w, from_child_r


def flush_std_streams() -> None:
    """Flush stdout and stderr; a closed pipe (`crawlproc status | head`) or stream is no error."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def close_all_but(*keep_fds: int) -> None:
    keep = sorted(set(keep_fds))
    for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
        os.closerange(low + 1, high)


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether our child `pid` ended within `timeout` seconds (it is not reaped here). Woken the
    moment it ends, through a pidfd: the end of a run waits so for its forkserver and its page."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux before 5.3): poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            time.sleep(0.002)
        return False
    try:
        waiting = select.poll()  # not select(): a descriptor above 1023 is fine here
        waiting.register(pidfd, select.POLLIN)
        return bool(waiting.poll(timeout * 1000))
    finally:
        os.close(pidfd)


def ended_within(process: subprocess.Popen, timeout: float) -> bool:
    """Whether `process` ends (and is reaped) within `timeout` seconds, woken by its end, where
    Popen.wait(timeout) sleeps in steps of up to 50 ms."""
    if process.poll() is None and not wait_for_exit(process.pid, timeout):
        return False
    process.wait()
    return True


def ended_or_killed(process: subprocess.Popen, timeout: float) -> None:
    """Let `process` end by itself for up to `timeout` seconds, then kill it; reaped either way."""
    if not ended_within(process, timeout):
        process.kill()
        process.wait()
