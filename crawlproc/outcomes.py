"""What happened to each task, into the ledger: done, failed (retried later or for good), handed back.

    BatchReport ──> done rows (one executemany) · failed attempt -> pending(not_before) | failed
                    changed file -> new stat + failed attempt · gone · returned -> pending
    BatchLost   ──> the blamed task: failed attempt with the reason · the rest -> pending, unpenalised

All of it inside the coordinator's turn transaction. This is also where the
run's failure budget lives: --max-failures, and without it the default rule
that stops a run whose first tasks all fail with the same error (a processor
bug would otherwise fail every file and burn every retry). Repeats of one error
are logged a few times, not once per file and attempt.
"""

from __future__ import annotations

import re
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from loguru import logger

from crawlproc.executors import BatchLost
from crawlproc.ledger import ClaimedTask, Ledger
from crawlproc.task import relpath_for_people, text_for_people
from crawlproc.worker import CHANGED, DONE, FAILED, GONE, RETURNED, BatchReport

SAME_ERROR_TASKS = 10  # the first this many failing tasks of a run, all with one error: stop
LOGGED_PER_ERROR = 3  # warnings per distinct error; later repeats go to the debug log
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2  # extra attempts after the first
    retry_delay: float = 0.5  # base of the exponential backoff, in seconds
    max_failures: tuple[float, bool] | None = None  # (limit, is_percent); None: the same-error rule


@dataclass
class Tally:
    """This run's counts, and why it stopped early (None: it did not)."""

    done: int = 0
    failed: int = 0  # tasks failed for good
    retried: int = 0  # failed attempts to be tried again (for /metrics)
    stop_reason: str | None = None  # "interrupted", "failure budget", "same error", "write error"
    message: str | None = None


