"""One job on an OUT, `run` or `watch`: from DATA_DIR to a merged output and an exit code.

    check DATA_DIR, OUT (not DATA_DIR, no links inside) ─> lock OUT ─> (rebuild a lost ledger) ─> open ledger
      ─> check identity ─> recover
      run:   scan ∥ coordinator ─> merge (done results crc-checked; damaged ones redone first)
      watch: catch-up scan ∥ coordinator, merge, then file events (or --poll scans) ∥ coordinator,
             merging every --merge-interval; systemd told READY, STATUS, WATCHDOG, STOPPING (notify.py)
      ─> summary.json ─> exit code (0 all done, 1 some failed or a path not scanned, 130 interrupted)
    --serve: the status page is bound first and served around all of it (serve/)

Everything here is sequencing; each step is owned by its module.
"""

from __future__ import annotations

import os
import resource
import shlex
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from crawlproc import logs
from crawlproc.children import forking_is_safe, stop_handler
from crawlproc.errors import CrawlprocError, Interrupted, UsageError
from crawlproc.finalize import (
    SUMMARY_NAME,
    MergeOutcome,
    default_output,
    merge_results,
    write_summary,
)
from crawlproc.coordinator import Coordinator, CoordinatorOptions
from crawlproc.executors import WorkerLimits, make_executor
from crawlproc.given_paths import inside
from crawlproc.identity import CODE_KEY, PYTHON_KEY, Verdict
from crawlproc.ledger import LEDGER_NAME, Ledger
from crawlproc.lock import LOCK_NAME, OutLock, refuse_if_held
from crawlproc.logs import LOG_DIR
from crawlproc.outcomes import RetryPolicy, Tally, out_hint
from crawlproc.processes import ForkServer
from crawlproc.processors.base import Processor, load, normalise_spec, spec_for_people
from crawlproc.processors.fingerprint import earlier_digests, fingerprint
from crawlproc.rebuild import note_closed, rebuild_if_lost
from crawlproc.results import RESULTS_DIR, identity_text, remove_temp_files, remove_unreferenced
from crawlproc.scanner import Scan
from crawlproc.walk import ScanOptions, ScanProblem, dir_id
from crawlproc.words import plural
from crawlproc.worker import WorkerConfig

if TYPE_CHECKING:
    from crawlproc.watch import Watcher

MAX_MERGE_ROUNDS = 3


@dataclass(frozen=True)
class RunOptions:
    data_dir: Path
    out: Path
    processor: str = "linecount"
    params: dict[str, str] = field(default_factory=dict)
    workers: int = os.cpu_count() or 1
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_tasks_per_child: int = 1000
    max_memory: int | None = None
    max_memory_per_task: int | None = None
    timeout: float | None = None
    retries: int = 2
    retry_delay: float = 0.5
    max_failures: tuple[float, bool] | None = None
    durable: bool = False
    retry_failed: bool = False
    reprocess: bool = False
    keep_results: bool = False  # accept edited processor code, keeping the done tasks' records
    batch_size: int | None = None
    follow_symlinks: bool = False
    chunk_size: int | None = None
    output: Path | None = None
    output_format: str = "jsonl"
    merge: bool = True
    executor: str = "local"
    scheduler: str | None = None
    source_column: str | None = None  # add each record's relpath under this name (see added_columns)
    # A processor given as an object (the Python API): `processor` is then its spec (shipping.py).
    processor_object: Processor | None = None
    shipped: bytes | None = None  # that processor by value, for workers that cannot import it
    import_paths: tuple[str, ...] = ()
    stop: Any = None  # a threading.Event: set from any thread, it stops the job as SIGINT would
    serve: str | None = None  # [HOST:]PORT of the live status page and /metrics (serve/)
    carried: tuple[str, ...] = ()  # options a carry-on command repeats, as arguments (options.carried_args)


@dataclass
class RunOutcome:
    exit_code: int
    summary: dict[str, Any] | None
    pool: Tally
    message: str | None = None


