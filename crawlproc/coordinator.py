"""The coordinator: claims batches from the ledger, hands them to an executor, records what happens.

    ┌─────────── one loop turn ───────────────────────────────────────────────┐
    │ source.step()    more work into the ledger: a slice of the scan, or     │
    │                  settled watch events (while it has any)                │
    │ _commit_turn()   ONE transaction: events -> done/failed/pending         │
    │                  (outcomes.Outcomes), claims for the executor's openings│
    │ dispatch         the claimed batches go out, once their claim is kept   │
    │ _wait()          executor's pipes/futures + source + signal wake-up,    │
    │                  until an event, a retry or a deadline is due           │
    └─────────────────────────────────────────────────────────────────────────┘

It knows nothing of processes: an executor (executors/) runs the batches, here
or on a Dask cluster, and answers each with a BatchReport or a BatchLost. The
ledger, the claims, retries, the failure budget, signals and progress stay
here whatever the executor.

Work arrives from a *source* (`WorkSource`): a `scanner.Scan` for `run`, a
`watch.Watcher` for `watch`. The loop ends when the source is exhausted and
nothing is pending, or when it is told to stop.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from typing import Any, Protocol

from loguru import logger

from crawlproc.batching import MAX_BATCH_BYTES, BatchIds, BatchSizer, ReadyTasks
from crawlproc.children import stop_handler
from crawlproc.executors import BatchLost, Event, Executor, Opening
from crawlproc.ledger import Ledger
from crawlproc.outcomes import Outcomes, RetryPolicy, Tally
from crawlproc.task import relpath_for_people
from crawlproc.worker import BatchReport, WorkBatch

SCAN_SLICE = 2000
READY_LIMIT = 2 * SCAN_SLICE  # claimed-by-the-scan tasks held at most: memory stays flat
GRACE_SECONDS = 5.0
TICK_SECONDS = 0.5
RUN_UPDATE_SECONDS = 1.0


class WorkSource(Protocol):
    """Where new tasks come from; the coordinator calls `step` between its other duties."""

    files: int  # files recorded so far, for progress
    wakeup_fd: int | None  # readable when the source has something new (or None)
    claimed: list  # tasks the source recorded already claimed for us (ClaimedTask rows); we empty it

    @property
    def exhausted(self) -> bool: ...  # no more work will ever come
    @property
    def busy(self) -> bool: ...  # more to do right now: the loop must not block
    def step(self, max_files: int) -> int: ...  # record more work; how many files
    def wait_hint(self) -> float | None: ...  # longest the loop may block before the next step


@dataclass(frozen=True)
class CoordinatorOptions:
    policy: RetryPolicy = RetryPolicy()
    batch_size: int | None = None  # a cap; None = adaptive up to batching.DEFAULT_MAX_BATCH
    grace_seconds: float = GRACE_SECONDS


class Coordinator:
    def __init__(
        self,
        ledger: Ledger,
        executor: Executor,
        options: CoordinatorOptions,
        *,
        run_id: int | None = None,
        on_progress: Callable[[dict], None] | None = None,
        on_turn: Callable[[], None] | None = None,
        run_info: Callable[[], dict] | None = None,
        now: Callable[[], float] = time.time,
        out_hint: str = "",
    ) -> None:
        self.ledger = ledger
        self.executor = executor
        self.options = options
        self.run_id = run_id
        self.on_progress = on_progress or (lambda stats: None)
        self.on_turn = on_turn or (lambda: None)
        self.run_info = run_info
        self.now = now
        # Set by whoever wants each batch's done-task times (the status page's histogram);
        # None costs the loop nothing.
        self.on_done_times: Callable[[list[float]], None] | None = None
        self.tally = Tally()
        self.outcomes = Outcomes(ledger, options.policy, self.tally, now=now, out_hint=out_hint)
        self.sizer = BatchSizer(executor.target_batch_seconds, executor.parallelism, options.batch_size)
        self.batch_ids = BatchIds(ledger)
        self.source: WorkSource | None = None
        self._claimed: dict[int, tuple] = {}  # task id -> its ClaimedTask-shaped row, while in flight
        self._batches: dict[int, WorkBatch] = {}  # batch id -> batch, until reported or lost
        self._ready = ReadyTasks()
        self._events: list[Event] = []
        self._claimable = True
        self._retry_due: float | None = None
        self._signals = 0
        self._grace_deadline: float | None = None
        self._launched = False  # the executor's workers started
        self._last_run_update = 0.0
        self._last_run_state: tuple | None = (0, 0, None)  # what start_run wrote: no write until it changes
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    @property
    def result(self) -> Tally:
        return self.tally

    def batches_in_flight(self) -> tuple[set[int], int]:
        """Ids of batches whose result files may be written or not yet recorded, and the next id."""
        next_id = self.batch_ids.peek()
        return set(self._batches), next_id if next_id is not None else self.ledger.next_batch_id()

    def poke(self) -> None:
        """Something outside the loop put tasks back to pending: look again."""
        self._claimable = True

    def prepare_executor(self) -> None:
        """Work is certain (a new OUT): let the executor get ready while the scan starts."""
        self.executor.prepare()

    # -- the loop ------------------------------------------------------------
    def run(self, source: WorkSource | None) -> Tally:
        self.source = source
        ended = False
        with stop_handler(self._on_signal):  # SIGINT/SIGTERM stop the run gracefully (from a thread: stop=)
            try:
                while True:
                    if self._can_feed:
                        self._feed()
                    self._commit_turn()
                    self.executor.dispatch()
                    if self._finished():
                        self.on_progress({**self.stats(), "final": True})
                        break
                    self.on_turn()  # here every event received so far is in the ledger
                    self._wait()
                    self.on_progress(self.stats())
                    self._heartbeat()
                ended = True
            finally:
                self._shutdown()
                if not ended:  # an error ends the run (a lost scheduler): its row gets the counts reached
                    self._heartbeat_quietly()
        self._heartbeat(final=True)  # the row ends with this run's last counts and executor figures
        self.outcomes.closing_words()
        return self.tally

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
        return self.tally.stop_reason is not None

    def _finished(self) -> bool:
        if self._batches or self._events:
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
            self.sizer.pending_left = self.ledger.count_pending() + len(self._ready)
            self._claimable = True

    # -- one transaction per turn ----------------------------------------------
    def _commit_turn(self) -> None:
        """Apply what arrived and claim for every opening, in one transaction."""
        starting = not self._launched and self._has_work and not self._stopping
        if starting and not (self._ready or self._events) and not self._claimable_now():
            starting = False  # seen with a read: a no-op rerun commits no empty transactions
        room = self._launched and self._has_work and not self._stopping and self._has_opening()
        if not (self._events or room or starting):
            return
        with self.ledger.transaction() as conn:
            if starting:
                self._launch_if_work(conn)
            self._apply_events(conn)
            if self._stopping:
                return
            for opening in self.executor.openings():
                if not self._has_work:
                    break
                batch = self._claim(conn, opening)
                if batch is None:
                    break
                self.executor.assign(opening, batch)

    def _has_opening(self) -> bool:
        return next(iter(self.executor.openings()), None) is not None

    def _claimable_now(self) -> bool:
        """Could a pending task be claimed now? If not, nothing is until the source adds some."""
        now = self.now()
        if self.ledger.has_claimable(self.ledger.conn, now):
            return True
        self._none_claimable(self.ledger.conn, now)
        return False

    def _none_claimable(self, conn: Any, now: float) -> None:
        """No pending task may be claimed at `now` (the time the claim was made with, so that a
        retry coming due in between is on one side or the other): claim again when the soonest
        retry comes due. Asked of the ledger each time: tasks that failed a moment apart come
        due a moment apart, and a watch has no end of run to find the later ones."""
        self._claimable = False
        self._retry_due = self.ledger.soonest_retry(conn, now)

    def _launch_if_work(self, conn: Any) -> None:
        """Workers start only once there is something to do: a no-op rerun costs no processes."""
        now = self.now()
        if not self._ready and not self.ledger.has_claimable(conn, now):
            self._none_claimable(conn, now)
            return
        self.executor.prepare()
        if self._can_feed and (self.executor.warmup_left() or 0) > 0:
            return  # scan on while the executor gets ready; start the workers next turn
        self._launched = True
        self.executor.launch()

    def _claim(self, conn: Any, opening: Opening) -> WorkBatch | None:
        limit = min(self.sizer.size(), opening.max_tasks)
        now = self.now()
        if self._ready:
            tasks = self._ready.take(limit)
        else:
            tasks = self.ledger.claim(conn, limit, MAX_BATCH_BYTES, now)
        if not tasks:
            self._none_claimable(conn, now)
            return None
        for task in tasks:
            self._claimed[task[0]] = task
        self.sizer.claimed(len(tasks))
        batch = WorkBatch(self.batch_ids.take(conn), tuple(tasks))
        self._batches[batch.batch_id] = batch
        return batch

    def _apply_events(self, conn: Any) -> None:
        # Taken first: should recording one fail, its transaction is rolled back and the run ends
        # on that error, and no event is applied twice at shutdown (what it left running goes
        # back to pending at the next start).
        events, self._events = self._events, []
        for event in events:
            if type(event) is BatchReport:
                self._apply_report(conn, event)
            else:
                self._apply_loss(conn, event)
        outcomes = self.outcomes
        if outcomes.handed_back:
            self._claimable = True
            self.sizer.handed_back(outcomes.handed_back)
            outcomes.handed_back = 0
        if outcomes.retry_due is not None:
            self._retry_due = outcomes.retry_due if self._retry_due is None else min(self._retry_due,
                                                                                    outcomes.retry_due)
            outcomes.retry_due = None

    def _apply_report(self, conn: Any, report: BatchReport) -> None:
        self._batches.pop(report.batch_id)
        elapsed = self.outcomes.apply_report(conn, report, self._claimed)
        self.sizer.learn(elapsed)
        if self.on_done_times is not None:
            self.on_done_times(elapsed)
        logger.debug("batch {}: {} tasks in {:.3f}s by worker {}", report.batch_id, len(report.outcomes),
                     sum(outcome[3] for outcome in report.outcomes), report.pid)

    def _apply_loss(self, conn: Any, lost: BatchLost) -> None:
        tasks = [task for batch_id in lost.batch_ids for task in self._batches.pop(batch_id).tasks]
        self.outcomes.apply_loss(conn, lost, tasks, self._claimed)

    # -- waiting ----------------------------------------------------------------
    def _wait(self) -> None:
        ready = wait_for(self._waitables(), timeout=self._wait_timeout())
        self._events.extend(self.executor.collect(ready))
        if self._wake_r in ready:
            os.read(self._wake_r, 512)
        self._enforce_deadlines()

    def _waitables(self) -> list:
        items: list = [self._wake_r]
        if self.source is not None and self.source.wakeup_fd is not None:
            items.append(self.source.wakeup_fd)
        return items + self.executor.waitables()

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
            timeout = min(timeout, max(0.0, self._grace_deadline - time.monotonic()))
        warmup = self.executor.warmup_left()
        if warmup is not None and not self._launched and not self._stopping:
            timeout = min(timeout, warmup)
        check = self.executor.next_check()
        if check is not None:
            timeout = min(timeout, check)
        return timeout

    def _enforce_deadlines(self) -> None:
        if self._retry_due is not None and self.now() >= self._retry_due:
            self._retry_due = None
            self._claimable = True
        if self._grace_deadline is not None and time.monotonic() >= self._grace_deadline:
            self._grace_deadline = None
            self.executor.kill_all("stopped after the grace period")

    def _shutdown(self) -> None:
        """Stop the executor; record what it still reported; hand back everything else."""
        try:
            self._events.extend(self.executor.close())
            leftover = [task[0] for task in self._ready.drain()]  # claimed by the scan, never sent
            if not (self._events or self._batches or leftover):
                return
            with self.ledger.transaction() as conn:
                self._apply_events(conn)
                leftover += [task[0] for batch in self._batches.values() for task in batch.tasks]
                self.outcomes.hand_back(conn, leftover)
                self._batches.clear()
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- signals and stopping --------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals += 1
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass
        if self._signals == 1:
            self.request_stop(f"{signal.Signals(signum).name} received")
        else:
            self.executor.kill_all("stopped by a second signal")

    def request_stop(self, why: str) -> None:
        """Stop claiming; let batches in flight finish for the grace period; then stop them."""
        if self._stopping:
            return
        self.outcomes.stop("interrupted", None)
        self._grace_deadline = time.monotonic() + self.options.grace_seconds
        again = "; press Ctrl-C again to stop now" if self._signals else ""  # not for a stop asked from Python
        logger.warning("{}: finishing tasks in flight (up to {:g}s){}", why, self.options.grace_seconds, again)
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass

    # -- progress ---------------------------------------------------------------------
    def stats(self) -> dict:
        return {
            "scanned": self.source.files if self.source else 0,
            "scan_finished": self.source is None or self.source.exhausted,
            "done": self.tally.done,
            "failed": self.tally.failed,
            "pending_left": self.sizer.pending_left,
            "running": len(self._claimed),
            "executor": self.executor.describe(),
        }

    def live_view(self) -> dict:
        """This run as the status page shows it (serve.LiveBoard asks at most every ~0.5 s):
        the progress counters, the executor, and each worker's current task by path."""
        described = dict(self.executor.describe())
        now_ns = time.monotonic_ns()
        workers = []
        for pid, task_id, started_ns in described.pop("current", ()):
            row = self._claimed.get(task_id) if task_id else None
            workers.append({"pid": pid, "task": row[0] if row else None,
                            "relpath": relpath_for_people(row[1]) if row else None,
                            "running_s": (now_ns - started_ns) / 1e9 if row else None})
        return {**self.stats(), "retried": self.tally.retried, "stopping": self._stopping,
                "executor": described, "workers": workers, "watch": self.run_info() if self.run_info else None}

    def _heartbeat_quietly(self) -> None:
        """The final heartbeat on the way out of an error, which it must not hide."""
        try:
            self._heartbeat(final=True)
        except Exception as exc:  # the ledger itself may be what failed
            logger.debug("the run's row could not get its last counts: {!r}", exc)

    def _heartbeat(self, *, final: bool = False) -> None:
        """Refresh this run's row (for `crawlproc status`) at most once a second (and once at the
        end), when it changed."""
        now = time.monotonic()
        if self.run_id is None or (now - self._last_run_update < RUN_UPDATE_SECONDS and not final):
            return
        # `waiting`: tasks its scan recorded as running, claimed in the same write, that no worker
        # has yet: `status` counts them as pending (see report.status_from).
        info = {**(self.run_info() if self.run_info else {}), "waiting": len(self._ready)}
        state = (self.tally.done, self.tally.failed, info)
        if state != self._last_run_state:
            with self.ledger.transaction() as conn:
                self.ledger.update_run(conn, self.run_id, *state)
            self._last_run_state = state
        self._last_run_update = now