class Outcomes:
    """Applies batch outcomes to the ledger and keeps the run's tally and failure budget."""

    def __init__(self, ledger: Ledger, policy: RetryPolicy, tally: Tally, *, now: Callable[[], float],
                 out_hint: str = "") -> None:
        self.ledger = ledger
        self.policy = policy
        self.tally = tally
        self.now = now
        self.out_hint = out_hint  # " -o OUT", for hints people can copy
        self.retry_due: float | None = None  # the soonest retry this run scheduled
        self.handed_back = 0  # tasks that went back to pending since the coordinator last looked
        # task id -> error signature of the run's first failing tasks; None once a task is done
        # or two errors differ (see _check_same_error)
        self._first_failures: dict[int, str] | None = {}
        self._errors_seen: Counter[str] = Counter()
        self._unlogged = 0

    # -- events ------------------------------------------------------------------------
    def apply_report(self, conn: Any, report: BatchReport, claimed: dict[int, tuple]) -> list[float]:
        """Record one batch's outcomes; returns the done tasks' times (for batch sizing)."""
        now = self.now()
        done_rows = []
        elapsed_done = []
        for task_id, kind, detail, elapsed in report.outcomes:  # once per task: keep it lean
            task = claimed.pop(task_id)
            if kind == DONE and report.write_error is None:
                done_rows.append((report.batch_id, *detail, report.pid, elapsed, now, task_id))
                elapsed_done.append(elapsed)
            elif kind == DONE or kind == RETURNED:
                self.hand_back(conn, [task_id])
            elif kind == FAILED:
                self.fail_attempt(conn, task, detail[0], detail[1], report.pid,
                                  where=f" on {report.where}" if report.where else "")
            elif kind == CHANGED:  # counts as an attempt: a file rewritten on every try ends failed
                self.ledger.record_new_stat(conn, task_id, *detail)
                self.fail_attempt(conn, task, "the file changed while it was processed "
                                  "(its size or mtime differ afterwards)", None, report.pid)
            elif kind == GONE:
                self.ledger.mark_gone(conn, task_id)
        self.ledger.mark_done(conn, done_rows)
        self.tally.done += len(done_rows)
        if done_rows:
            self._first_failures = None  # something works: failures are about their files
        if report.write_error:
            self.stop("write error", report.write_error)
        return elapsed_done

    def apply_loss(self, conn: Any, lost: BatchLost, tasks: list[tuple], claimed: dict[int, tuple]) -> None:
        """A worker died with these tasks: blame the one it was running, hand back the rest."""
        back = []
        for task in tasks:
            claimed.pop(task[0], None)
            if task[0] == lost.blamed:
                where = f" on {lost.where}" if lost.where else ""
                self.fail_attempt(conn, task, lost.reason or "worker died", None, lost.pid, where=where)
            else:
                back.append(task[0])
        self.hand_back(conn, back)

    def hand_back(self, conn: Any, task_ids: list[int]) -> None:
        if task_ids:
            self.ledger.hand_back(conn, task_ids)
            self.handed_back += len(task_ids)

    # -- failures ----------------------------------------------------------------------
    def fail_attempt(self, conn: Any, row: tuple, error: str, tb: str | None, pid: int | None,
                     where: str = "") -> None:
        task = ClaimedTask(*row)
        error = text_for_people(error)  # it may name a non-UTF-8 file, which SQLite cannot store as given
        tb = text_for_people(tb) if tb else tb
        attempt = task.attempts + 1
        final = attempt > self.policy.retries
        retry_at = None if final else self.now() + self._backoff(attempt)
        self.ledger.mark_failed_attempt(conn, task.id, error, tb, pid, retry_at)
        signature = error_signature(error, tb)
        self._log_failure(task, attempt, error, signature, final, where)
        if final:
            self.tally.failed += 1
            self._check_budget(conn)
        else:
            self.tally.retried += 1
            self.retry_due = retry_at if self.retry_due is None else min(self.retry_due, retry_at)
        self._check_same_error(task.id, signature, error, tb)

    def _log_failure(self, task: ClaimedTask, attempt: int, error: str, signature: str, final: bool,
                     where: str) -> None:
        self._errors_seen[signature] += 1
        seen = self._errors_seen[signature]
        level = "WARNING" if seen <= LOGGED_PER_ERROR else "DEBUG"
        if level == "DEBUG":
            self._unlogged += 1
        logger.bind(task=task.id).log(
            level, "task {} ({}) failed on attempt {}/{}{}: {}{}{}", task.id, relpath_for_people(task.path_bytes),
            attempt, self.policy.retries + 1, where, error, " - giving up" if final else "",
            " (later failures with this error are logged at debug level only)" if seen == LOGGED_PER_ERROR else "")

    def _backoff(self, attempt: int) -> float:
        import tenacity  # only on the failure path

        delay = self.policy.retry_delay
        wait = tenacity.wait_exponential(multiplier=delay, max=60) + tenacity.wait_random(0, delay / 2)
        return wait(SimpleNamespace(attempt_number=attempt))

    def _check_budget(self, conn: Any) -> None:
        if self.policy.max_failures is None:
            return
        limit, percent = self.policy.max_failures
        if percent:
            limit = limit * self.ledger.count_live(conn) / 100
        if self.tally.failed > limit:
            self.stop("failure budget", None)

    def _check_same_error(self, task_id: int, signature: str, error: str, tb: str | None) -> None:
        """The default failure budget: the run's first SAME_ERROR_TASKS failing tasks, with no
        task done yet, all failed with one error. That is a bug, not bad files."""
        first = self._first_failures
        if self.policy.max_failures is not None or first is None:
            return
        first[task_id] = signature
        if len(set(first.values())) > 1:
            self._first_failures = None  # mixed errors: bad files, go on
        elif len(first) >= SAME_ERROR_TASKS:
            place = frame_of(tb)
            self.stop("same error", (
                f"stopped early: the run's first {SAME_ERROR_TASKS} failing tasks all failed with the same error: "
                f"{error.splitlines()[0][:300]}{f' ({place})' if place else ''}; fix it and run the same "
                "command again, or pass --max-failures N to go on despite failures"))

    def stop(self, reason: str, message: str | None) -> None:
        if self.tally.stop_reason is None:
            self.tally.stop_reason = reason
            self.tally.message = message
            if message:
                logger.error(message)

    def closing_words(self) -> None:
        """At the end of a run: what the failure logging left out, and the budget's final count."""
        if self._unlogged:
            logger.warning("{} more failed attempts, with errors shown above, were not logged here; "
                           "see `crawlproc failures{}`", self._unlogged, self.out_hint)
        if self.tally.stop_reason == "failure budget":
            limit, percent = self.policy.max_failures
            self.tally.message = (f"stopped early: {self.tally.failed} tasks failed, more than "
                                  f"--max-failures {limit:g}{'%' if percent else ''} allows")
            logger.error(self.tally.message)


def error_signature(error: str, tb: str | None) -> str:
    """What makes two failures 'the same error': the exception type and where it was raised,
    or, without a traceback (a worker's death, a command's exit), the message with its
    numbers left out."""
    place = frame_of(tb)
    if place:
        return f"{error.split('(', 1)[0]}@{place}"
    first = error.splitlines()[0] if error else ""
    return re.sub(r"\d+", "N", first)[:200]


def frame_of(tb: str | None) -> str | None:
    """'file.py, line 12' of the innermost frame of a formatted traceback, if any."""
    if not tb:
        return None
    frames = _FRAME.findall(tb)
    if not frames:
        return None
    path, line = frames[-1]
    return f"{path}, line {line}"


def out_hint(out: Any) -> str:
    """' -o OUT' as people can paste it."""
    return f" -o {shlex.quote(str(out))}"