def prepare_out(out: Path) -> None:
    """Create OUT (and its logs folder), or say in one line why it cannot be used."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create OUT {out}: {exc.strerror}") from None
    if not out.is_dir():
        raise UsageError(f"OUT {out} exists and is not a folder")
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageError(f"OUT {out} is not writable")


# What crawlproc writes in OUT: none of these may be a symlink (a linked results/ would send writes anywhere).
OUT_ENTRIES = (LEDGER_NAME, f"{LEDGER_NAME}-wal", f"{LEDGER_NAME}-shm", LOCK_NAME, RESULTS_DIR, LOG_DIR, SUMMARY_NAME)


def check_out_is_not_data_dir(data_dir: Path, out: Path) -> None:
    """OUT is never input: the same folder (by its real path, or device and inode) is refused."""
    same_id = dir_id(out)
    if os.path.realpath(out) == os.path.realpath(data_dir) or (same_id is not None and same_id == dir_id(data_dir)):
        real = os.path.realpath(data_dir)
        sibling = os.path.join(os.path.dirname(real), os.path.basename(real) + "-crawlproc-out")
        raise UsageError(f"OUT {out} is DATA_DIR {data_dir} itself: crawlproc would take its own ledger, "
                         f"results and logs for input; give an OUT outside it, e.g. -o {shlex.quote(sibling)}")


def check_output_is_not_input(data_dir: Path, out: Path, output: Path | str | None) -> None:
    """The merged output is never input either: one in DATA_DIR (and not in OUT, which scans
    skip) would be taken in by the next scan, and processed again after every merge."""
    if output is None or output == "-":
        return
    real_output = os.fsencode(os.path.realpath(output))
    if inside(real_output, os.fsencode(os.path.realpath(data_dir))) and \
            not inside(real_output, os.fsencode(os.path.realpath(out))):
        raise UsageError(f"--output {output} is inside DATA_DIR {data_dir}: the next scan would take it in as input; "
                         "write it outside DATA_DIR, or into OUT")


def check_out_entries(out: Path) -> None:
    """Refuse an OUT whose ledger, lock, results, logs or summary is a symlink, rather than follow it."""
    for name in OUT_ENTRIES:
        path = out / name
        if path.is_symlink():
            raise UsageError(f"{path} is a symlink (to {os.readlink(path)}); crawlproc does not follow links "
                             f"inside OUT: remove it (rm {shlex.quote(str(path))}) or give another -o")


def check_data_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise UsageError(f"DATA_DIR {data_dir} does not exist")
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise UsageError(f"DATA_DIR {data_dir} is not readable")


def check_params(processor: Processor, params: dict[str, str]) -> None:
    """A built-in's --param rules (a missing program or a bad template for --cmd, a name
    csv-stats does not take): exit 2 now, not one failure per file."""
    if processor.check_params is not None:
        processor.check_params(params)


def load_processor(options: RunOptions) -> Processor:
    """The processor given as an object (the Python API), or the one -p names."""
    return options.processor_object if options.processor_object is not None else load(options.processor)


def run_identity(options: RunOptions, processor: Processor) -> dict[str, Any]:
    """What makes results comparable: a different identity means different output."""
    code = fingerprint(options.processor, processor)
    return {
        "data_dir": os.path.realpath(options.data_dir),
        "processor": normalise_spec(options.processor),
        "processor_version": processor.version,
        "params": dict(sorted(options.params.items())),
        "chunk_size": options.chunk_size,
        "added_columns": added_columns(options),
        CODE_KEY: code.digest,
        PYTHON_KEY: code.python,
    }


def earlier_code(options: RunOptions, processor: Processor) -> Callable[[], frozenset[str]]:
    """How to get the fingerprints earlier crawlprocs gave this code, computed only if asked."""
    return lambda: earlier_digests(options.processor, processor)


def added_columns(options: RunOptions) -> dict[str, str] | None:
    """--source-column NAME: the columns put in front of each record, relpath under NAME and,
    with --chunk-size, the task's byte offset under NAME_offset (0 for a file not split)."""
    if not options.source_column:
        return None
    columns = {"source": options.source_column}
    if options.chunk_size:
        columns["offset"] = f"{options.source_column}_offset"
    return columns


