"""What a Dask task runs on a Dask worker: a group of batches, each in a crawlproc worker process there.

    Dask worker process (one thread per Dask task slot)
      run_batches(job, batches) ──> BatchRunner of this job ──pipe──> crawlproc worker process
           │  waits on the pipe + its sentinel, enforces       (forked by a crawlproc forkserver
           │  --timeout / --max-memory-per-task (TaskLimits)     started on this Dask worker; the
           └─ returns a BatchReport per batch                   same worker_main as locally)

The batch does not run in the Dask worker's own thread: a thread cannot be
killed (Dask has no task timeout), a segfault would take the Dask worker down,
and a death could not be pinned on one task. In a crawlproc worker process with
the usual shared slot, all of that works exactly as locally: a task that hangs,
crashes or eats memory is reported FAILED with the reason, the other tasks of
the batch RETURNED (unpenalised), and the Dask worker stays usable.

Runners are kept per job (by its token) in the Dask worker process, one
crawlproc worker per Dask thread, recycled after --max-tasks-per-child tasks.
A runner idle for IDLE_SECONDS stops its processes, so a cluster that outlives
a coordinator (killed, or just finished) does not keep them.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for

from crawlproc.executors import MAX_STARTUP_DEATHS, WorkerLimits
from crawlproc.processes import ForkServer, WorkerHandle, describe_death, kill_group
from crawlproc.supervision import TaskLimits
from crawlproc.worker import FAILED, RETURNED, BatchReport, WorkBatch, WorkerConfig

IDLE_SECONDS = 60.0
STOP_SECONDS = 5.0


SHARED_PATHS = "DATA_DIR, OUT and a processor file must be on a file system every worker mounts at the same path"


class SharedPathsMissing(Exception):
    """This Dask worker does not see DATA_DIR, OUT or the processor's file at the coordinator's paths."""

    def __init__(self, address: str | None, problem: str) -> None:
        super().__init__(address, problem)  # args, so that it pickles back to the coordinator whole
        self.address, self.problem = address, problem

    def __str__(self) -> str:
        return f"Dask worker {self.address}: {self.problem}"


@dataclass(frozen=True)
class RemoteJob:
    """What every batch of a job carries to the cluster (small and picklable)."""

    token: str  # one per coordinator run: runners and the token file are keyed on it
    config: WorkerConfig
    limits: WorkerLimits
    token_file: str  # OUT/<name> holding `token`: proves this worker sees OUT at the same path
    data_dir: str


def check_shared_paths(job: RemoteJob) -> str | None:
    """None when this process sees DATA_DIR, OUT and the processor's file (if it has one and is
    not sent by value) where the coordinator does, else why not."""
    from crawlproc.processors.base import processor_file

    if not os.path.isdir(job.data_dir):
        return f"DATA_DIR {job.data_dir} is not a folder there"
    code = processor_file(job.config.processor) if job.config.shipped is None else None
    if code is not None and not os.path.isfile(code):
        return f"the processor file {code} is not there"
    try:
        with open(job.token_file, encoding="ascii") as f:
            seen = f.read().strip()
    except OSError as exc:
        return f"OUT is not shared: cannot read {job.token_file} ({exc.strerror or exc})"
    if seen != job.token:
        return f"OUT is not the same folder there ({job.token_file} holds another run's token)"
    return None


def warm_up(job: RemoteJob) -> str | None:
    """Called on every Dask worker at the start of a run: check the paths, start the forkserver."""
    problem = check_shared_paths(job)
    if problem is None:
        _runner(job).prepare()
    return problem


def run_batches(job: RemoteJob, batches: tuple[WorkBatch, ...]) -> list[BatchReport]:
    """The Dask task: the batches one after the other, each in a crawlproc worker process of
    this Dask worker (recycled between batches as locally). Once the job is stopped
    here (stop_job), the batches not yet run come back untouched, blaming nobody."""
    runner = _runner(job)
    where = _dask_worker_address()
    reports = []
    for batch in batches:
        report = _untouched(batch) if runner.closed else runner.run(batch)
        reports.append(replace(report, where=where))
    return reports


def _untouched(batch: WorkBatch) -> BatchReport:
    return BatchReport(batch.batch_id, 0, [(task[0], RETURNED, None, 0.0) for task in batch.tasks])


def _dask_worker_address() -> str | None:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):  # not in a Dask worker (a test calling run_batches directly)
        return None


def stop_job(token: str) -> int:
    """Stop the processes of a job on this Dask worker (at the end of a run, or to kill it)."""
    with _RUNNERS_LOCK:
        runner = _RUNNERS.pop(token, None)
    if runner is None:
        return 0
    return runner.close(kill=True)


_RUNNERS: dict[str, BatchRunner] = {}
_RUNNERS_LOCK = threading.Lock()


def _runner(job: RemoteJob) -> BatchRunner:
    with _RUNNERS_LOCK:
        runner = _RUNNERS.get(job.token)
        if runner is None:
            problem = check_shared_paths(job)
            if problem is not None:
                raise SharedPathsMissing(_dask_worker_address(), problem)
            runner = _RUNNERS[job.token] = BatchRunner(job)
            _start_reaper()
        return runner


_reaper: threading.Thread | None = None


def _start_reaper() -> None:
    """A daemon thread that stops runners nobody used for IDLE_SECONDS (caller holds the lock)."""
    global _reaper
    if _reaper is not None and _reaper.is_alive():
        return
    _reaper = threading.Thread(target=_reap_idle, name="crawlproc-reaper", daemon=True)
    _reaper.start()


def _reap_idle() -> None:
    while True:
        time.sleep(IDLE_SECONDS / 4)
        with _RUNNERS_LOCK:
            idle = [token for token, runner in _RUNNERS.items() if runner.idle_for() > IDLE_SECONDS]
            stale = [_RUNNERS.pop(token) for token in idle]
            if not _RUNNERS:
                globals()["_reaper"] = None
        for runner in stale:
            runner.close(kill=False)
        if not stale and globals()["_reaper"] is None:
            return


TRIM = "MALLOC_TRIM_THRESHOLD_"


def worker_environment() -> dict[str, str]:
    """The environment of crawlproc's worker processes here: this Dask worker's, without the
    malloc trim threshold Dask's nanny sets for its own long-lived workers.

    With a trim (or mmap) threshold set, glibc stops adapting its mmap threshold, so every
    large buffer a processor allocates for a read (`linecount` reads in 16 MB blocks, whatever
    the file's size) costs an mmap, page faults and a munmap: measured, 2.5x the CPU per tiny
    file, the same locally with the variable set. crawlproc's workers are recycled and hold no
    data, so they run as local ones do. A value other than Dask's own (the user's) is kept."""
    env = dict(os.environ)
    try:
        import dask

        dasks = dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {}
    except ImportError:
        dasks = {}
    if TRIM in dasks and env.get(TRIM) == str(dasks[TRIM]):
        del env[TRIM]
    return env


class BatchRunner:
    """The crawlproc worker processes of one job on this Dask worker: one per busy thread."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job
        self.forkserver = ForkServer(job.config, env=worker_environment())
        self.limits = TaskLimits(job.limits.timeout, job.limits.max_memory_per_task)
        self._idle: list[WorkerHandle] = []
        self._running: dict[int, WorkerHandle] = {}  # pid -> worker on a batch now
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # the forkserver serves one request at a time
        self._busy = 0
        self._last_used = time.monotonic()
        self._closed = False
        self._startup_deaths = 0  # workers in a row that died before any report

    def prepare(self) -> None:
        with self._lock:
            self.forkserver.start()

    @property
    def closed(self) -> bool:
        """Stopped (stop_job, or idle too long): it starts no process any more."""
        return self._closed

    def idle_for(self) -> float:
        with self._lock:
            return 0.0 if self._busy else time.monotonic() - self._last_used

    def run(self, batch: WorkBatch) -> BatchReport:
        worker = self._checkout()
        with self._lock:
            self._running[worker.pid] = worker
        try:
            report = self._run_on(worker, batch)
        except BaseException:
            kill_group(worker.pid)
            self._drop(worker)
            raise
        finally:
            with self._lock:
                self._running.pop(worker.pid, None)
        self._checkin(worker, report)
        return report

    def _checkout(self) -> WorkerHandle:
        with self._lock:
            self._busy += 1
            if self._idle:
                return self._idle.pop()
            self.forkserver.start()
        try:
            with self._start_lock:
                return self.forkserver.start_worker()
        except BaseException:
            with self._lock:
                self._busy -= 1
            raise

    def _checkin(self, worker: WorkerHandle, report: BatchReport) -> None:
        """Keep the worker for the next batch, unless it must retire or has ended."""
        retire = (report.retiring or worker.tasks_sent >= self.job.limits.max_tasks_per_child
                  or not worker.process.is_alive())
        if retire:
            self._retire(worker)
        with self._lock:
            self._busy -= 1
            self._last_used = time.monotonic()
            if not retire and not self._closed:
                self._idle.append(worker)
                return
        if not retire:
            self._retire(worker)

    def _run_on(self, worker: WorkerHandle, batch: WorkBatch) -> BatchReport:
        """Send the batch; wait for its report, or for the worker's death (then say which task
        it died on), enforcing the per-task limits meanwhile."""
        worker.tasks_sent += len(batch.tasks)
        worker.inflight.append(batch)
        try:
            worker.conn.send(batch)
        except OSError:
            pass  # it died: its sentinel says so below
        while True:
            ready = wait_for([worker.conn, worker.process.sentinel], timeout=self._next_check(worker))
            if worker.conn in ready:
                try:
                    report = worker.conn.recv()
                except (EOFError, OSError):
                    report = None  # it died while sending
                if report is not None:
                    worker.inflight.clear()
                    worker.reported = True
                    with self._lock:
                        self._startup_deaths = 0
                    return report
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join()
                return self._death_report(worker, batch)
            self.limits.enforce([worker])

    def _next_check(self, worker: WorkerHandle) -> float:
        check = self.limits.next_check([worker])
        return 0.5 if check is None else min(check, 0.5)

    def _death_report(self, worker: WorkerHandle, batch: WorkBatch) -> BatchReport:
        """The worker died during `batch`: the task in its slot failed, the others come back
        (all of them, when the job was stopped: that death is nobody's fault)."""
        exitcode = worker.process.exitcode
        ours = worker.process.status_lost or self._closed
        blamed = worker.slot[0] if not ours else 0
        reason = worker.kill_reason or describe_death(exitcode)
        outcomes = []
        for task in batch.tasks:
            if task[0] == blamed:
                outcomes.append((task[0], FAILED, (reason, None), 0.0))
            else:
                outcomes.append((task[0], RETURNED, None, 0.0))
        worker.inflight.clear()
        broken_start = None
        if not (ours or blamed or worker.reported or worker.kill_reason):  # died before any task
            with self._lock:
                self._startup_deaths += 1
                deaths = self._startup_deaths
            if deaths >= MAX_STARTUP_DEATHS:
                broken_start = ("crawlproc worker processes keep dying here before running any task "
                                f"({describe_death(exitcode, in_a_task=False)})")
        return BatchReport(batch.batch_id, worker.pid, outcomes, setup_error=broken_start)

    def _retire(self, worker: WorkerHandle) -> None:
        try:
            worker.conn.send(None)  # it exits when it has read this
        except OSError:
            pass
        worker.process.join(STOP_SECONDS)
        if worker.process.is_alive():
            kill_group(worker.pid)
            worker.process.join(STOP_SECONDS)
        self._drop(worker)

    def _drop(self, worker: WorkerHandle) -> None:
        worker.conn.close()
        if worker.process.is_alive():
            return  # still ending: its sentinel stays open with it
        worker.process.close()

    def close(self, *, kill: bool) -> int:
        """Stop every process of this runner; returns how many workers it had."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            running = list(self._running.values())
        if kill:
            for worker in running:  # their batches come back from _run_on, unblamed
                kill_group(worker.pid)
        for worker in idle:  # told to end, as locally: each runs its processor's teardown first
            self._retire(worker)
        self.forkserver.close()
        return len(idle)
