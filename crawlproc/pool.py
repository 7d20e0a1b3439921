"""The coordinator: feeds batches of tasks to N worker processes and records what happens.

    ┌─────────── one loop turn ───────────────────────────────────────────────┐
    │ source.step()    more work into the ledger: a slice of the scan, or     │
    │                  settled watch events (while it has any)                │
    │ _commit_turn()   ONE transaction: reports -> done/failed/pending,       │
    │                  deaths -> blame + hand back, claims for idle workers   │
    │ send batches     at most PIPELINE batches in flight per worker          │
    │ _wait()          pipes + process sentinels + signal wake-up together,   │
    │                  until a report, a death, a --timeout or a retry is due │
    └─────────────────────────────────────────────────────────────────────────┘

Each worker has a shared slot (task id, start time) that it sets before each
task, so a worker that dies or passes --timeout is blamed for exactly that task
and the rest of its batches go back to pending unpenalised. Workers are
replaced after --max-tasks-per-child tasks, or when they retire on memory.

Work arrives from a *source* (`WorkSource`): a `scanner.Scan` for `run`, a
`watch.Watcher` for `watch`. The pool ends when the source is exhausted and
nothing is pending, or when it is told to stop.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from types import SimpleNamespace
from typing import Any, Protocol

from loguru import logger

from crawlproc.errors import CrawlprocError
from crawlproc.ledger import ClaimedTask, Ledger
from crawlproc.processes import (
    ForkServer,
    WorkerHandle,
    WorkerStartCancelled,
    describe_death,
    kill_group,
)
from crawlproc.task import relpath_for_people
from crawlproc.worker import (
    CHANGED,
    DONE,
    FAILED,
    GONE,
    RETURNED,
    BatchReport,
    WorkBatch,
    WorkerConfig,
)

PIPELINE = 2  # batches in flight per worker: it never waits for the coordinator
MAX_BATCH_BYTES = 64 << 20
TARGET_BATCH_SECONDS = 0.1  # adaptive batches take about this long: responsive, fair tails
FIRST_BATCH_SIZE = 4  # small, so slow tasks are spread before their speed is known
SCAN_SLICE = 2000
READY_LIMIT = 2 * SCAN_SLICE  # claimed-by-the-scan tasks held at most: memory stays flat
GRACE_SECONDS = 5.0
TICK_SECONDS = 0.5
RUN_UPDATE_SECONDS = 1.0
MAX_STARTUP_DEATHS = 10
# The forkserver takes ~0.1 s to import what a worker needs; starting workers blocks
# until it is ready. Meanwhile the scan goes on, up to this long or until it has
# nothing more to do.
FORKSERVER_WARMUP_SECONDS = 0.1


class WorkSource(Protocol):
    """Where new tasks come from; the pool calls `step` between its other duties."""

    files: int  # files recorded so far, for progress
    wakeup_fd: int | None  # readable when the source has something new (or None)
    claimed: list  # tasks the source recorded already claimed for us (ClaimedTask rows); we empty it

    @property
    def exhausted(self) -> bool: ...  # no more work will ever come
    @property
    def busy(self) -> bool: ...  # more to do right now: the pool must not block
    def step(self, max_files: int) -> int: ...  # record more work; how many files
    def wait_hint(self) -> float | None: ...  # longest the pool may block before the next step


@dataclass(frozen=True)
class PoolOptions:
    workers: int
    max_tasks_per_child: int = 1000
    batch_size: int | None = None  # a cap; None = adaptive up to 512
    timeout: float | None = None
    retries: int = 2
    retry_delay: float = 0.5
    max_failures: tuple[float, bool] | None = None  # (limit, is_percent)
    grace_seconds: float = GRACE_SECONDS


@dataclass
class PoolResult:
    done: int = 0
    failed: int = 0
    stop_reason: str | None = None  # None (ran out of work), "interrupted", "failure budget", "write error"
    message: str | None = None


class WorkerPool:
    def __init__(
        self,
        ledger: Ledger,
        config: WorkerConfig,
        options: PoolOptions,
        *,
        run_id: int | None = None,
        on_progress: Callable[[dict], None] | None = None,
        on_turn: Callable[[], None] | None = None,
        run_info: Callable[[], dict] | None = None,
        now: Callable[[], float] = time.time,
        forkserver: ForkServer | None = None,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.options = options
        self.run_id = run_id
        self.on_progress = on_progress or (lambda stats: None)
        self.on_turn = on_turn or (lambda: None)
        self.run_info = run_info
        self.now = now
        self.forkserver = forkserver if forkserver is not None else ForkServer(config)  # maybe started early
        self.workers: list[WorkerHandle] = []
        self.result = PoolResult()
        self._claimed: dict[int, tuple] = {}  # task id -> its ClaimedTask-shaped row, while in flight
        self._ready: deque[tuple] = deque()  # claimed by the scan as it recorded them, not yet sent
        self._reports: list[tuple[WorkerHandle, BatchReport]] = []
        self._deaths: list[tuple[WorkerHandle, int | None]] = []
        self._next_batch: int | None = None  # read when workers start: a no-op rerun never needs it
        self._claimable = True
        self._retry_due: float | None = None
        self._avg_task_seconds: float | None = None
        self._pending_left: int | None = None  # known once a full scan is over: balances the tail
        self._signals = 0
        self._grace_deadline: float | None = None
        self._startup_deaths = 0
        self._started = False  # workers started
        self._last_run_update = 0.0
        self._last_run_state: tuple | None = (0, 0, None)  # what start_run wrote: no write until it changes
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.source: WorkSource | None = None

    def batches_in_flight(self) -> tuple[set[int], int]:
        """Ids of batches whose result files may be written or not yet recorded, and the next id."""
        ids = {b.batch_id for w in self.workers for b in w.inflight}
        ids |= {report.batch_id for _, report in self._reports}
        ids |= {b.batch_id for w, _ in self._deaths for b in w.inflight}
        return ids, self._next_batch if self._next_batch is not None else self.ledger.next_batch_id()

    def poke(self) -> None:
        """Something outside the pool put tasks back to pending: look again."""
        self._claimable = True

    # -- the loop ------------------------------------------------------------
    def run(self, source: WorkSource | None) -> PoolResult:
        self.source = source
        previous = self._install_signal_handlers()
        try:
            while True:
                if self._can_feed:
                    self._feed()
                self._send(self._commit_turn())
                if self._finished():
                    self.on_progress({**self.stats(), "final": True})
                    break
                self.on_turn()  # here every report received so far is in the ledger
                self._wait()
                self.on_progress(self.stats())
                self._heartbeat()
        finally:
            self._shutdown()
            self._restore_signal_handlers(previous)
        return self.result

    @property
    def _feeding(self) -> bool:
        return self.source is not None and not self.source.exhausted and not self._stopping

    @property
    def _can_feed(self) -> bool:
        """Feeding, and not holding so many scan-claimed tasks that memory would grow."""
        return self._feeding and len(self._ready) < READY_LIMIT

    @property
    def _has_work(self) -> bool:
        return bool(self._ready) or self._claimable

    @property
    def _stopping(self) -> bool:
        return self.result.stop_reason is not None

    def _finished(self) -> bool:
        if any(w.inflight for w in self.workers) or self._reports or self._deaths:
            return False
        if self._stopping:
            return True
        if self._feeding or self._has_work:
            return False
        ready, soonest = self.ledger.pending_outlook(self.now())
        if ready:  # a retry came due, or tasks were handed back, since the last claim
            self._claimable = True
            return False
        self._retry_due = soonest
        return soonest is None

    def _feed(self) -> None:
        if self.source.step(SCAN_SLICE):
            self._claimable = True
        if self.source.claimed:
            self._ready.extend(self.source.claimed)
            self.source.claimed.clear()
        if self.source.exhausted:
            self._pending_left = self.ledger.count_pending() + len(self._ready)
            self._claimable = True

    # -- one transaction per turn ----------------------------------------------
    def _commit_turn(self) -> list[tuple[WorkerHandle, WorkBatch]]:
        """Apply what arrived and claim for every worker with room, in one transaction."""
        starting = not self._started and self._has_work and not self._stopping
        if starting and not (self._ready or self._reports or self._deaths) and not self._claimable_now():
            starting = False  # seen with a read: a no-op rerun commits no empty transactions
        room = self._has_work and any(self._wants_work(w) for w in self.workers)
        if not (self._reports or self._deaths or room or starting):
            return []
        batches = []
        with self.ledger.transaction() as conn:
            if starting:
                self._start_workers_if_work(conn)
            for worker, report in self._reports:
                self._apply_report(conn, worker, report)
            for worker, exitcode in self._deaths:
                self._apply_death(conn, worker, exitcode)
            self._reports.clear()
            self._deaths.clear()
            for worker in list(self.workers):  # after the reports: who has room now
                while self._has_work and not self._stopping and self._wants_work(worker):
                    batch = self._claim(conn, worker)
                    if batch is not None:
                        batches.append((worker, batch))
        return batches

    def start_forkserver(self) -> None:
        """Start the workers' forkserver now, when work is certain (a new OUT), so that it is
        ready by the time the scan has found the first tasks. It does not block."""
        self.forkserver.start()  # a no-op if it runs already (started early: see run._open_job)

    def _claimable_now(self) -> bool:
        """Could a pending task be claimed now? If not, nothing is until the source adds some."""
        if self.ledger.has_claimable(self.ledger.conn, self.now()):
            return True
        self._claimable = False
        return False

    def _start_workers_if_work(self, conn: Any) -> None:
        """Workers start only once there is something to do: a no-op rerun costs no processes."""
        if not self._ready and not self.ledger.has_claimable(conn, self.now()):
            self._claimable = False
            return
        self.start_forkserver()
        if self._can_feed and self._warmup_left() > 0:
            return  # scan on while the forkserver imports; start the workers next turn
        self._started = True
        self._next_batch = self.ledger.next_batch_id()
        for _ in range(self.options.workers):
            if self._spawn() is None:
                break  # stopping

    def _warmup_left(self) -> float:
        if self._started or self.forkserver.started_at is None:
            return 0.0
        return max(0.0, self.forkserver.started_at + FORKSERVER_WARMUP_SECONDS - time.monotonic())

    def _wants_work(self, worker: WorkerHandle) -> bool:
        return (not worker.retiring and len(worker.inflight) < PIPELINE
                and worker.tasks_sent < self.options.max_tasks_per_child and worker.process.is_alive())

    def _claim(self, conn: Any, worker: WorkerHandle) -> WorkBatch | None:
        budget = self.options.max_tasks_per_child - worker.tasks_sent
        limit = min(self._batch_size(), budget)
        if self._ready:
            tasks = self._take_ready(limit, MAX_BATCH_BYTES)
        else:
            tasks = self.ledger.claim(conn, limit, MAX_BATCH_BYTES, self.now())
        if not tasks:
            self._claimable = False
            return None
        for task in tasks:
            self._claimed[task[0]] = task
        if self._pending_left is not None:
            self._pending_left = max(0, self._pending_left - len(tasks))
        batch = WorkBatch(self._next_batch, tuple(tasks))
        self._next_batch += 1
        worker.tasks_sent += len(tasks)
        worker.inflight.append(batch)
        return batch

    def _take_ready(self, limit: int, max_bytes: int) -> list[tuple]:
        """Up to `limit` scan-claimed tasks, stopping near `max_bytes` of input (one at least)."""
        tasks: list[tuple] = []
        total = 0
        while self._ready and len(tasks) < limit:
            task = self._ready[0]
            total += task[3] if task[3] is not None else task[4]
            if tasks and total > max_bytes:
                break
            tasks.append(self._ready.popleft())
        return tasks

    def _batch_size(self) -> int:
        cap = self.options.batch_size or 512
        if self._avg_task_seconds is None:
            size = FIRST_BATCH_SIZE  # until a report tells how long a task takes
        else:
            size = int(TARGET_BATCH_SECONDS / max(self._avg_task_seconds, 1e-6))
        if self._pending_left is not None:  # the tail: split what is left over all workers
            size = min(size, -(-self._pending_left // (2 * self.options.workers)))
        return max(1, min(size, cap))

    def _send(self, batches: list[tuple[WorkerHandle, WorkBatch]]) -> None:
        for worker, batch in batches:
            try:
                worker.conn.send(batch)
            except OSError:
                pass  # it died: its sentinel tells us next, and the batch goes back then
        # Only once all its batches are on their way: the stop message must come last.
        for worker in {id(w): w for w, _ in batches}.values():
            if worker.tasks_sent >= self.options.max_tasks_per_child and not worker.retiring:
                self._retire(worker)

    # -- outcomes ----------------------------------------------------------------
    def _apply_report(self, conn: Any, worker: WorkerHandle, report: BatchReport) -> None:
        batch = worker.inflight.popleft()
        assert batch.batch_id == report.batch_id, (batch.batch_id, report.batch_id)
        worker.reported = True
        self._startup_deaths = 0
        now = self.now()
        done_rows = []
        elapsed_done = []
        for task_id, kind, detail, elapsed in report.outcomes:  # once per task: keep it lean
            task = self._claimed.pop(task_id)
            if kind == DONE and report.write_error is None:
                done_rows.append((report.batch_id, *detail, report.pid, elapsed, now, task_id))
                elapsed_done.append(elapsed)
            elif kind == DONE or kind == RETURNED:
                self._hand_back(conn, [task_id])
            elif kind == FAILED:
                self._fail_attempt(conn, task, detail[0], detail[1], report.pid)
            elif kind == CHANGED:  # counts as an attempt: a file rewritten on every try ends failed
                self.ledger.record_new_stat(conn, task_id, *detail)
                self._fail_attempt(conn, task, "the file changed while it was processed "
                                   "(its size or mtime differ afterwards)", None, report.pid)
            elif kind == GONE:
                self.ledger.mark_gone(conn, task_id)
        self.ledger.mark_done(conn, done_rows)
        self.result.done += len(done_rows)
        self._learn_speed(elapsed_done)
        if report.retiring and not worker.retiring:
            self._retire(worker)  # it passed --max-memory-per-child or a task raised SystemExit
        if report.write_error:
            self._stop("write error", report.write_error)

    def _apply_death(self, conn: Any, worker: WorkerHandle, exitcode: int | None) -> None:
        blamed = worker.slot[0] if not worker.process.status_lost else 0  # unknown: blame nobody
        lost = [t[0] for batch in worker.inflight for t in batch.tasks]
        worker.inflight.clear()
        if blamed and blamed in self._claimed and (exitcode != 0 or worker.kill_reason):
            reason = worker.kill_reason or describe_death(exitcode)
            self._fail_attempt(conn, self._claimed[blamed], reason, None, worker.pid)
            lost.remove(blamed)
            self._claimed.pop(blamed)
        for task_id in lost:
            self._claimed.pop(task_id, None)
        self._hand_back(conn, lost)

    def _hand_back(self, conn: Any, task_ids: list[int]) -> None:
        if task_ids:
            self.ledger.hand_back(conn, task_ids)
            self._claimable = True
            if self._pending_left is not None:
                self._pending_left += len(task_ids)

    def _fail_attempt(self, conn: Any, row: tuple, error: str, tb: str | None, pid: int) -> None:
        task = ClaimedTask(*row)
        attempt = task.attempts + 1
        final = attempt > self.options.retries
        retry_at = None if final else self.now() + self._backoff(attempt)
        self.ledger.mark_failed_attempt(conn, task.id, error, tb, pid, retry_at)
        name = relpath_for_people(task.path_bytes)
        logger.bind(task=task.id).warning(
            "task {} ({}) failed on attempt {}/{}: {}{}", task.id, name, attempt,
            self.options.retries + 1, error, "" if not final else " - giving up")
        if final:
            self.result.failed += 1
            self._check_failure_budget(conn)
        else:
            self._retry_due = min(self._retry_due or retry_at, retry_at)

    def _backoff(self, attempt: int) -> float:
        import tenacity  # only on the failure path

        delay = self.options.retry_delay
        wait = tenacity.wait_exponential(multiplier=delay, max=60) + tenacity.wait_random(0, delay / 2)
        return wait(SimpleNamespace(attempt_number=attempt))

    def _check_failure_budget(self, conn: Any) -> None:
        if self.options.max_failures is None:
            return
        limit, percent = self.options.max_failures
        if percent:
            limit = limit * self.ledger.count_live(conn) / 100
        if self.result.failed > limit:
            self._stop("failure budget", f"{self.result.failed} tasks failed, more than --max-failures allows")

    def _learn_speed(self, elapsed: list[float]) -> None:
        """A moving average of task times: each task weighs 10%, as if they came one by one."""
        if not elapsed:
            return
        mean = sum(elapsed) / len(elapsed)
        avg = self._avg_task_seconds
        keep = 0.9 ** len(elapsed)
        self._avg_task_seconds = mean if avg is None else avg * keep + mean * (1 - keep)

    # -- waiting ----------------------------------------------------------------
    def _wait(self) -> None:
        ready = wait_for(self._waitables(), timeout=self._wait_timeout())
        for worker in list(self.workers):
            if worker.conn in ready or worker.process.sentinel in ready:
                self._collect(worker)
        if self._wake_r in ready:
            os.read(self._wake_r, 512)
        self._enforce_deadlines()

    def _waitables(self) -> list:
        items: list = [self._wake_r]
        if self.source is not None and self.source.wakeup_fd is not None:
            items.append(self.source.wakeup_fd)
        for worker in self.workers:
            items += [worker.conn, worker.process.sentinel]
        return items

    def _wait_timeout(self) -> float:
        if self._can_feed and self.source.busy:
            return 0
        now = self.now()
        timeout = TICK_SECONDS
        if self._feeding and self.source.wait_hint() is not None:
            timeout = min(timeout, self.source.wait_hint())
        if self._retry_due is not None and not self._stopping:
            timeout = min(timeout, max(0.0, self._retry_due - now))
        if self._grace_deadline is not None:
            timeout = min(timeout, max(0.0, self._grace_deadline - now))
        if self.forkserver.started_at is not None and not self._started and not self._stopping:
            timeout = min(timeout, self._warmup_left())
        if self.options.timeout:
            timeout = min(timeout, self._next_task_deadline())
        return timeout

    def _next_task_deadline(self) -> float:
        now_ns = time.monotonic_ns()
        soonest = TICK_SECONDS
        for worker in self.workers:
            if worker.slot[0]:
                left = (worker.slot[1] - now_ns) / 1e9 + self.options.timeout
                soonest = min(soonest, max(0.0, left))
        return soonest

    def _collect(self, worker: WorkerHandle) -> None:
        """Read every report the worker sent; if it has exited, record its death."""
        try:
            while worker.conn.poll():
                self._reports.append((worker, worker.conn.recv()))
        except Exception:
            pass  # EOF, or a report cut short by the worker's death: its tasks go back
        if worker.process.is_alive():
            return
        worker.process.join()
        self.workers.remove(worker)
        worker.conn.close()
        worker.process.close()
        self._on_exit(worker)

    def _on_exit(self, worker: WorkerHandle) -> None:
        exitcode = worker.process.exitcode
        if worker.process.status_lost:  # its forkserver died first: how it ended is unknown
            logger.warning("worker {} ended after its forkserver stopped; its tasks go back", worker.pid)
            self._deaths.append((worker, None))
            self._replace(worker)
            return
        abnormal = exitcode != 0 or worker.kill_reason
        if abnormal or worker.inflight:
            self._deaths.append((worker, exitcode))
        if abnormal and not worker.reported and not worker.kill_reason and not worker.slot[0]:
            self._startup_deaths += 1  # died before any task: a broken start, not a bad file
            if self._startup_deaths >= MAX_STARTUP_DEATHS:
                raise CrawlprocError(f"workers keep dying before finishing any batch ({describe_death(exitcode)})")
        if abnormal:
            logger.warning("worker {} {}", worker.pid, worker.kill_reason or describe_death(exitcode))
        self._replace(worker)

    def _enforce_deadlines(self) -> None:
        if self._retry_due is not None and self.now() >= self._retry_due:
            self._retry_due = None
            self._claimable = True
        if self._grace_deadline is not None and time.monotonic() >= self._grace_deadline:
            self._kill_all("stopped after the grace period")
        if not self.options.timeout:
            return
        now_ns = time.monotonic_ns()
        for worker in self.workers:
            task_id, started = worker.slot[0], worker.slot[1]
            if task_id and (now_ns - started) / 1e9 > self.options.timeout and not worker.kill_reason:
                worker.kill_reason = f"timed out after {self.options.timeout:g}s (worker killed)"
                kill_group(worker.pid)

    # -- workers ------------------------------------------------------------------
    def _spawn(self) -> WorkerHandle | None:
        """A new worker, or None when a stop began while it was starting (a Ctrl-C must work
        even while the forkserver is still importing a slow processor module)."""
        try:
            worker = self.forkserver.start_worker(cancelled=lambda: self._stopping)
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
        if len(self.workers) < 2 * self.options.workers:  # else its exit starts the successor
            self._replace(worker)

    def _replace(self, worker: WorkerHandle) -> None:
        """Start one successor per worker that retires or dies, never two."""
        if not worker.replaced and not self._stopping:
            worker.replaced = True
            self._spawn()

    def _kill_all(self, reason: str) -> None:
        for worker in self.workers:
            if worker.process.is_alive():
                worker.kill_reason = worker.kill_reason or reason
                kill_group(worker.pid)
        self._grace_deadline = None

    def _shutdown(self) -> None:
        for worker in self.workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                kill_group(worker.pid)
                worker.process.join(5)
        leftover = [t[0] for w in self.workers for b in w.inflight for t in b.tasks]
        leftover += [t[0] for t in self._ready]  # claimed by the scan, never sent
        self._ready.clear()
        if leftover or self._reports:
            with self.ledger.transaction() as conn:
                for worker, report in self._reports:
                    self._apply_report(conn, worker, report)
                self.ledger.hand_back(conn, leftover)
        for worker in self.workers:
            worker.conn.close()
            worker.process.close()
        self.workers.clear()
        self.forkserver.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- signals and stopping --------------------------------------------------------
    def _stop(self, reason: str, message: str | None = None) -> None:
        if self.result.stop_reason is None:
            self.result.stop_reason = reason
            self.result.message = message
            if message:
                logger.error(message)

    def _install_signal_handlers(self) -> dict:
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, self._on_signal)
        return previous

    def _restore_signal_handlers(self, previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass
        if self._signals == 1:
            self._stop("interrupted")
            self._grace_deadline = time.monotonic() + self.options.grace_seconds
            logger.warning("{} received: finishing tasks in flight (up to {:g}s); "
                           "press Ctrl-C again to stop now", signal.Signals(signum).name,
                           self.options.grace_seconds)
        else:
            self._kill_all("stopped by a second signal")

    # -- progress ---------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "scanned": self.source.files if self.source else 0,
            "scan_finished": self.source is None or self.source.exhausted,
            "done": self.result.done,
            "failed": self.result.failed,
            "pending_left": self._pending_left,
            "running": len(self._claimed),
        }

    def _heartbeat(self) -> None:
        """Refresh this run's row (for `crawlproc status`) at most once a second, when it changed."""
        now = time.monotonic()
        if self.run_id is None or now - self._last_run_update < RUN_UPDATE_SECONDS:
            return
        state = (self.result.done, self.result.failed, self.run_info() if self.run_info else None)
        if state != self._last_run_state:
            with self.ledger.transaction() as conn:
                self.ledger.update_run(conn, self.run_id, *state)
            self._last_run_state = state
        self._last_run_update = now