@dataclass
class _Job:
    """What every job on an OUT holds while it runs: the locked ledger, the processor, the identity."""

    options: RunOptions
    ledger: Ledger
    processor: Processor
    identity: dict[str, Any]
    run_id: int
    forkserver: ForkServer | None = None  # started before the ledger was made (see _open_job)
    board: Any = None  # --serve: serve.board.LiveBoard, which every coordinator of the job publishes to
    started: float = field(default_factory=time.monotonic)
    wall_started: float = field(default_factory=time.time)


@contextmanager
def _open_job(options: RunOptions, command: str, *, early_forkserver: bool = False) -> Iterator[_Job]:
    """Check paths, lock OUT, open the ledger, check identity, recover a dead run's leftovers.

    With `early_forkserver`, a new OUT (no ledger yet: every file will be work)
    gets the workers' forkserver started at once, so that it imports what
    workers need while the ledger is made and the scan begins.
    """
    check_data_dir(options.data_dir)
    if options.reprocess and options.keep_results:
        raise UsageError("--keep-results and --reprocess exclude each other: --reprocess redoes every task, "
                         "--keep-results keeps the done ones")
    check_out_is_not_data_dir(options.data_dir, options.out)
    check_output_is_not_input(options.data_dir, options.out, options.output)
    processor = load_processor(options)  # before OUT exists: a typo in -p leaves nothing behind
    check_params(processor, options.params)
    if options.executor == "dask":  # before OUT exists: nothing is left behind
        from crawlproc.executors.dask import check_available, scheduler_address

        check_available()
        scheduler_address(options.scheduler)
    prepare_out(options.out)
    check_out_entries(options.out)
    with OutLock(options.out):
        forkserver = None
        if early_forkserver and options.executor == "local" and not (options.out / LEDGER_NAME).exists():
            forkserver = ForkServer(worker_config(options, run_identity(options, processor)))
            forkserver.start()
        try:
            with _opened_ledger(options, command, processor, forkserver) as job:
                yield job
        finally:
            if forkserver is not None:
                forkserver.close()  # the pool closed it already, unless the job never got that far


@contextmanager
def _opened_ledger(options: RunOptions, command: str, processor: Processor,
                   forkserver: ForkServer | None) -> Iterator[_Job]:
    logs.add_file_sink(options.out)
    identity = run_identity(options, processor)
    rebuilt = rebuild_if_lost(options.out, identity, reprocess=options.reprocess,
                              accept_changed=frozenset({CODE_KEY, PYTHON_KEY}) if options.keep_results else frozenset())
    if rebuilt:
        logger.warning(rebuilt)
    ledger = Ledger(options.out / LEDGER_NAME, durable=options.durable)
    try:
        _log_verdict(ledger.settle_identity(identity, reprocess=options.reprocess, keep_results=options.keep_results,
                                            earlier_code=earlier_code(options, processor)), options.out, identity)
        _recover(options.out, ledger)
        ledger.record_scan_settings(scan_settings(options))
        ledger.record_run_options(list(options.carried))
        if options.retry_failed:
            logger.info("--retry-failed: {} back to pending", plural(ledger.retry(include_done=False), "failed task"))
        logger.debug("{} {} -> {}: processor {} v{}, {} workers", command, options.data_dir, options.out,
                     identity["processor"], processor.version, options.workers)
        run_id = ledger.start_run(command, os.getpid())
        try:
            yield _Job(options, ledger, processor, identity, run_id, forkserver)
        except CrawlprocError as exc:  # a handled stop (a scheduler lost, ...): not an abrupt end
            _end_run(ledger, run_id, exc.exit_code)
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside the coordinator's loop: interrupted, too
            _end_run(ledger, run_id, Interrupted.exit_code)
            raise
    finally:
        ledger.close()
        _note_closed(ledger.path)


def _end_run(ledger: Ledger, run_id: int, exit_code: int) -> None:
    """Record the end of a run stopped by an error, unless the ledger cannot take it any more
    (then `status` says it ended abruptly, which is still true enough)."""
    try:
        ledger.end_run(run_id, exit_code)
    except (CrawlprocError, sqlite3.Error, OSError) as exc:
        logger.debug("the end of run {} is not recorded: {!r}", run_id, exc)


