"""`--scheduler local[:N]` from a process that has other threads (a notebook, a run started in a
thread, a script with a timer): the LocalCluster runs in a process of its own.

    coordinator: ClusterProcess(n) ──python -m crawlproc.executors.cluster_process N──> cluster process
         <── stdout: one line, the scheduler's address (or "error: ...") ──  start_local_cluster(n):
                                                                                its workers fork from here
    close(): the end of its stdin ──────────────────────────────────────>  cluster closed, exit
    (a coordinator killed with -9 closes that stdin too)

Forking the cluster's workers from a process with other threads could copy a lock one of
them holds, and spawning them (Dask's default) imports the caller's __main__ again in each:
a script without `if __name__ == "__main__":` would start its whole job once more per worker.
This process has one thread when it starts the cluster, and __main__ here is this module.
"""

from __future__ import annotations

import subprocess
import sys

from crawlproc.children import ended_or_killed, forget_kept, keep_from_children
from crawlproc.errors import CrawlprocError

ADDRESS_PREFIX, ERROR_PREFIX = "tcp://", "error: "
START_SECONDS = 120.0  # importing Dask and starting N workers, on a loaded machine
CLOSE_SECONDS = 20.0


class ClusterProcess:
    """The coordinator's handle: `scheduler_address` once started, and `close()`."""

    def __init__(self, workers: int, address: str) -> None:
        self._process = subprocess.Popen(  # a group of its own: a Ctrl-C is the coordinator's to handle
            [sys.executable, "-m", __name__, str(workers), address], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, process_group=0)
        keep_from_children(self._process.stdin.fileno())  # its end must come with ours, not a child's
        line = self._first_line()
        if not line.startswith(ADDRESS_PREFIX):
            self.close()
            raise CrawlprocError(line.removeprefix(ERROR_PREFIX) or
                                 f"the local Dask cluster (--scheduler {address}) could not start; "
                                 "nothing is lost, run the same command again")
        self.scheduler_address = line

    def _first_line(self) -> str:
        """The scheduler's address or "error: ...", skipping anything else a library printed."""
        import time
        from multiprocessing.connection import wait as wait_for

        deadline = time.monotonic() + START_SECONDS
        while wait_for([self._process.stdout], max(0.0, deadline - time.monotonic())):
            line = self._process.stdout.readline()
            if not line:
                return ""  # it ended
            if line.startswith((ADDRESS_PREFIX, ERROR_PREFIX)):
                return line.strip()
        return ""

    def close(self) -> None:
        """End the cluster: its process closes it when its stdin ends, then exits."""
        forget_kept(self._process.stdin.fileno())
        try:
            self._process.stdin.close()
        except OSError:
            pass
        ended_or_killed(self._process, CLOSE_SECONDS)  # killed: its workers follow it (lifeline.py)
        self._process.stdout.close()


def main(argv: list[str]) -> None:
    """`python -m crawlproc.executors.cluster_process N ADDRESS` (see ClusterProcess)."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} {level: <7} {message}")
    import distributed  # noqa: F401 - its loggers exist from here on, to be quieted

    from crawlproc.executors.dask import _quiet_dask_logging, start_local_cluster

    _quiet_dask_logging()
    try:
        cluster = start_local_cluster(int(argv[0]), argv[1])
    except CrawlprocError as exc:
        print(f"{ERROR_PREFIX}{exc}", flush=True)
        return
    try:
        print(cluster.scheduler_address, flush=True)
        sys.stdin.read()  # until the coordinator closes it, or dies
    finally:
        cluster.close()


if __name__ == "__main__":
    main(sys.argv[1:])
