"""The local executor: worker processes on this machine, forked by crawlproc's forkserver.

    coordinator ──assign/dispatch──> WorkerHandle ──pipe: WorkBatch──> worker process
         ^                              │ slot [task id, start]            │
         └── collect(): BatchReport ────┴── or BatchLost on its death <────┘

Each worker has PIPELINE batches in flight, so it never waits for the
coordinator, and a shared slot it sets before each task, so a worker that dies
or is killed for --timeout or --max-memory-per-task is blamed for exactly that
task (supervision.TaskLimits). Workers retire after --max-tasks-per-child
tasks (a successor starts at once) or when they report they passed
--max-memory-per-child.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait as wait_for
from typing import Any

from loguru import logger

from crawlproc.errors import CrawlprocError
from crawlproc.executors import MAX_STARTUP_DEATHS, BatchLost, Event, Opening, WorkerLimits, stop_if_setup_failed
from crawlproc.processes import ForkServer, WorkerHandle, WorkerStartCancelled, describe_death, kill_group
from crawlproc.supervision import TaskLimits
from crawlproc.worker import BatchReport, WorkBatch, WorkerConfig

PIPELINE = 2  # batches in flight per worker: it never waits for the coordinator
# The forkserver takes ~0.1 s to import what a worker needs; starting workers blocks
# until it is ready. Meanwhile the coordinator scans on, up to this long.
FORKSERVER_WARMUP_SECONDS = 0.1
STOP_SECONDS = 5.0  # how long close() lets workers finish before killing them


class LocalExecutor:
    name = "local"
    target_batch_seconds = 0.1  # responsive, fair tails; a batch costs ~100 µs here

    def __init__(self, config: WorkerConfig, limits: WorkerLimits, *,
                 forkserver: ForkServer | None = None, cancelled: Callable[[], bool] = lambda: False) -> None:
        self.config = config
        self.limits = limits
        self.parallelism = limits.workers
        self.forkserver = forkserver if forkserver is not None else ForkServer(config)  # maybe started early
        self.task_limits = TaskLimits(limits.timeout, limits.max_memory_per_task)
        self.workers: list[WorkerHandle] = []
        self._cancelled = cancelled  # a stop began: give up starting workers
        self._unsent: list[tuple[WorkerHandle, WorkBatch]] = []
        self._events: list[Event] = []
        self._startup_deaths = 0
        self._launched = False
        self._stopping = False  # kill_all or close: deaths from now on are ours, nobody's fault

    # -- starting ------------------------------------------------------------------
    def prepare(self) -> None:
        """Start the forkserver now; it imports in the background (a no-op if it runs)."""
        self.forkserver.start()

    def warmup_left(self) -> float | None:
        started = self.forkserver.started_at
        if self._launched or started is None:
            return None
        return max(0.0, started + FORKSERVER_WARMUP_SECONDS - time.monotonic())

    def launch(self) -> None:
        self.prepare()
        self._launched = True
        for _ in range(self.limits.workers):
            if self._spawn() is None:
                break  # stopping

    # -- batches ---------------------------------------------------------------------
    def openings(self) -> Iterator[Opening]:
        """The least busy workers first: a batch each for the idle ones, then a second each.
        When work is scarce (a watch, the end of a run), a batch must not queue behind another
        one's long task while a worker sits idle."""
        for depth in range(PIPELINE):
            for worker in list(self.workers):
                if len(worker.inflight) == depth and self._wants_work(worker):
                    yield Opening(worker, self.limits.max_tasks_per_child - worker.tasks_sent)

    def _wants_work(self, worker: WorkerHandle) -> bool:
        return (not worker.retiring and len(worker.inflight) < PIPELINE
                and worker.tasks_sent < self.limits.max_tasks_per_child and worker.process.is_alive())

    def assign(self, opening: Opening, batch: WorkBatch) -> None:
        worker: WorkerHandle = opening.place
        worker.tasks_sent += len(batch.tasks)
        worker.inflight.append(batch)
        self._unsent.append((worker, batch))

    def dispatch(self) -> None:
        for worker, batch in self._unsent:
            try:
                worker.conn.send(batch)
            except OSError:
                pass  # it died: its sentinel tells us next, and the batch comes back then
        # Only once all its batches are on their way: the stop message must come last.
        for worker in {id(w): w for w, _ in self._unsent}.values():
            if worker.tasks_sent >= self.limits.max_tasks_per_child and not worker.retiring:
                self._retire(worker)
        self._unsent.clear()

    def in_flight(self) -> set[int]:
        return {batch.batch_id for worker in self.workers for batch in worker.inflight}

    # -- events ----------------------------------------------------------------------
    def waitables(self) -> list:
        items: list = []
        for worker in self.workers:
            items += [worker.conn, worker.process.sentinel]
        return items

    def collect(self, ready: list) -> list[Event]:
        for worker in list(self.workers):
            if worker.conn in ready or worker.process.sentinel in ready:
                self._collect(worker)
        self.task_limits.enforce(self.workers)
        events, self._events = self._events, []
        return stop_if_setup_failed(events)

    def next_check(self) -> float | None:
        return self.task_limits.next_check(w for w in self.workers if w.inflight)

    def _collect(self, worker: WorkerHandle) -> None:
        """Take every report the worker sent; if it has exited, its unreported batches are lost."""
        try:
            while worker.conn.poll():
                self._on_report(worker, worker.conn.recv())
        except Exception:
            pass  # EOF, or a report cut short by the worker's death: its batches are lost
        if worker.process.is_alive():
            return
        worker.process.join()
        self.workers.remove(worker)
        worker.conn.close()
        worker.process.close()
        self._on_exit(worker)

    def _on_report(self, worker: WorkerHandle, report: BatchReport) -> None:
        batch = worker.inflight.popleft()
        assert batch.batch_id == report.batch_id, (batch.batch_id, report.batch_id)
        worker.reported = True
        self._startup_deaths = 0
        if report.retiring and not worker.retiring:
            self._retire(worker)  # it passed --max-memory-per-child or a task raised SystemExit
        self._events.append(report)

    def _on_exit(self, worker: WorkerHandle) -> None:
        exitcode = worker.process.exitcode
        lost = tuple(batch.batch_id for batch in worker.inflight)
        worker.inflight.clear()
        if worker.process.status_lost:  # its forkserver died first: how it ended is unknown
            logger.warning("worker {} ended after its forkserver stopped; its tasks go back", worker.pid)
            self._lose(lost, None, None, worker)
            self._replace(worker)
            return
        abnormal = (exitcode != 0 or worker.kill_reason) and not self._stopping
        if abnormal or lost:
            blamed = worker.slot[0] if abnormal else 0
            self._lose(lost, blamed or None, worker.kill_reason or describe_death(exitcode), worker)
        if abnormal and not worker.reported and not worker.kill_reason and not worker.slot[0]:
            self._startup_deaths += 1  # died before any task: a broken start, not a bad file
            if self._startup_deaths >= MAX_STARTUP_DEATHS:
                raise CrawlprocError("workers keep dying before finishing any batch "
                                     f"({describe_death(exitcode, in_a_task=False)})")
        if abnormal:
            how = worker.kill_reason or describe_death(exitcode)
            logger.warning("worker {} {}", worker.pid, how.removeprefix("worker "))  # not "worker 7 worker killed"
        self._replace(worker)

    def _lose(self, batch_ids: tuple[int, ...], blamed: int | None, reason: str | None,
              worker: WorkerHandle) -> None:
        if batch_ids:
            self._events.append(BatchLost(batch_ids, blamed, reason, worker.pid))

    # -- workers -----------------------------------------------------------------------
    def _spawn(self) -> WorkerHandle | None:
        """A new worker, or None when a stop began while it was starting (a Ctrl-C must work
        even while the forkserver is still importing a slow processor module)."""
        try:
            worker = self.forkserver.start_worker(cancelled=self._cancelled)
        except WorkerStartCancelled:
            return None
        self.workers.append(worker)
        return worker

    def _retire(self, worker: WorkerHandle) -> None:
        """Stop feeding a worker at its task limit; start its successor now so no time is lost."""
        worker.retiring = True
        try:
            worker.conn.send(None)  # it exits after the batches already queued
        except OSError:
            pass
        if len(self.workers) < 2 * self.limits.workers:  # else its exit starts the successor
            self._replace(worker)

    def _replace(self, worker: WorkerHandle) -> None:
        """Start one successor per worker that retires or dies, never two."""
        if not worker.replaced and not self._cancelled() and not self._stopping:
            worker.replaced = True
            self._spawn()

    def kill_all(self, reason: str) -> None:
        """A stop that cannot wait: kill every worker. Their tasks go back unblamed."""
        self._stopping = True
        for worker in self.workers:
            if worker.process.is_alive():
                logger.debug("killing worker {}: {}", worker.pid, reason)
                kill_group(worker.pid)

    def close(self) -> list[Event]:
        """Ask every worker to end after its queued batches, kill those still alive after
        STOP_SECONDS, and return what they reported meanwhile (the rest is BatchLost)."""
        self._stopping = True
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + STOP_SECONDS
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                kill_group(worker.pid)
                worker.process.join(5)
        for worker in list(self.workers):
            self._collect(worker)
        self.forkserver.close()
        events, self._events = self._events, []
        return events

    def describe(self) -> dict[str, Any]:
        """`current`: (pid, task id or 0 between tasks, its start in monotonic ns) per worker,
        read from the slots (for the status page)."""
        return {"executor": self.name, "workers": len(self.workers),
                "worker_pids": [w.pid for w in self.workers],
                "current": [(w.pid, w.slot[0], w.slot[1]) for w in self.workers]}