def _note_closed(path: Path) -> None:
    """Stamp the closed ledger, so the next start skips the thorough check. On a full disk the
    stamp is left out (the next start checks in full): the error that ended the job is the news."""
    try:
        note_closed(path)
    except OSError as exc:
        logger.debug("{}: not stamped as closed ({})", path, exc.strerror)


def _log_verdict(verdict: Verdict, out: Path, identity: dict[str, Any]) -> None:
    processor = spec_for_people(identity["processor"])
    if verdict is Verdict.REPROCESS:
        logger.info("--reprocess: every task of {} will be processed again", out)
    elif verdict is Verdict.KEPT:
        logger.info("--keep-results: the done tasks of {} keep their records from the previous code of {}; "
                    "the new code processes the rest (listed in summary.json)", out, processor)
    elif verdict is Verdict.ADOPTED:
        logger.info("{} was made by a crawlproc that fingerprinted processor code less fully (not at all, or "
                    "without module or class constants): its done tasks are taken as made by this code of {}",
                    out, processor)
    elif verdict is Verdict.REPLACED:
        logger.info("the code of processor {} changed since {} was made, and no task is done yet: "
                    "the new code is used", processor, out)
    elif verdict is Verdict.RECOMPILED:
        logger.debug("{}: processor {} compiles to the same bytecode under {}", out, processor,
                     identity[PYTHON_KEY])


@contextmanager
def _serving(options: RunOptions, command: str) -> Iterator[Any]:
    """--serve: the status page, bound before anything else and served until the job ends."""
    if options.serve is None:
        yield None
        return
    from crawlproc.serve import serving_run

    refuse_if_held(options.out)  # the OUT lock comes later: the page must not be announced, then refused
    with serving_run(options.serve, options.out, command) as board:
        yield board


