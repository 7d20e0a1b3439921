"""Where batches run: the seam between the coordinator and the processes that do the work.

    coordinator (ledger, claims, outcomes, retries, budget, signals, progress, merge)
        │ openings() ─ assign(opening, batch) ─ dispatch() ─ collect(ready) -> [BatchReport | BatchLost]
        ├── LocalExecutor  (executors/local.py): worker processes forked here by crawlproc's
        │                   forkserver, a pipe and a shared task slot each
        └── DaskExecutor   (executors/dask.py): Dask distributed futures; on each Dask worker a
                            crawlproc worker process with the same slot runs the batch

Whatever the executor, a batch is run by the same code (worker.Worker.run_batch) in a
crawlproc worker process, and ends in exactly one of two events:
- a `BatchReport` from the worker (each task done, failed, changed, gone or returned), or
- a `BatchLost`: its worker died or was killed, so it will never report. The task that was
  running (read from the worker's slot) is blamed with the reason; the others go back.
A report that says the processor's preload or setup hook failed stops the run (see
`stop_if_setup_failed`).
The coordinator alone turns events into ledger writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Protocol

from crawlproc.worker import BatchReport, WorkBatch


@dataclass(frozen=True)
class Opening:
    """Room for one more batch: the executor's place for it and how many tasks it may hold."""

    place: Any
    max_tasks: int


@dataclass(frozen=True)
class BatchLost:
    """Batches that will never report, and the task to blame for it (None: nobody)."""

    batch_ids: tuple[int, ...]
    blamed: int | None = None  # a task id of one of those batches
    reason: str | None = None  # why, for the blamed task's failed attempt
    pid: int | None = None  # the worker process that ran it
    where: str | None = None  # where that process ran, when it was not here (a Dask worker)


Event = BatchReport | BatchLost

# Worker processes that die in a row before running any task (a processor whose import
# crashes, say) stop the run: each would otherwise hand its batch back to the next, for ever.
MAX_STARTUP_DEATHS = 10


@dataclass(frozen=True)
class WorkerLimits:
    """How many worker processes, and what makes one retire or be killed."""

    workers: int
    max_tasks_per_child: int = 1000
    timeout: float | None = None  # seconds a task may run before its worker is killed
    max_memory_per_task: int | None = None  # RSS bytes a worker may reach while a task runs


class Executor(Protocol):
    """What the coordinator needs from a place to run batches."""

    name: str
    target_batch_seconds: float  # adaptive batches take about this long there
    parallelism: int  # batches that run at the same time: the tail is split over these

    def prepare(self) -> None:
        """Get ready in the background as soon as work is certain (may return at once)."""

    def warmup_left(self) -> float | None:
        """Seconds `launch` would still wait for `prepare` (the coordinator scans meanwhile);
        None when not getting ready."""

    def launch(self) -> None:
        """Start the workers (blocks until they can take batches); CrawlprocError if it cannot."""

    def openings(self) -> Iterator[Opening]:
        """Room for batches now, one Opening per batch, yielded one at a time: each must be
        assigned a batch before the next is asked for (or the iteration stopped)."""

    def assign(self, opening: Opening, batch: WorkBatch) -> None:
        """Give `batch` to `opening`; it is sent by `dispatch`, once its claim is committed."""

    def dispatch(self) -> None:
        """Send the batches assigned since the last call."""

    def waitables(self) -> list:
        """Objects for multiprocessing.connection.wait that become ready when events arrive."""

    def collect(self, ready: list) -> list[Event]:
        """Events since the last call (after a wait on `waitables`, with what became ready)."""

    def next_check(self) -> float | None:
        """Seconds until `collect` must run again for timeouts and memory limits (None: no need)."""

    def in_flight(self) -> set[int]:
        """Ids of batches submitted and not yet reported or lost."""

    def kill_all(self, reason: str) -> None:
        """A stop that cannot wait: kill the workers now; their batches come back as BatchLost
        that blames nobody."""

    def close(self) -> list[Event]:
        """Stop: let workers finish what they hold for a while, then kill them. Returns the
        events that came meanwhile; batches without one are the caller's to hand back."""

    def describe(self) -> dict[str, Any]:
        """For progress and status: what runs the batches (workers, threads, addresses)."""


def stop_if_setup_failed(events: list[Event]) -> list[Event]:
    """The events, unless a worker could not set its processor up: then ProcessorSetupError, which
    stops the run at its start (exit 2) rather than charge every task. Its tasks were not run and
    go back when the coordinator shuts down."""
    for event in events:
        if type(event) is BatchReport and event.setup_error is not None:
            from crawlproc.errors import ProcessorSetupError

            where = f" (on Dask worker {event.where})" if event.where else ""
            raise ProcessorSetupError(event.setup_error + where)
    return events


def make_executor(name: str, config: Any, limits: WorkerLimits, **kwargs: Any) -> Executor:
    """The executor called `name` ("local" or "dask")."""
    if name == "local":
        from crawlproc.executors.local import LocalExecutor

        return LocalExecutor(config, limits, **kwargs)
    if name == "dask":
        from crawlproc.executors.dask import DaskExecutor

        return DaskExecutor(config, limits, **kwargs)
    from crawlproc.errors import UsageError

    raise UsageError(f"--executor {name!r}: choose local or dask")
