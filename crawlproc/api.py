"""The Python API behind `crawlproc.run` and `crawlproc.watch`, and the one path the CLI takes too.

    crawlproc.run(data_dir, out=..., processor=..., **options)      the `crawlproc run` command
                    │  options.checked: every keyword judged as the command line's option is
                    │  a processor object: shipping.processor_ref (by reference, or by value)
                    v
    RunOptions ──> logs.job_stderr (unless the caller set logging up) + ProgressReporter
               ──> run.run_job / run.watch_job ──> Outcome (counts, elapsed, output paths, exit code)

A user error raises a crawlproc exception (crawlproc.errors; `exit_code` is the command's), never
SystemExit. It works from any thread: signal handlers are installed only on the main thread
(elsewhere pass `stop=threading.Event()`), and nothing here exits the process. One job at a time
per process: logging and the worker forkserver's set-up are process-wide.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crawlproc.errors import IdentityMismatch, UsageError
from crawlproc.finalize import SUMMARY_NAME
from crawlproc.options import checked, job_options

_ONE_JOB = threading.Lock()


@dataclass(frozen=True)
class Outcome:
    """How a job ended: what `crawlproc run` prints at its end, as values."""

    exit_code: int  # 0 all done, 1 some failed (or a path not scanned), 130 interrupted
    counts: dict[str, int]  # tasks by state, after the job
    total: int
    processed: int  # tasks done by this job
    failed: int  # tasks that failed for good during this job
    elapsed: float  # seconds
    out: Path
    merged_output: Path | None  # None with no_merge
    summary_file: Path
    summary: dict[str, Any] = field(repr=False)  # summary.json's content
    message: str | None  # why it stopped early, if it did

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def interrupted(self) -> bool:
        return self.exit_code == 130


def run(data_dir: str | os.PathLike[str], **given: Any) -> Any:
    """See crawlproc.run: an Outcome (a DryRun with dry_run=True)."""
    return _job(data_dir, given, watching=False)


def watch(data_dir: str | os.PathLike[str], **given: Any) -> Any:
    """See crawlproc.watch."""
    return _job(data_dir, given, watching=True)


def _job(data_dir: Any, given: Mapping[str, Any], *, watching: bool) -> Any:
    values = checked(given, watching=watching)
    options = _with_processor(job_options(data_dir, values, processor_given="processor" in given), values)
    if not _ONE_JOB.acquire(blocking=False):
        raise UsageError("a crawlproc job is already running in this process; crawlproc runs one job per "
                         "process at a time: wait for it to end, or start the other in a subprocess")
    try:
        with _logging(values):
            if values["dry_run"]:
                from crawlproc.dryrun import dry_run

                return dry_run(options, watching=watching, with_paths=values["verbose"] > 0)
            return _outcome(options, _run_with_progress(options, values, watching))
    except IdentityMismatch as exc:
        exc.for_python = True  # its ways out read as keywords (the CLI prints them as commands)
        raise
    finally:
        _ONE_JOB.release()


def _with_processor(options: Any, values: Mapping[str, Any]) -> Any:
    """A processor given as a function: its spec for the identity, and how workers get it."""
    import dataclasses

    changes: dict[str, Any] = {"stop": values["stop"]}
    if not isinstance(options.processor, str):
        from crawlproc.processors.shipping import processor_ref

        ref = processor_ref(options.processor)
        changes.update(processor=ref.spec, processor_object=ref.processor, shipped=ref.shipped,
                       import_paths=ref.import_paths)
    return dataclasses.replace(options, **changes)


def _run_with_progress(options: Any, values: Mapping[str, Any], watching: bool) -> Any:
    from crawlproc.progress import ProgressReporter
    from crawlproc.run import run_job, watch_job

    from crawlproc.logs import stderr_is_a_terminal

    quiet_bar = values["no_progress"] or values["quiet"] or values["log_json"]
    reporter = ProgressReporter(bar=not quiet_bar and stderr_is_a_terminal(), watching=watching)
    try:
        if watching:
            return watch_job(options, settle=values["settle"], rescan_interval=values["rescan_interval"],
                             merge_interval=values["merge_interval"], poll=values["poll"],
                             on_progress=reporter)
        return run_job(options, on_progress=reporter)
    finally:
        reporter.close()


def _logging(values: Mapping[str, Any]) -> Any:
    from crawlproc import logs

    return logs.job_stderr(values["verbose"], values["quiet"], values["log_json"])


def _outcome(options: Any, result: Any) -> Outcome:
    summary = result.summary or {}
    timings = summary.get("timings", {})
    merged = summary.get("merged_output")
    return Outcome(
        exit_code=result.exit_code, counts=dict(summary.get("counts", {})), total=summary.get("total", 0),
        processed=result.pool.done, failed=result.pool.failed, elapsed=timings.get("elapsed_s", 0.0),
        out=options.out, merged_output=Path(merged) if merged else None,
        summary_file=options.out / SUMMARY_NAME, summary=summary, message=result.message,
    )
