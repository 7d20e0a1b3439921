"""The Dask executor: batches run as futures on a Dask distributed cluster.

    coordinator ──assign/dispatch──> client.submit(remote.run_batches, job, batches) ──> Dask worker
         ^                                                                           │ crawlproc worker
         └── collect(): a BatchReport per batch (the future's result) | BatchLost <── done callback ┘ process there

Only batch descriptors travel (ids, paths, byte ranges); each Dask task runs
whole batches in a crawlproc worker process on its Dask worker (see remote.py)
and writes the batch's one result file under OUT, which the cluster shares.
At most PER_THREAD Dask tasks per Dask worker thread are in flight, topped up
as futures complete (a done callback wakes the coordinator's wait): the
scheduler never holds more than a few hundred crawlproc tasks, and the first
results come in seconds however big the tree is.

A Dask task is a group of batches run one after the other (remote.run_batches),
as many as make about `target_batch_seconds` of work: a batch stays at most
--batch-size tasks with its own result file and recycling as locally, while
tiny files no longer cost a scheduler round trip per 10 ms batch (measured on
100,000 tiny files: most of Dask's time over a local run).

Dask runs a task at least once and forgets everything when its scheduler
dies; the ledger makes each task count once: a report is recorded only for a
batch still in flight, and batch ids (so result names) are never reused. On
a cluster this executor starts itself (`--scheduler local[:N]`) Dask's own
retries are off (allowed-failures 0): a batch whose Dask worker died comes
back as BatchLost and the coordinator claims its tasks again, blaming nobody.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from loguru import logger

from crawlproc.children import forking_is_safe, stop_handler
from crawlproc.errors import CrawlprocError, UsageError
from crawlproc.executors import BatchLost, Event, Opening, WorkerLimits, lifeline, stop_if_setup_failed
from crawlproc.executors.remote import SHARED_PATHS, RemoteJob, SharedPathsMissing, run_batches, stop_job, warm_up
from crawlproc.options import RUN_OPTIONS
from crawlproc.results import TEMP_SUFFIX
from crawlproc.worker import BatchReport, WorkBatch, WorkerConfig
from crawlproc.words import plural

PER_THREAD = 3  # Dask tasks in flight per Dask worker thread: one running, the next ones queued
MAX_GROUP = 16  # batches in one Dask task, at most: 16 x 512 tiny tasks is ~0.2 s of work
CONNECT_SECONDS = 10.0
CONNECT_GRACE_SECONDS = 5.0  # past CONNECT_SECONDS: a server that holds Dask's handshake is given up on
WORKERS_SECONDS = 60.0  # a scheduler without workers: how long to wait for the first one
WORKERS_REFRESH_SECONDS = 5.0  # how often a run reads the cluster's workers again
WORKERS_READ_SECONDS = 2.0  # and how long it waits for that answer
STOP_SECONDS = 5.0
TOKEN_PREFIX = ".crawlproc-dask-"  # OUT/.crawlproc-dask-<token>.tmp: a temp file, so a dead run's is swept
INSTALL_HINT = "pip install 'crawlproc[dask]'"
CHECK_ATTEMPTS = 3  # start-up checks of the workers, while some die meanwhile
LOCAL = "local"


def check_available() -> None:
    """UsageError (exit 2) when the dask extra is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UsageError(f"--executor dask needs Dask distributed: {INSTALL_HINT}") from None


