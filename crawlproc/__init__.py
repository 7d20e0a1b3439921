"""crawlproc: run one function over every file of a directory tree, resumably.

The public API:

    from crawlproc import processor, Task         declare a processor; what it receives
    crawlproc.run(data_dir, out=..., **options)   `crawlproc run` from Python (api.py); an Outcome
    crawlproc.watch(data_dir, out=..., **options) `crawlproc watch` from Python
    crawlproc.open(out)                           read an OUT, finished or running (reader.OutReader)

The rest of crawlproc is imported only when one of these is called, so that
`import crawlproc` (and `crawlproc --help`) stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os as _os
import sys as _sys
import types as _types
from typing import TYPE_CHECKING, Any

from crawlproc.processors.base import Processor, processor
from crawlproc.task import Task

if TYPE_CHECKING:
    from crawlproc.api import Outcome
    from crawlproc.reader import OutReader

__all__ = ["Processor", "Task", "processor", "__version__"]  # not `open`: `import *` must not shadow the builtin


def run(data_dir: str | _os.PathLike[str], **options: Any) -> Outcome:
    """Scan DATA_DIR, process every pending file, merge: the `crawlproc run` command, from Python.

    The options are the command's, as keywords (its long name, '-' as '_'), with its defaults
    and checks: `out="crawlproc-out"`, `processor="linecount"` (a spec, or a function decorated
    with @processor: one defined in a notebook or a script's __main__ is sent to the workers by
    value), `workers=os.cpu_count()`, `param={"group_by": "x"}`, `include=["*.csv"]`,
    `max_memory_per_child="512MB"`, `timeout=30`, `retries=2`, `format="parquet"`, `no_merge=True`,
    `verbose=1`, `quiet=True`, `no_progress=True`, ... (see `crawlproc run --help`). The
    CRAWLPROC_* variables are the command line's, not read here. `stop=threading.Event()` stops
    the job when set, as Ctrl-C would (a run in a thread gets no signal).

    Returns an Outcome: `exit_code` (0, 1 when tasks failed, 130 when stopped), `counts`, `total`,
    `processed`, `failed`, `elapsed`, `out`, `merged_output`, `summary_file`, `summary`. With
    `dry_run=True`, what would change (a DryRun), processing nothing. A user error raises a
    crawlproc.errors.CrawlprocError (its `exit_code` is the command's), never SystemExit.
    """
    from crawlproc.api import run as run_job

    return run_job(data_dir, **options)


def watch(data_dir: str | _os.PathLike[str], **options: Any) -> Outcome:
    """Catch up like `run`, then process new and changed files as they arrive, until SIGINT or
    SIGTERM (on the main thread) or until `stop` (a threading.Event) is set; merge; return the
    Outcome. Takes run's keywords and `settle`, `rescan_interval`, `merge_interval`, and `poll`
    (seconds between polling scans instead of file events, for NFS, SMB, Lustre)."""
    from crawlproc.api import watch as watch_job

    return watch_job(data_dir, **options)


def open(out: str | _os.PathLike[str] = "crawlproc-out") -> OutReader:  # noqa: A001 - crawlproc.open(out)
    """Read OUT, finished or running: `.status()`, `.failures()`, `.tasks(state=None)`,
    `.records()` (merged records in order, streamed), `.summary`, `.to_arrow()`, `.to_pandas()`.

    Read-only; a missing OUT or ledger raises crawlproc.errors.UsageError or LedgerError.
    """
    from crawlproc.reader import OutReader

    return OutReader(out)


class _Package(_types.ModuleType):
    """This package, whose API functions keep their names when a module of the same name is
    imported: importing the module crawlproc/run.py would otherwise rebind `crawlproc.run` to
    it. The modules stay reachable in sys.modules and by `from crawlproc.run import ...`."""

    _API_FUNCTIONS = frozenset({"run", "watch", "open"})

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._API_FUNCTIONS and isinstance(value, _types.ModuleType) and name in self.__dict__:
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
