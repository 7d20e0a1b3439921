"""A processor's hooks where it runs: preload before the workers fork, setup and teardown in each.

    forkserver: load the processor ── preload(params) ── gc.freeze() ──fork──┐   (once per machine:
                                                                              │    here, or per Dask worker)
    worker process: setup(params, preloaded) ── tasks see task.preloaded ─────┘
                    and task.context ── retiring or told to stop: teardown (setup's code after `yield`)

Preloaded data lives in the server's memory before the fork, so every worker reads the same
pages (copy-on-write; the server freezes its heap so no collection writes to them). A preload
or setup that raises is kept as one line; the worker reports it with its first batch
(BatchReport.setup_error) and the run stops at its start with exit 2, instead of failing
every task. A worker that is killed (timeout, memory limit, a second Ctrl-C) runs no teardown.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any

from crawlproc.processors.base import Processor, import_failure

# id(processor) -> (True, value) or (False, error line): filled in the forkserver, read after the fork
_PRELOADED: dict[int, tuple[bool, Any]] = {}


def preload(processor: Processor, params: Mapping[str, str]) -> None:
    """Run the processor's preload hook once in this process (the forkserver), keeping its result."""
    if processor.preload_hook is None or id(processor) in _PRELOADED:
        return
    try:
        _PRELOADED[id(processor)] = (True, processor.preload_hook(params))
    except Exception as exc:
        _PRELOADED[id(processor)] = (False, _failure_line(processor, "preload", processor.preload_hook, exc,
                                                          where="before the workers started"))


class WorkerHooks:
    """Setup and teardown of one worker process; `start()` returns an error line or None."""

    def __init__(self, processor: Processor, params: Mapping[str, str]) -> None:
        self.processor = processor
        self.params = params
        self.preloaded: Any = None
        self.context: Any = None
        self._teardown: Any = None  # the setup generator, suspended at its `yield`

    def start(self) -> str | None:
        if self.processor.preload_hook is not None:
            preload(self.processor, self.params)  # a no-op after the fork: the server did it
            ok, value = _PRELOADED[id(self.processor)]
            if not ok:
                return value
            self.preloaded = value
        setup = self.processor.setup_hook
        if setup is None:
            return None
        try:
            if inspect.isgeneratorfunction(setup):
                generator = setup(self.params, self.preloaded)
                self.context = next(generator)
                self._teardown = generator
            else:
                self.context = setup(self.params, self.preloaded)
        except Exception as exc:
            return _failure_line(self.processor, "setup", setup, exc)
        return None

    def close(self) -> None:
        """The teardown: run setup's generator to its end. A failure is one line on stderr."""
        generator, self._teardown = self._teardown, None
        if generator is None:
            return
        try:
            next(generator)
        except StopIteration:
            return
        except Exception as exc:
            sys.stderr.write(f"crawlproc: {_failure_line(self.processor, 'teardown of', self.processor.setup_hook, exc)}\n")
            return
        generator.close()
        sys.stderr.write(f"crawlproc: processor {self.processor.__name__}: setup {_name(self.processor.setup_hook)} "
                         "yields more than once; its code after the second yield was not run\n")


def _failure_line(processor: Processor, what: str, hook: Any, exc: BaseException, where: str = "") -> str:
    where = where or f"in worker process {os.getpid()}"
    return f"processor {processor.__name__}: {what} {_name(hook)} failed {where}: {import_failure(exc)}"


def _name(hook: Any) -> str:
    return getattr(hook, "__name__", "hook")