class DaskExecutor:
    name = "dask"
    target_batch_seconds = 0.5  # each batch costs a scheduler round trip (~1 ms): keep it a small part

    def __init__(self, config: WorkerConfig, limits: WorkerLimits, *, scheduler: str | None,
                 data_dir: Any, cancelled: Callable[[], bool] = lambda: False) -> None:
        check_available()
        _quiet_dask_logging()
        self.scheduler = scheduler
        self.limits = limits
        self.parallelism = limits.workers  # until the cluster says how many threads it has
        self._cancelled = cancelled
        token = secrets.token_hex(8)
        out = os.path.abspath(config.out)
        self.job = RemoteJob(token, replace(config, out=out), limits,
                             os.path.join(out, f"{TOKEN_PREFIX}{token}{TEMP_SUFFIX}"), os.path.abspath(data_dir))
        self.client: Any = None
        self.cluster: Any = None  # ours to close, for --scheduler local
        self.address: str | None = None
        self.workers: dict[str, int] = {}  # Dask worker address -> threads
        self._aside: dict[str, str] = {}  # Dask workers that joined blind to our paths -> what they miss
        self._capacity = 0  # Dask tasks in flight, at most
        self._in_flight: dict[str, tuple[Any, tuple[int, ...]]] = {}  # a future's key -> it, its batch ids
        self._unsent: list[WorkBatch] = []
        self._grouping = Grouping(self.target_batch_seconds)
        self._dask_tasks = 0  # submitted so far
        self._workers_read_at = 0.0
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_lock = threading.Lock()  # callbacks never write to the pipe once it is closed
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # -- starting ------------------------------------------------------------------
    def prepare(self) -> None:
        """Connect (or start the local cluster) and check every worker, once."""
        if self.client is not None:
            return
        try:
            self._connect()
            Path(self.job.token_file).write_text(self.job.token + "\n", encoding="ascii")
            self._check_workers()
        except BaseException:  # no run follows to close what we opened (from Python: a cluster left)
            self._close_connection()
            raise

    def warmup_left(self) -> float | None:
        return None

    def launch(self) -> None:
        self.prepare()
        self._read_workers()  # workers may have come or gone since

    def _connect(self) -> None:
        address = scheduler_address(self.scheduler)
        local = local_cluster_size(address, self.limits.workers)
        if local is not None:
            self.cluster = _local_cluster(local, address)
            address = self.cluster.scheduler_address
        self.client = _client(address)
        self.address = address
        self._read_workers()
        if not self.workers:
            logger.info("waiting up to {:g}s for a Dask worker to join the scheduler at {}", WORKERS_SECONDS, address)
            try:
                self.client.wait_for_workers(1, timeout=WORKERS_SECONDS)
            except TimeoutError:
                raise UsageError(f"no Dask worker joined the scheduler at {address} within {WORKERS_SECONDS:g}s: "
                                 f"start some (`dask worker {address}` on each node, with DATA_DIR and OUT "
                                 "mounted at the same paths)") from None
            self._read_workers()

    def _lost_scheduler(self) -> CrawlprocError:
        return CrawlprocError(f"lost the connection to the Dask scheduler at {self.address}; the ledger "
                              "is consistent: run the same command again to resume")

    def _read_workers(self) -> None:
        try:
            info = self.client.scheduler_info(n_workers=-1)  # every worker: some versions list 5 unless told
        except TypeError:  # a version without that argument lists them all
            info = self.client.scheduler_info()
        self._take_workers({addr: w.get("nthreads", 1) for addr, w in info.get("workers", {}).items()})

    def _take_workers(self, workers: dict[str, int]) -> None:
        """The cluster's workers (address -> threads), and the work in flight they take."""
        self.workers = workers
        self._aside = {address: why for address, why in self._aside.items() if address in workers}  # gone: forgotten
        self.parallelism = sum(threads for address, threads in workers.items() if address not in self._aside) or 1
        self._capacity = PER_THREAD * self.parallelism
        self._workers_read_at = time.monotonic()

    def _follow_workers(self, *, now: bool = False) -> None:
        """Read the cluster's workers again every few seconds (or `now`), so that the work in flight
        follows its size (a worker that joins gets work) and so does what status shows; say who came
        or went. A scheduler slow to answer keeps the last answer: the run waits WORKERS_READ_SECONDS
        at most."""
        if self.client.status != "running" or (
                not now and time.monotonic() < self._workers_read_at + WORKERS_REFRESH_SECONDS):
            return
        self._workers_read_at = time.monotonic()
        try:
            threads = self.client.nthreads(callback_timeout=WORKERS_READ_SECONDS)
        except Exception as exc:  # slow, or gone (the next collect says so): not an empty cluster
            logger.debug("the Dask scheduler did not say which workers it has: {!r}", exc)
            return
        before = self.workers
        self._take_workers(dict(threads))
        size = f"{plural(len(self.workers), 'worker')}, {plural(sum(self.workers.values()), 'thread')} now"
        for address in sorted(set(before) - set(self.workers)):
            logger.warning("Dask worker {} left the cluster; its batches go to the others ({})", address, size)
        for address in sorted(set(self.workers) - set(before)):
            logger.info("Dask worker {} joined the cluster ({})", address, size)

    def _check_workers(self) -> None:
        """Every Dask worker must see DATA_DIR and OUT at the same paths, before any claim.

        A worker that dies while it is asked (its connection closes) is no verdict on the
        others: the check runs again on the workers there are then (its nanny may restart it)."""
        from distributed.comm import CommClosedError

        for _ in range(CHECK_ATTEMPTS):
            answers = self.client.run(warm_up, self.job, on_error="return")
            left = sorted(a for a, answer in answers.items() if isinstance(answer, CommClosedError))
            if not left:
                break
            logger.warning("Dask worker {} left during the start-up check; checking the workers again",
                           ", ".join(left))
            self.client.wait_for_workers(1, timeout=60)
            self._read_workers()
        else:
            raise CrawlprocError(f"Dask workers keep leaving during the start-up check ({', '.join(left)}); "
                                 "nothing is lost, run the same command again once the cluster is steady")
        for address, answer in sorted(answers.items()):
            if isinstance(answer, BaseException):
                raise UsageError(f"Dask worker {address} cannot run crawlproc: {answer!r} "
                                 "(is crawlproc installed there, at the same version?)")
            if answer is not None:
                raise UsageError(f"Dask worker {address}: {answer}; {SHARED_PATHS}")
        own_size = self.cluster is None and self.limits.workers != RUN_OPTIONS["workers"].default  # -w was given
        logger.info("Dask cluster at {}: {}, {}{}", self.address, plural(len(self.workers), "worker"),
                    plural(self.parallelism, "thread"),
                    f" (-w {self.limits.workers} does not size a cluster of your own)" if own_size else "")

    # -- batches ---------------------------------------------------------------------
    def openings(self) -> Iterator[Opening]:
        """Room for batches while the Dask tasks in flight and the groups the unsent batches
        make stay under the capacity, or the last of those groups can take one more batch."""
        while True:
            groups = self._grouping.split(self._unsent)
            planned = len(self._in_flight) + len(groups)
            if planned < self._capacity or (groups and planned == self._capacity
                                            and self._grouping.can_grow(groups[-1])):
                yield Opening(None, self.limits.max_tasks_per_child)
            else:
                return

    def assign(self, opening: Opening, batch: WorkBatch) -> None:
        self._grouping.note(batch)
        self._unsent.append(batch)

    def dispatch(self) -> None:
        for batches in self._grouping.split(self._unsent):
            ids = tuple(batch.batch_id for batch in batches)
            key = f"crawlproc-{self.job.token}-{ids[0]}"  # batch ids are never reused: nor are keys
            try:
                future = self.client.submit(run_batches, self.job, batches, key=key, pure=False, retries=0,
                                            **self._placement())
            except Exception:  # the client closed: its scheduler is gone (a watch that was idle)
                if self.client.status == "running":
                    raise
                raise self._lost_scheduler() from None
            self._dask_tasks += 1
            self._in_flight[key] = (future, ids)
            future.add_done_callback(self._on_done)
        self._unsent.clear()

    def _placement(self) -> dict[str, Any]:
        """Where a Dask task may run: anywhere, until a worker is set aside; then on the others,
        loosely (were they all to leave, the scheduler places it on any worker rather than hold it
        for ever; a blind one hands it back again)."""
        allowed = sorted(set(self.workers) - set(self._aside)) if self._aside else []
        return {"workers": allowed, "allow_other_workers": True} if allowed else {}

    def _set_aside(self, exc: SharedPathsMissing) -> None:
        """A Dask worker that joined after the start-up check and does not see our paths: it gets
        no more batches of this run, and the batch it handed back goes to the others, blaming
        nobody. An autoscaled node without the mount must not end a run of hours that the other
        workers can finish; with no worker left that sees the paths, the run stops (exit 2)."""
        if exc.address is None:
            raise UsageError(f"{exc}; {SHARED_PATHS}")
        new = exc.address not in self._aside  # else one of its batches sent before, or sent since to it
        self._aside[exc.address] = exc.problem  # because no other worker was left: checked below
        self._follow_workers(now=new)
        left = sorted(set(self.workers) - set(self._aside))
        if not left:
            raise UsageError(f"{exc}, and no other Dask worker is left; {SHARED_PATHS}")
        if new:
            logger.warning("{}; it gets no more batches of this run, which goes on with {} ({})", exc,
                           plural(len(left), "other worker"), SHARED_PATHS)

    def _on_done(self, future: Any) -> None:
        """In Dask's callback thread: queue the future and wake the coordinator."""
        self._done.put(future)
        with self._wake_lock:
            if self._wake_w < 0:
                return  # closed: nobody waits any more
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # the pipe is full: the coordinator wakes anyway

    def in_flight(self) -> set[int]:
        return {batch_id for _, ids in self._in_flight.values() for batch_id in ids}

    # -- events ----------------------------------------------------------------------
    def waitables(self) -> list:
        return [self._wake_r]

    def collect(self, ready: list) -> list[Event]:
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        events: list[Event] = []
        while True:
            try:
                future = self._done.get_nowait()
            except queue.Empty:
                break
            events += self._events_of(future)
        if not events and self.client.status in ("closing", "closed"):
            raise self._lost_scheduler()  # the client gave up reconnecting: an idle watch learns it here
        self._follow_workers()
        return stop_if_setup_failed(events)

    def next_check(self) -> float | None:
        return None  # --timeout and memory limits are enforced next to the worker (remote.py)

    def _events_of(self, future: Any) -> list[Event]:
        _, ids = self._in_flight.pop(future.key, (None, None))
        if ids is None:
            return []  # not in flight any more (a late callback)
        status = future.status
        if status == "finished":
            reports: list[BatchReport] = future.result()
            self._grouping.learn(reports)
            return list(reports)
        if status == "error":
            return [self._error_event(ids, future.exception())]
        if self.client.status != "running":
            raise self._lost_scheduler()
        return [BatchLost(ids, None, f"Dask {status} the batch")]

    def _error_event(self, ids: tuple[int, ...], exc: BaseException) -> Event:
        from distributed.scheduler import KilledWorker

        named = f"batch {ids[0]}" if len(ids) == 1 else f"batches {ids[0]}-{ids[-1]}"
        if isinstance(exc, SharedPathsMissing):
            self._set_aside(exc)
            return BatchLost(ids, None, "its Dask worker does not see the shared paths")
        if isinstance(exc, KilledWorker):
            logger.warning("{}: their Dask worker died ({}); their tasks go back", named, exc)
            return BatchLost(ids, None, "its Dask worker died")
        raise CrawlprocError(f"a Dask worker failed to run {named}: {exc!r}")

    # -- stopping --------------------------------------------------------------------
    def kill_all(self, reason: str) -> None:
        logger.debug("stopping the batches on the Dask cluster: {}", reason)
        self._stop_remote()

    def _stop_remote(self) -> None:
        if self.client is None:
            return
        try:
            self.client.cancel([future for future, _ in self._in_flight.values()], force=True)
            self.client.run(stop_job, self.job.token, on_error="return")
        except Exception as exc:  # the scheduler may be gone: nothing more to stop there
            logger.debug("could not stop the batches on the Dask cluster: {!r}", exc)

    def close(self) -> list[Event]:
        """Wait a while for the batches in flight, stop the rest, disconnect."""
        events: list[Event] = []
        deadline = time.monotonic() + STOP_SECONDS
        try:
            while self._in_flight and self.client is not None and self.client.status == "running":
                from multiprocessing.connection import wait as wait_for

                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready = wait_for([self._wake_r], timeout=left)
                events += self.collect(ready)
        except CrawlprocError as exc:
            logger.debug("while stopping: {}", exc)
        finally:
            self._stop_remote()
            self._disconnect()
        return events

    def _close_connection(self) -> None:
        """Close the client and our own cluster (if any), and remove the token file."""
        try:
            os.unlink(self.job.token_file)
        except OSError:
            pass
        for thing in (self.client, self.cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # the scheduler is gone already
                    pass
        self.client = self.cluster = None

    def _disconnect(self) -> None:
        self._close_connection()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "scheduler": self.address, "scheduler_option": self.scheduler,
                "workers": len(self.workers), "threads": sum(self.workers.values()), "dask_tasks": self._dask_tasks}


