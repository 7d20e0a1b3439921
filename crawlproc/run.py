"""One `crawlproc run`: from a DATA_DIR and an OUT to a merged output and an exit code.

    check DATA_DIR, OUT ─> lock OUT ─> open ledger ─> check identity ─> recover
      ─> scan ∥ pool ─> merge (done results crc-checked; damaged ones redone first)
      ─> summary.json ─> exit code (0 all done, 1 some failed, 130 interrupted)

Everything here is sequencing; each step is owned by its module.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from loguru import logger

from crawlproc import logs
from crawlproc.errors import UsageError
from crawlproc.finalize import MERGED_NAME, MergeOutcome, merge_results, write_summary
from crawlproc.ledger import Ledger
from crawlproc.lock import OutLock
from crawlproc.pool import PoolOptions, PoolResult, WorkerPool
from crawlproc.processors.base import Processor, load, normalise_spec
from crawlproc.results import remove_temp_files, remove_unreferenced
from crawlproc.scanner import Scan, ScanOptions, dir_id
from crawlproc.worker import WorkerConfig

LEDGER_NAME = "ledger.db"
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
    timeout: float | None = None
    retries: int = 2
    retry_delay: float = 0.5
    max_failures: tuple[float, bool] | None = None
    durable: bool = False
    retry_failed: bool = False
    reprocess: bool = False
    batch_size: int | None = None
    follow_symlinks: bool = False
    output: Path | None = None
    merge: bool = True


@dataclass
class RunOutcome:
    exit_code: int
    summary: dict[str, Any] | None
    pool: PoolResult
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


def check_data_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise UsageError(f"DATA_DIR {data_dir} does not exist")
    if not data_dir.is_dir():
        raise UsageError(f"DATA_DIR {data_dir} is not a folder")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise UsageError(f"DATA_DIR {data_dir} is not readable")


def run_identity(options: RunOptions, processor: Processor) -> dict[str, Any]:
    """What makes results comparable: a different identity means different output."""
    return {
        "data_dir": os.path.realpath(options.data_dir),
        "processor": normalise_spec(options.processor),
        "processor_version": processor.version,
        "params": dict(sorted(options.params.items())),
    }


def run_job(options: RunOptions, *, on_progress: Callable[[dict], None] | None = None) -> RunOutcome:
    check_data_dir(options.data_dir)
    prepare_out(options.out)
    processor = load(options.processor)
    with OutLock(options.out):
        logs.add_file_sink(options.out)
        ledger = Ledger(options.out / LEDGER_NAME, durable=options.durable)
        try:
            return _run_locked(options, ledger, processor, on_progress)
        finally:
            ledger.close()


def _run_locked(options: RunOptions, ledger: Ledger, processor: Processor, on_progress) -> RunOutcome:
    started, wall_started = time.monotonic(), time.time()
    identity = run_identity(options, processor)
    if ledger.check_identity(identity, reprocess=options.reprocess):
        logger.info("--reprocess: every task of {} will be processed again", options.out)
    _recover(options.out, ledger)
    if options.retry_failed:
        logger.info("--retry-failed: {} failed tasks back to pending", ledger.retry(include_done=False))
    run_id = ledger.start_run("run", os.getpid())
    pool_result = _process(options, ledger, run_id, on_progress, scan=True)
    merged = None
    if options.merge:
        merged, pool_result = _merge_until_clean(options, ledger, run_id, pool_result, on_progress)
    elapsed = time.monotonic() - started
    timings = {
        "started": wall_started, "elapsed_s": round(elapsed, 3),
        "tasks_done_this_run": pool_result.done,
        "files_per_s": round(pool_result.done / elapsed, 1) if elapsed > 0 else None,
        "coordinator_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    summary = write_summary(options.out, ledger, processor, identity, merged, timings)
    exit_code = _exit_code(pool_result, summary["counts"])
    ledger.finish_run(run_id, exit_code, pool_result.done, pool_result.failed)
    return RunOutcome(exit_code, summary, pool_result, pool_result.message)


def _recover(out: Path, ledger: Ledger) -> None:
    stale = ledger.requeue_stale()
    if stale:
        logger.warning("{} tasks left running by a stopped run went back to pending", stale)
    remove_temp_files(out)


def _process(options: RunOptions, ledger: Ledger, run_id: int, on_progress, *, scan: bool) -> PoolResult:
    config = WorkerConfig(
        data_dir=os.fsencode(os.path.abspath(options.data_dir)),
        out=str(options.out),
        processor=normalise_spec(options.processor),
        params=dict(options.params),
        durable=options.durable,
        max_memory=options.max_memory,
    )
    pool_options = PoolOptions(
        workers=options.workers, max_tasks_per_child=options.max_tasks_per_child,
        batch_size=options.batch_size, timeout=options.timeout, retries=options.retries,
        retry_delay=options.retry_delay, max_failures=options.max_failures,
    )
    walk = None
    if scan:
        out_id = dir_id(options.out)
        scan_options = ScanOptions(
            include=options.include, exclude=options.exclude, follow_symlinks=options.follow_symlinks,
            skip_dirs=frozenset({out_id} if out_id else ()),
        )
        walk = Scan(ledger, os.fsencode(options.data_dir), scan_options, _log_skip)
    pool = WorkerPool(ledger, config, pool_options, run_id=run_id, on_progress=on_progress)
    result = pool.run(walk)
    if walk is not None and walk.finished and walk.gone:
        logger.info("{} files disappeared since the last scan; their records leave the output", walk.gone)
    return result


def _merge_until_clean(options, ledger, run_id, pool_result, on_progress) -> tuple[MergeOutcome, PoolResult]:
    """Merge; while results turn out missing or damaged, process those tasks again first."""
    output = options.output or options.out / MERGED_NAME
    merged: MergeOutcome | None = None
    for _ in range(MAX_MERGE_ROUNDS):
        if pool_result.stop_reason is not None:
            break  # interrupted or over budget: publish what is done, redo nothing now
        merged = merge_results(ledger, options.out, output, publish_if_damaged=False)
        if merged.published:
            break
        logger.warning("{} done tasks had a missing or damaged result; processing them again", merged.damaged)
        again = _process(options, ledger, run_id, on_progress, scan=False)
        pool_result.done += again.done
        pool_result.failed += again.failed
        pool_result.stop_reason, pool_result.message = again.stop_reason, again.message
    if merged is None or not merged.published:
        merged = merge_results(ledger, options.out, output)
    remove_unreferenced(options.out, ledger.live_batch_ids())
    return merged, pool_result


def _exit_code(pool_result: PoolResult, counts: dict[str, int]) -> int:
    if pool_result.stop_reason == "interrupted":
        return 130
    if pool_result.stop_reason is not None or counts["failed"] or counts["pending"] or counts["running"]:
        return 1
    return 0


def _log_skip(relpath: bytes, reason: str) -> None:
    logger.info("skipped {}: {}", relpath.decode("utf-8", "backslashreplace"), reason)
