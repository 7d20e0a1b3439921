"""A Dask preload for the workers of the LocalCluster crawlproc starts itself (`--scheduler
local`): each worker process ends the moment the coordinator that forked it does.

Dask's nanny hands each worker process a pipe and keeps the other end; the worker exits
when that end closes, that is when the nanny's process (here: the coordinator) dies. But
crawlproc forks its workers from the coordinator (a fork starts in a fraction of a second,
see dask._local_cluster), and a fork copies every descriptor: when the two nannies start at
once, a worker forked a moment late holds the coordinator's end of the other worker's pipe
too. After a kill -9 of the coordinator the two workers then keep each other alive, with
crawlproc's forkservers under them, until they notice that their scheduler is gone: more than
five seconds on a loaded machine (seen once in about 40 coordinator kills of the Dask
torture). A pidfd on the coordinator does not depend on who holds which descriptor.

    coordinator: follow_me() ── forks ──> worker process: dask_setup() ── a thread waits on a
                 then LocalCluster(preload=[this module])      pidfd of the coordinator, and
                                                               os._exit()s when it dies

A worker that was not forked from a coordinator that called follow_me() (a spawned one,
in a process that had other threads, or a worker of your own cluster) watches nothing:
Dask's pipe is enough there, since a spawned process inherits no stray descriptor.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import Any

EXIT_CODE = 255  # what Dask's own watcher exits with, os._exit(-1)
POLL_SECONDS = 0.5  # without pidfd (Linux before 5.3): how often the parent is checked

_coordinator: int | None = None  # set by follow_me(), in the coordinator; forks inherit it


def follow_me() -> None:
    """Make the Dask workers this process forks from now on end when it ends."""
    global _coordinator
    _coordinator = os.getpid()


def dask_setup(worker: Any) -> None:
    """Dask's preload hook, run in each worker process as it starts (see the module's doc)."""
    coordinator = _coordinator
    if coordinator is None or coordinator == os.getpid():
        return
    threading.Thread(target=_exit_with, args=(coordinator,), name="crawlproc-lifeline", daemon=True).start()


def _exit_with(coordinator: int) -> None:
    """Wait for the coordinator's end, then end this process at once."""
    try:
        pidfd = os.pidfd_open(coordinator)
    except ProcessLookupError:
        os._exit(EXIT_CODE)
    except (AttributeError, OSError):  # no pidfd here: watch for the parent to change
        while os.getppid() == coordinator:
            time.sleep(POLL_SECONDS)
        os._exit(EXIT_CODE)
    # A coordinator that died before the pidfd was opened gave its children (this process)
    # to another parent, and its pid may be another process's by now: then end at once.
    if os.getppid() == coordinator:
        waiting = select.poll()  # not select(): a descriptor above 1023 is fine here
        waiting.register(pidfd, select.POLLIN)
        waiting.poll()
    os._exit(EXIT_CODE)
