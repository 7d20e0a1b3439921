"""Worker processes as the coordinator sees them: start, kill, and say how they died.

Workers fork from a forkserver that has already imported the worker and the
processor's module, so replacing one costs milliseconds. The forkserver itself
is started with SIGINT/SIGTERM ignored: it shares the coordinator's process
group, and if a Ctrl-C killed it, every worker's exit-status channel would
read as dead. Each worker leads its own process group (see worker.py), so
`kill_group` takes whatever it started along with it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.context import BaseContext
from typing import Any

from crawlproc.worker import WorkerConfig, worker_main

SLOT_FIELDS = 2  # [task id (0 = between tasks), start time in monotonic ns]


@dataclass
class WorkerHandle:
    """One worker process, its pipe, its shared slot, and what the coordinator sent it."""

    process: Any
    conn: Any
    slot: Any
    inflight: deque = field(default_factory=deque)  # WorkBatch, oldest first
    tasks_sent: int = 0
    retiring: bool = False
    kill_reason: str | None = None
    reported: bool = False
    replaced: bool = False  # a successor has been started for it

    @property
    def pid(self) -> int:
        return self.process.pid


def forkserver_context(config: WorkerConfig) -> BaseContext:
    """A forkserver that has imported, once, all a new worker needs (see forkserver_prelude)."""
    ctx = multiprocessing.get_context("forkserver")
    # psutil reads worker memory; importing it in each new worker cost ~15 ms a time.
    memory = ["psutil"] if config.max_memory else []
    ctx.set_forkserver_preload(["crawlproc.worker", *_importable_module(config.processor), *memory,
                                "crawlproc.forkserver_prelude"])
    return ctx


def start_worker(ctx: BaseContext, config: WorkerConfig) -> WorkerHandle:
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    slot = ctx.RawArray("q", SLOT_FIELDS)
    process = ctx.Process(target=worker_main, args=(config, child_conn, slot), daemon=True,
                          name="crawlproc-worker")
    process.start()
    child_conn.close()  # only the worker holds its end: its EOF means we are gone
    return WorkerHandle(process, parent_conn, slot)


def start_forkserver_shielded() -> None:
    """Start the forkserver with SIGINT/SIGTERM ignored (inherited across exec).

    It shares our process group, so a Ctrl-C or a `kill -TERM -PGID` would
    otherwise kill it, and with it every worker's exit-status channel: live
    workers would look dead. Stopping is the coordinator's job alone.
    """
    from multiprocessing import forkserver, spawn

    main_path = spawn.get_preparation_data("crawlproc").get("init_main_from_path")
    if main_path:  # read by forkserver_prelude, in the forkserver only
        os.environ["CRAWLPROC_FORKSERVER_MAIN"] = main_path
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        forkserver.ensure_running()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.environ.pop("CRAWLPROC_FORKSERVER_MAIN", None)


def _importable_module(spec: str) -> list[str]:
    """The module of a `module:function` processor spec, if it is importable by name."""
    from crawlproc.processors import BUILTINS

    target = BUILTINS.get(spec, spec).rpartition(":")[0]
    return [] if not target or target.endswith(".py") or "/" in target else [target]


def describe_death(exitcode: int | None) -> str:
    if exitcode is None:
        return "worker vanished"
    if exitcode < 0:
        try:
            return f"worker killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"worker killed by signal {-exitcode}"
    return f"worker exited with code {exitcode} during the task"


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