def _sigterm_interrupts() -> Any:
    """A SIGTERM outside the coordinator's loop (while the job starts: a lost ledger rebuilt, a
    Dask cluster started or its first worker awaited; while it merges) ends the job as Ctrl-C
    does, one line and exit 130 with the run's end recorded, instead of a silent death that
    `status` calls abrupt. The coordinator's own handlers take over while it runs; a SIGTERM
    handler of the caller's (from Python) is left alone."""
    return stop_handler(_raise_interrupt, (signal.SIGTERM,), over_default_only=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_job(options: RunOptions, *, on_progress: Callable[[dict], None] | None = None) -> RunOutcome:
    with (_sigterm_interrupts(), _serving(options, "run") as board,
          _open_job(options, "run", early_forkserver=True) as job):
        job.board = board
        source = Scan(job.ledger, os.fsencode(options.data_dir), scan_options(options), log_skip,
                      claim_new=True, list_helpers=list_helpers(job), on_problem=problem_logger(options.out))
        pool = make_pool(job, on_progress, forkserver=job.forkserver)
        if options.executor != "local":
            pool.prepare_executor()  # connect, and check every worker sees our paths, before any claim
        if job.ledger.created:  # a new OUT: there will be work (unless DATA_DIR is empty)
            pool.prepare_executor()
        else:  # maybe nothing to do: the summary's counts are then ready when the scan ends
            job.ledger.count_ahead()
        try:
            pool_result = pool.run(source)
        finally:
            source.close()
        if source.finished:
            for line in source.outcome_lines():
                logger.info(line)
            if warning := source.emptied_warning():
                logger.warning(warning)
        merged = None
        if options.merge:
            merged, pool_result = _merge_until_clean(job, pool_result, on_progress)
        return _finish(job, pool_result, merged,
                       lambda counts: _exit_code(pool_result, counts, len(job.ledger.scan_problems())))


def watch_job(
    options: RunOptions, *, settle: float, rescan_interval: float, merge_interval: float,
    poll: float | None = None, on_progress: Callable[[dict], None] | None = None,
) -> RunOutcome:
    """Catch up like `run`, then follow file events (or poll) until SIGINT/SIGTERM; merge; exit 0."""
    from crawlproc.notify import ServiceNotifier
    from crawlproc.watch import Watcher

    with _sigterm_interrupts(), _serving(options, "watch") as board, _open_job(options, "watch") as job:
        job.board = board
        watcher = Watcher(
            job.ledger, os.fsencode(options.data_dir), scan_options(options), settle=settle,
            rescan_interval=rescan_interval, out_relpath=_relpath_inside(options.out, options.data_dir),
            on_skip=log_skip, on_problem=problem_logger(options.out), poll=poll,
        )
        merger = _PeriodicMerge(job, merge_interval, watcher)
        service = ServiceNotifier()

        def on_turn() -> None:
            merger.maybe_merge()
            service.tick(merger.caught_up, lambda: _service_status(pool, watcher))

        try:
            pool = make_pool(job, on_progress, on_turn=on_turn, run_info=watcher.info)
            merger.pool = pool
            if options.executor != "local":
                pool.prepare_executor()
        except BaseException:  # e.g. no cluster: the watcher's observer threads must not outlive the job
            watcher.stop()
            raise
        on_main_thread = threading.current_thread() is threading.main_thread()  # else stop= ends it
        logger.info("watching {}{}", options.data_dir, " (Ctrl-C to stop)" if on_main_thread else "")
        try:
            pool_result = pool.run(watcher)
        finally:
            watcher.stop()
            service.stopping(f"stopping: {_service_status(pool, watcher)}")
        merged = merger.merge() if options.merge else None
        service.close()
        exit_code = 0 if pool_result.stop_reason in (None, "interrupted") else 1
        return _finish(job, pool_result, merged, lambda counts: exit_code)


class _PeriodicMerge:
    """--merge-interval: refresh merged output and summary while watching, when something changed.

    The first merge comes as soon as the catch-up is over, then one every interval.
    """

    def __init__(self, job: _Job, interval: float, watcher: Watcher) -> None:
        self.job, self.interval, self.watcher = job, interval, watcher
        self.pool: Coordinator | None = None
        self._next: float | None = None  # None until the catch-up is merged

    def maybe_merge(self) -> None:
        """Merge when the interval is up; an unchanged ledger keeps the published output as is."""
        if not self.job.options.merge:
            return
        if not (self._caught_up() if self._next is None else time.monotonic() >= self._next):
            return
        self._next = time.monotonic() + self.interval
        self.merge()

    def caught_up(self) -> bool:
        """The catch-up is processed, and merged if merging (systemd's READY=1 then)."""
        if self.job.options.merge:
            return self._next is not None
        return self._caught_up()

    def _caught_up(self) -> bool:
        """The catch-up scan is over and none of the tasks it recorded is left to process now
        (a retry that is not due yet does not hold the first merge back)."""
        ledger = self.job.ledger
        return (self.watcher.caught_up and self.pool is not None and not self.pool.stats()["running"]
                and not ledger.has_claimable(ledger.conn, time.time()))

    def merge(self) -> MergeOutcome:
        """Publish what is done now; damaged results go back to pending for the pool."""
        merged = _merge(self.job)
        if merged.damaged and self.pool is not None:
            self.pool.poke()
        if not merged.unchanged:  # superseded results of files processed again
            in_flight, next_batch = self.pool.batches_in_flight() if self.pool else (set(), None)
            remove_unreferenced(self.job.options.out, set(merged.batches) | in_flight, keep_from=next_batch)
        write_summary(self.job.options.out, self.job.ledger, self.job.processor, self.job.identity, merged,
                      _timings(self.job, self.pool.result if self.pool else Tally()))
        return merged


def _service_status(pool: Coordinator, watcher: Watcher) -> str:
    """systemd's STATUS= line: this run's counts and what waits."""
    stats, info = pool.stats(), watcher.info()
    how = f"polling every {info['poll_seconds']:g}s" if info["poll_seconds"] else "watching"
    return (f"{how}: {stats['done']} done, {stats['failed']} failed, {stats['running']} running, "
            f"{info['queue_depth']} waiting to settle{', scanning' if info['scanning'] else ''}")


def _finish(job: _Job, pool_result: Tally, merged: MergeOutcome | None,
            exit_code_for: Callable[[dict[str, int]], int]) -> RunOutcome:
    """summary.json, the run's row, and the exit code (from the same final counts)."""
    summary = write_summary(job.options.out, job.ledger, job.processor, job.identity, merged,
                            _timings(job, pool_result))
    exit_code = exit_code_for(summary["counts"])
    job.ledger.finish_run(job.run_id, exit_code, pool_result.done, pool_result.failed)
    logger.debug("finished with exit code {}: {} done, {} failed this run; counts {}", exit_code,
                 pool_result.done, pool_result.failed, summary["counts"])
    return RunOutcome(exit_code, summary, pool_result, pool_result.message)


def _timings(job: _Job, pool_result: Tally) -> dict[str, Any]:
    elapsed = time.monotonic() - job.started
    return {
        "started": job.wall_started, "elapsed_s": round(elapsed, 3),
        "tasks_done_this_run": pool_result.done,
        "files_per_s": round(pool_result.done / elapsed, 1) if elapsed > 0 else None,
        "coordinator_peak_rss_bytes": peak_rss_bytes(),
        "coordinator_cpu_s": round(_own_cpu_seconds(), 3),
    }


def _own_cpu_seconds() -> float:
    """CPU time (user + system) this process used: how much of a core the coordinator took."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """This process's own peak RSS. (ru_maxrss can carry the peak of the process that started us.)"""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _recover(out: Path, ledger: Ledger) -> None:
    stale = ledger.requeue_stale()
    if stale:
        logger.warning("{} left running by a stopped run went back to pending", plural(stale, "task"))
    remove_temp_files(out)


def list_helpers(job: _Job) -> int:
    """Folder-listing helpers for a full scan: one per worker, up to the cores (and 4).

    None for a new OUT: every file is work there, the workers keep the cores busy
    and listing in helpers would only add the cost of sending the listings over.
    """
    if job.ledger.created or not forking_is_safe():
        return 0  # a fork copies only this thread: a lock another thread held would stay held
    return max(1, min(job.options.workers, os.cpu_count() or 1, 4))


def scan_settings(options: RunOptions) -> dict[str, Any]:
    """What decides which files of DATA_DIR become tasks, kept in the ledger for `explain`."""
    return {"include": list(options.include), "exclude": list(options.exclude),
            "follow_symlinks": options.follow_symlinks}


def scan_options(options: RunOptions) -> ScanOptions:
    out_id = dir_id(options.out)
    return ScanOptions(
        include=options.include, exclude=options.exclude, follow_symlinks=options.follow_symlinks,
        skip_dirs=frozenset({out_id} if out_id else ()), chunk_size=options.chunk_size,
    )


def worker_config(options: RunOptions, identity: dict[str, Any]) -> WorkerConfig:
    columns = added_columns(options) or {}
    return WorkerConfig(
        data_dir=os.fsencode(os.path.abspath(options.data_dir)),
        out=str(options.out),
        processor=normalise_spec(options.processor),
        params=dict(options.params),
        durable=options.durable,
        max_memory=options.max_memory,
        source_column=columns.get("source"),
        offset_column=columns.get("offset"),
        identity=identity_text(identity),
        shipped=options.shipped,
        import_paths=options.import_paths,
    )


def make_pool(job: _Job, on_progress: Callable[[dict], None] | None, *,
              forkserver: ForkServer | None = None, **hooks: Any) -> Coordinator:
    """The coordinator of this job, with the executor the options name."""
    options = job.options
    limits = WorkerLimits(workers=options.workers, max_tasks_per_child=options.max_tasks_per_child,
                          timeout=options.timeout, max_memory_per_task=options.max_memory_per_task)
    stopping: list[Coordinator] = []  # the executor asks whether its coordinator is stopping
    extra: dict[str, Any] = {"cancelled": lambda: bool(stopping) and stopping[0].tally.stop_reason is not None}
    if options.executor == "local":
        extra["forkserver"] = forkserver
    else:
        extra["scheduler"] = options.scheduler
        extra["data_dir"] = options.data_dir
    executor = make_executor(options.executor, worker_config(options, job.identity), limits, **extra)
    coordinator_options = CoordinatorOptions(
        policy=RetryPolicy(options.retries, options.retry_delay, options.max_failures),
        batch_size=options.batch_size,
    )
    if options.executor != "local":  # status and the page show the cluster
        hooks["run_info"] = _with_executor(hooks.get("run_info"), executor)
    if options.stop is not None:
        on_progress = _stopped_by(options.stop, lambda: coordinator, on_progress)
    if job.board is not None:
        on_progress = job.board.progress_hook(on_progress)
    coordinator = Coordinator(job.ledger, executor, coordinator_options, run_id=job.run_id,
                              on_progress=on_progress, out_hint=out_hint(options.out), **hooks)
    stopping.append(coordinator)
    if job.board is not None:
        job.board.follow(coordinator)
    return coordinator


def _with_executor(run_info: Callable[[], dict] | None, executor: Any) -> Callable[[], dict]:
    """The run's info for its `runs` row, with the executor's description added."""
    return lambda: {**(run_info() if run_info else {}), "executor": executor.describe()}


def _stopped_by(stop: Any, coordinator: Callable[[], Coordinator],
                on_progress: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """Progress that also asks the coordinator to stop once `stop` is set (it reports progress
    after every loop turn, at least every TICK_SECONDS): a run in a thread has no Ctrl-C."""
    def report(stats: dict) -> None:
        if stop.is_set():
            coordinator().request_stop("stop requested")
        if on_progress is not None:
            on_progress(stats)
    return report


def _merge(job: _Job, *, publish_if_damaged: bool = True) -> MergeOutcome:
    options = job.options
    return merge_results(
        job.ledger, options.out, options.output or default_output(options.out, options.output_format),
        fmt=options.output_format, reducer=job.processor.reduce, publish_if_damaged=publish_if_damaged,
        reuse_unchanged=True,
    )


def _relpath_inside(path: Path, root: Path) -> bytes | None:
    """`path` relative to `root` as bytes, when it lies inside it (OUT inside DATA_DIR)."""
    path_abs, root_abs = os.path.abspath(path), os.path.abspath(root)
    if os.path.commonpath([path_abs, root_abs]) != root_abs or path_abs == root_abs:
        return None
    return os.fsencode(os.path.relpath(path_abs, root_abs))


def _merge_until_clean(job: _Job, pool_result: Tally, on_progress) -> tuple[MergeOutcome, Tally]:
    """Merge; while results turn out missing or damaged, process those tasks again first."""
    options = job.options
    merged: MergeOutcome | None = None
    for _ in range(MAX_MERGE_ROUNDS):
        if pool_result.stop_reason is not None:
            break  # interrupted or over budget: publish what is done, redo nothing now
        merged = _merge(job, publish_if_damaged=False)
        if merged.published:
            break
        logger.warning("{} had a missing or damaged result; processing them again", plural(merged.damaged, "done task"))
        again = make_pool(job, on_progress).run(None)
        pool_result.done += again.done
        pool_result.failed += again.failed
        pool_result.stop_reason, pool_result.message = again.stop_reason, again.message
    if merged is None or not merged.published:
        merged = _merge(job)
    remove_unreferenced(options.out, set(merged.batches))
    return merged, pool_result


def _exit_code(pool_result: Tally, counts: dict[str, int], scan_problems: int = 0) -> int:
    if pool_result.stop_reason == "interrupted":
        return 130
    if pool_result.stop_reason is not None or counts["failed"] or counts["pending"] or counts["running"]:
        return 1
    return 1 if scan_problems else 0  # files under a path it could not read are missing from the output


def log_skip(relpath: bytes, reason: str) -> None:
    logger.info("skipped {}: {}", relpath.decode("utf-8", "backslashreplace"), reason)


def problem_logger(out: Path) -> Callable[[ScanProblem], None]:
    """One WARNING per path a scan cannot read, saying where the user will find it again."""
    def log_problem(problem: ScanProblem) -> None:
        logger.warning("{}: {}; what it holds is missing from the output until a scan can read it "
                       "(listed by: crawlproc failures -o {})", problem.shown, problem.error,
                       shlex.quote(str(out)))
    return log_problem