def _client(address: str) -> Any:
    """A Client of the scheduler at `address`, or one UsageError line. Connecting runs in a thread
    of its own with a deadline: a server that is not a Dask scheduler can hold Dask's handshake
    for ever, whatever its timeout."""
    from distributed import Client

    made: list[Any] = []

    def connect() -> None:
        try:
            made.append(Client(address, timeout=CONNECT_SECONDS, set_as_default=False))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            made.append(exc)

    thread = threading.Thread(target=connect, name="crawlproc-dask-connect", daemon=True)
    thread.start()
    given = CONNECT_SECONDS + CONNECT_GRACE_SECONDS
    thread.join(given)
    if not made:
        raise UsageError(f"no Dask scheduler answered at {address} within {given:g}s "
                         "(is it a Dask scheduler's address?)")
    if isinstance(made[0], (OSError, TimeoutError)):
        raise UsageError(f"cannot reach the Dask scheduler at {address}: {made[0]}")
    if isinstance(made[0], TypeError) and "Worker." in str(made[0]):  # it answered Dask's handshake as a worker
        raise UsageError(f"--scheduler {address!r} is a Dask worker's address: give its scheduler's "
                         "(the address `dask worker` was started with)")
    if isinstance(made[0], (ValueError, TypeError)):
        raise UsageError(f"--scheduler {address!r} is not a Dask scheduler address: {made[0]} "
                         "(write tcp://HOST:PORT, local or local:N)")
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


