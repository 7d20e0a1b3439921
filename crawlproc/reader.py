"""Reading an OUT from Python, finished or running: what `crawlproc.open(out)` returns.

    crawlproc.open(out) ─> OutReader
        .status() / .failures()      what `crawlproc status --json` / `failures --json` print
        .tasks(state=None)           the ledger's tasks in merge order, one dict each, streamed
        .records()                   every done task's records in merge order, read from the
                                     result files (CRC-checked) and streamed: up to date while a
                                     run goes, and with --no-merge or any --format
        .summary                     summary.json (None until a run has written one)
        .to_arrow() / .to_pandas()   the records as one table (pyarrow; pandas too)

Read-only: each call opens the ledger read-only (WAL: a running coordinator is never blocked)
and closes it when done; nothing here takes OUT's lock or writes in OUT.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crawlproc.errors import CrawlprocError, UsageError
from crawlproc.finalize import SUMMARY_NAME
from crawlproc.ledger import Ledger, State
from crawlproc.report import failures_data, read_ledger, status_data
from crawlproc.results import ResultReader, checksum


class ResultDamaged(CrawlprocError):
    """A done task's records are missing from its result file or fail their checksum."""


class OutReader:
    """A finished or running OUT, read from Python (see the module docstring)."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        read_ledger(self.out).close()  # a missing OUT or ledger is one clear error, now

    def __repr__(self) -> str:
        return f"crawlproc.open({str(self.out)!r})"

    def status(self) -> dict[str, Any]:
        """Counts by state, the last run, throughput: what `crawlproc status --json` prints."""
        return status_data(self.out)

    def failures(self) -> list[dict[str, Any]]:
        """Failed tasks and paths no scan could read: what `crawlproc failures --json` prints."""
        return failures_data(self.out)

    def tasks(self, state: str | None = None) -> Iterator[dict[str, Any]]:
        """Every task (or those in `state`: pending, running, done, failed or gone), in merge order."""
        states = [s.value for s in State]
        if state is not None and state not in states:
            raise UsageError(f"state {state!r} is not one of {', '.join(states)}")
        return self._with_ledger(lambda ledger: ledger.iter_tasks(state))

    def records(self) -> Iterator[dict[str, Any]]:
        """The records of every done task, in (relpath, offset, record) order, as the merge
        writes them; ResultDamaged if a done task's records are missing or damaged."""
        return self._with_ledger(self._records_of)

    @property
    def summary(self) -> dict[str, Any] | None:
        """summary.json of the last run or merge; None before there is one."""
        try:
            with open(self.out / SUMMARY_NAME, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def to_arrow(self) -> Any:
        """The records as a pyarrow Table (every field of every record; all records in memory)."""
        try:
            from crawlproc.parquet import records_table
        except ImportError as exc:
            if getattr(exc, "name", None) != "pyarrow":
                raise
            raise UsageError("to_arrow() needs pyarrow, a dependency of crawlproc: pip install pyarrow") from None
        return records_table(self.records(), describe_record=self._describe_record)

    def to_pandas(self) -> Any:
        """The records as a pandas DataFrame (through pyarrow)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise UsageError("to_pandas() needs pandas and pyarrow: pip install 'crawlproc[pandas]'") from None
        return self.to_arrow().to_pandas()

    # -- internals --------------------------------------------------------------------
    def _describe_record(self, index: int) -> str:
        """Which task wrote the `index`-th record (from 0), for an error message."""
        from crawlproc.finalize import describe_record

        ledger = read_ledger(self.out)
        try:
            return describe_record(ledger, self.out, index)
        finally:
            ledger.close()

    def _with_ledger(self, read: Any) -> Iterator[Any]:
        """Stream what `read(ledger)` yields; the ledger is open until the stream ends or is closed."""
        ledger = read_ledger(self.out)
        try:
            yield from read(ledger)
        finally:
            ledger.close()

    def _records_of(self, ledger: Ledger) -> Iterator[dict[str, Any]]:
        results = ResultReader(self.out)
        try:
            for task_id, batch_id, offset, length, crc in ledger.done_in_merge_order():
                if not length:
                    continue  # a done task with no record
                data = results.read(batch_id, offset, length)
                if data is None or checksum(data) != crc:
                    raise ResultDamaged(
                        f"the records of done task {task_id} in {self.out} are missing or damaged; "
                        f"`crawlproc merge -o {shlex.quote(str(self.out))}` puts such tasks back to pending for the next run")
                for line in data.splitlines():
                    yield json.loads(line)
        finally:
            results.close()
