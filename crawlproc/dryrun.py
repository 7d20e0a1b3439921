"""--dry-run: what `run` (or the catch-up of `watch`) would do on OUT, found without doing it.

    the checks a run makes ─> OUT's ledger, read-only (an empty one in memory when there is none)
      ─> identity: a mismatch is refused as a run would refuse it; --reprocess redoes every task
      ─> scanner.Scan with a ScanPreview: the run's walk and the reconcile's comparison
         (ledger.diff_scan), slice by slice, with no write
      ─> DryRun: files that would be new, changed, gone, no longer selected, or retried

Nothing is processed and nothing is written in OUT: a missing OUT is not
created, no lock is taken (a run holding OUT makes a dry run exit 3, as it
would a run), and the ledger is only read (SQLite may add its -wal and -shm
files beside it, which a read needs).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from crawlproc.errors import UsageError
from crawlproc.identity import Verdict
from crawlproc.ledger import LEDGER_NAME, Ledger, State
from crawlproc.processors.base import Processor
from crawlproc.lock import refuse_if_held
from crawlproc.run import (
    RunOptions,
    check_data_dir,
    check_out_entries,
    check_out_is_not_data_dir,
    check_params,
    earlier_code,
    load_processor,
    log_skip,
    problem_logger,
    run_identity,
    scan_options,
)
from crawlproc.scanner import Scan
from crawlproc.task import relpath_for_people
from crawlproc.walk import ScanOptions

# Kinds of change, in the order they are told. "retried": unchanged files a run would process
# again (see retry_states); "excluded": files --include/--exclude no longer select.
CHANGES = ("new", "changed", "retried", "gone", "excluded")


@dataclass
class ScanPreview:
    """What a scan in preview mode found would change, file by file (see Scan's `preview`)."""

    retry_states: tuple[str, ...]  # task states a run processes again though the file did not change
    keep_paths: bool = False
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHANGES, 0))
    paths: dict[str, list[bytes]] = field(default_factory=lambda: {change: [] for change in CHANGES})

    def add(self, **paths_by_change: list[bytes]) -> None:
        for change, paths in paths_by_change.items():
            self.counts[change] += len(paths)
            if self.keep_paths:
                self.paths[change].extend(paths)


@dataclass
class DryRun:
    out: Path
    counts: dict[str, int]  # files per kind of change (CHANGES)
    paths: dict[str, list[str]]  # their relpaths for people, when asked for
    skipped: dict[str, int]  # entries the walk skipped on purpose, by kind (see walk.SKIP_KINDS)
    scan_problems: list[dict[str, str]]  # {relpath, error}: paths the walk could not read


def dry_run(options: RunOptions, *, watching: bool = False, with_paths: bool = False) -> DryRun:
    """Scan DATA_DIR as `run` (or, `watching`, watch's catch-up) would, and say what would change."""
    check_data_dir(options.data_dir)
    check_out_is_not_data_dir(options.data_dir, options.out)
    processor = load_processor(options)
    check_params(processor, options.params)
    if options.out.exists():
        if not options.out.is_dir():
            raise UsageError(f"OUT {options.out} exists and is not a folder")
        check_out_entries(options.out)
        refuse_if_held(options.out, "a dry run says what the next run would do: ask again once that one has ended")
    ledger = _ledger_to_read(options.out)
    try:
        preview = ScanPreview(retry_states(ledger, options, processor), keep_paths=with_paths)
        scan = Scan(ledger, os.fsencode(options.data_dir), _scan_options(options, watching), log_skip,
                    on_problem=problem_logger(options.out), preview=preview)
        try:
            while not scan.finished:
                scan.step()
        finally:
            scan.close()
    finally:
        ledger.close()
    return DryRun(
        out=options.out, counts=preview.counts,
        paths={change: [relpath_for_people(p) for p in paths] for change, paths in preview.paths.items()},
        skipped=scan.findings.skipped_counts(),
        scan_problems=[{"relpath": p.shown, "error": p.error} for p in scan.findings.problems],
    )


def retry_states(ledger: Ledger, options: RunOptions, processor: Processor) -> tuple[str, ...]:
    """The states of tasks a run would process again though their file did not change.

    Pending ones (an interrupted run's, or waiting after failed attempts), running
    ones a stopped run left, failed ones with --retry-failed, and every one when
    --reprocess meets another identity. Without --reprocess that is refused, as
    a run refuses it.
    """
    verdict = ledger.judge_identity(run_identity(options, processor), reprocess=options.reprocess,
                                    keep_results=options.keep_results,
                                    earlier_code=earlier_code(options, processor))  # refuses as the run would
    if verdict is Verdict.REPROCESS:
        return (State.PENDING.value, State.RUNNING.value, State.FAILED.value, State.DONE.value)
    if options.retry_failed:
        return (State.PENDING.value, State.RUNNING.value, State.FAILED.value)
    return (State.PENDING.value, State.RUNNING.value)


def _ledger_to_read(out: Path) -> Ledger:
    path = out / LEDGER_NAME
    if path.exists():
        return Ledger(path, readonly=True)
    return Ledger(Path(":memory:"))  # SQLite's name for a database in memory: an empty ledger, all new


def _scan_options(options: RunOptions, watching: bool) -> ScanOptions:
    if not watching:
        return scan_options(options)
    from crawlproc.watch import TEMP_NAME_PATTERNS

    return dataclasses.replace(scan_options(options), ignore=TEMP_NAME_PATTERNS)  # as Watcher scans