class Grouping:
    """Which batches one Dask task runs, in claim order.

    A batch of short tasks cut by --batch-size (tiny files: 512 of them make ~10 ms) joins
    the group before it while the group's estimated work stays within `target_seconds`, at
    most MAX_GROUP batches. A batch that is smaller than the largest so far goes alone: the
    batches of a run's tail are made small on purpose so that every thread ends together.
    Until the first reports tell how long a task takes, every batch goes alone."""

    def __init__(self, target_seconds: float, most: int = MAX_GROUP) -> None:
        self.target_seconds, self.most = target_seconds, most
        self.task_seconds: float | None = None
        self.largest = 0  # tasks in the largest batch claimed so far

    def learn(self, reports: list[BatchReport]) -> None:
        times = [outcome[3] for report in reports for outcome in report.outcomes]
        if times:
            mean = sum(times) / len(times)
            self.task_seconds = mean if self.task_seconds is None else 0.7 * self.task_seconds + 0.3 * mean

    def note(self, batch: WorkBatch) -> None:
        """A batch was claimed (it is the largest so far, or a smaller one)."""
        self.largest = max(self.largest, len(batch.tasks))

    def split(self, batches: list[WorkBatch]) -> list[tuple[WorkBatch, ...]]:
        groups: list[list[WorkBatch]] = []
        for batch in batches:
            if groups and self.can_grow(groups[-1], batch):
                groups[-1].append(batch)
            else:
                groups.append([batch])
        return [tuple(group) for group in groups]

    def can_grow(self, group: list[WorkBatch] | tuple[WorkBatch, ...], batch: WorkBatch | None = None) -> bool:
        """Can `batch` (by default: a batch of the largest size) join `group`?"""
        if self.task_seconds is None or len(group) >= self.most:
            return False
        added = self.largest if batch is None else len(batch.tasks)
        if any(len(member.tasks) < self.largest for member in group) or added < self.largest:
            return False
        return (sum(len(member.tasks) for member in group) + added) * self.task_seconds <= self.target_seconds


