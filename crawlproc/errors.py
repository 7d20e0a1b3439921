"""The exceptions crawlproc raises on purpose.

Each carries the process exit code that SPEC.md assigns to it, so the CLI can
turn any of them into one line on stderr and the right status without a table
of special cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class CrawlprocError(Exception):
    """Root of crawlproc's own errors; the message is meant for a person."""

    exit_code = 2


class UsageError(CrawlprocError):
    """A bad path, option or value given by the user."""


class ProcessorLoadError(CrawlprocError):
    """The processor named by -p could not be imported or is not callable."""


class ProcessorSetupError(CrawlprocError):
    """The processor's preload or setup hook raised in a worker process: the run stops at its start."""


class ReducerFailed(CrawlprocError):
    """The processor's reducer raised: its tasks are done, nothing was published (exit 2)."""


class WayOut(NamedTuple):
    """A way out of an error: the same command again, with `flag` added and the flags of `drop` left out."""

    purpose: str  # "to redo every task"
    flag: str  # "--reprocess"
    drop: tuple[str, ...] = ()

    @property
    def keyword(self) -> str:
        """The way out as a Python caller passes it: "reprocess=True"."""
        return self.flag.lstrip("-").replace("-", "_") + "=True"


class IdentityMismatch(CrawlprocError):
    """OUT was made by another processor, code, version, params or DATA_DIR."""

    def __init__(self, message: str, ways_out: Sequence[WayOut] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.ways_out = tuple(ways_out)  # the CLI shows each as a command to copy
        self.for_python = False  # raised to a Python caller: the ways out are keywords

    def __str__(self) -> str:
        return "; ".join([self.message, *(f"{way.purpose}, pass {way.keyword if self.for_python else way.flag}"
                                          for way in self.ways_out)])


class AddressInUse(UsageError):
    """The address given to serve the status page on is taken by another program."""

    def __init__(self, message: str, ways_out: Sequence[WayOut] = ()) -> None:
        super().__init__(message)
        self.ways_out = tuple(ways_out)  # the CLI shows each as a command to copy

    def __str__(self) -> str:
        return "; ".join([self.args[0], *(f"{way.purpose}, pass {way.flag}" for way in self.ways_out)])


class LedgerError(CrawlprocError):
    """OUT/ledger.db is damaged, foreign, or cannot be opened."""


class OutLocked(CrawlprocError):
    """Another crawlproc coordinator holds OUT."""

    exit_code = 3


class Interrupted(CrawlprocError):
    """The run was stopped by a signal; it can be resumed."""

    exit_code = 130


class TaskFailed(Exception):
    """Raised inside a worker to fail an attempt with a message and no traceback.

    `details`, when given, is kept in the ledger's traceback field instead of
    the Python traceback (e.g. a failed command's stderr and stdout).
    """

    def __init__(self, message: str, details: str | None = None) -> None:
        super().__init__(message)
        self.details = details