class _ToLoguru(logging.Handler):
    """Dask's own log records, into crawlproc's log at debug level: the file keeps them, and
    stderr stays one clear line per problem (Dask logs tracebacks when a scheduler vanishes)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger.opt(exception=None).debug("dask: {}: {}", record.name, record.getMessage())


def _quiet_dask_logging() -> None:
    """Dask configures handlers of its own on several loggers when imported: replace them all."""
    names = [name for name in logging.root.manager.loggerDict
             if name.split(".", 1)[0] in ("distributed", "tornado")]
    for name in {"distributed", "tornado", *names}:
        dask_logger = logging.getLogger(name)
        for handler in list(dask_logger.handlers):
            dask_logger.removeHandler(handler)
        dask_logger.addHandler(_ToLoguru())
        dask_logger.propagate = False


# Dask settings for the LocalCluster crawlproc starts itself (`--scheduler local`), never for a
# cluster of yours. Retries are crawlproc's. It has no dashboard, so nothing reads Dask's
# profiler or system monitor, and its periodic checks run in the coordinator's own process
# (the scheduler and the nannies live there) beside the workers on the same cores: measured on
# 5,000 files of ~2 ms each, 6.02 s with Dask's defaults, 5.91 s with these.
OWN_CLUSTER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.worker.profile.enabled": False,  # a stack sample every 10 ms in each worker
    "distributed.admin.system-monitor.interval": "2s",  # 500 ms
    "distributed.admin.tick.interval": "500ms",  # 20 ms: an event-loop health check
    "distributed.worker.memory.monitor-interval": "1s",  # 100 ms; crawlproc limits memory per task itself
    "distributed.scheduler.work-stealing": False,  # at most 3 of our tasks per thread: nothing to steal
}


def scheduler_address(given: str | None) -> str:
    """--scheduler, else Dask's own setting (DASK_SCHEDULER_ADDRESS, scheduler-address), else a
    UsageError saying how to give one. Checked before OUT is made, and again on connecting."""
    import dask

    address = given or dask.config.get("scheduler-address", None)
    if not address:
        raise UsageError(
            "--executor dask needs a scheduler: --scheduler tcp://HOST:8786 (a running `dask scheduler`), "
            "--scheduler local[:N] (a cluster of N processes here), or DASK_SCHEDULER_ADDRESS")
    local_cluster_size(address, None)  # local:N written wrong: said now too
    return address


def local_cluster_size(address: str, workers: int | None) -> int | None:
    """N of `local:N`; for `local` alone, `workers` (-w, itself the CPU count by default); None
    for the address of a scheduler."""
    name, _, count = address.partition(":")
    if name != LOCAL:
        return None
    try:
        n = int(count) if count else workers or os.cpu_count() or 1
    except ValueError:
        raise UsageError(f"--scheduler {address!r}: write local or local:N (N worker processes)") from None
    if n < 1:
        raise UsageError(f"--scheduler {address!r}: N must be at least 1")
    return n


# Without a dashboard, Dask's scheduler still serves a few HTTP routes, on port 8787 unless told:
# next to a Dask dashboard of yours, that printed Dask's warning that the port is taken.
SCHEDULER_HTTP = "127.0.0.1:0"

# A worker that dies while the cluster starts (killed, out of memory) fails the whole start:
# Dask's nanny restarts workers only once the cluster is up.
CLUSTER_START_ATTEMPTS = 3


def _local_cluster(n: int, address: str) -> Any:
    """A LocalCluster of `n` worker processes, one thread each, whose scheduler leaves retries
    to crawlproc. It runs here when this process has no other thread; else in a process of its
    own (cluster_process.py)."""
    if forking_is_safe():
        return start_local_cluster(n, address)
    from crawlproc.executors.cluster_process import ClusterProcess

    return ClusterProcess(n, address)


def start_local_cluster(n: int, address: str) -> Any:
    """A LocalCluster of `n` workers forked from this process, which must have no other thread.

    Workers forked from here start in a fraction of a second, where spawned ones would each
    import Dask again (~0.7 s of CPU) and the caller's __main__ too (a script without a main
    guard would run again in each). A fork cannot keep OUT's lock (see children.py), and a fork
    from a process with other threads could copy a lock one of them holds: hence the process of
    its own for a notebook or a run in a thread. The fork method stays set while the cluster
    lives (a nanny restarting a killed worker reads it then); close() of what this returns
    sets it back."""
    import dask

    method = dask.config.set({"distributed.worker.multiprocessing-method": "fork"})
    lifeline.follow_me()  # a forked worker may hold what keeps another alive: see lifeline.py
    try:
        cluster, interrupted = _new_local_cluster(n, address)
    except BaseException:  # it could not start, or was asked twice to stop while it started
        method.__exit__(None, None, None)
        raise
    started = _ForkedCluster(cluster, method)
    if interrupted:  # Ctrl-C or SIGTERM while it started: now that it can be closed
        started.close()
        raise KeyboardInterrupt
    return started


def _new_local_cluster(n: int, address: str) -> tuple[Any, bool]:
    """A LocalCluster of `n` workers, started again when a worker dies while it starts; and
    whether a stop signal came meanwhile."""
    import dask
    from distributed import LocalCluster

    for attempt in range(1, CLUSTER_START_ATTEMPTS + 1):
        try:
            with _signals_held() as received, dask.config.set(OWN_CLUSTER_CONFIG):
                cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=logging.ERROR, preload=[lifeline.__name__],
                                       scheduler_kwargs={"dashboard_address": SCHEDULER_HTTP})
            return cluster, bool(received)
        except Exception as exc:  # e.g. RuntimeError('Nanny failed to start.'): a worker died starting
            if received:
                raise KeyboardInterrupt from None
            why = str(exc).rstrip(".")
            if attempt == CLUSTER_START_ATTEMPTS:
                raise CrawlprocError(f"the local Dask cluster (--scheduler {address}) could not start ({why}); "
                                     "nothing is lost, run the same command again") from None
            logger.warning("the local Dask cluster could not start ({}); starting it again ({} of {})", why,
                           attempt + 1, CLUSTER_START_ATTEMPTS)
    raise AssertionError("unreachable")


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM wait (the signals received are listed) while a LocalCluster starts:
    interrupted half-way it cannot be closed, and Dask's exit hooks print tracebacks for it."""
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:  # asked twice: now, tracebacks or not (a start that hangs)
            raise KeyboardInterrupt

    with stop_handler(hold):
        yield received


class _ForkedCluster:
    """A LocalCluster started here, and Dask's multiprocessing method to set back when it closes."""

    def __init__(self, cluster: Any, method: Any) -> None:
        self.cluster, self._method = cluster, method
        self.scheduler_address = cluster.scheduler_address

    def close(self) -> None:
        try:
            self.cluster.close()
        finally:
            self._method.__exit__(None, None, None)
