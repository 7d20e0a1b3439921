"""The worker: take a batch, run the processor on each task, write one result file, report.

    coordinator ──WorkBatch──> inbox thread ──> Worker.run_batch() ──> results/<shard>/<batch>.jsonl
         ^                                              │
         └──────────────── BatchReport (one per batch) ─┘

The result file ends with a trailer that lists the batch's done tasks (see
results.py), so it is written whenever a task is done, even with no records.

Before each task the worker writes the task id and start time into its shared
slot, so the coordinator can blame exactly that task if the worker dies or runs
past --timeout, without any message. A processor exception fails only its own
task. The worker leads its own process group (a timeout kills whatever it
started too) and exits by itself once the coordinator's pipe closes.

A worker runs its processor's setup hook once when it starts, hands what it
gave to each task (`task.context`, with `task.preloaded` from the forkserver),
and its teardown when it retires or is told to stop (processors/hooks.py).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawlproc.errors import TaskFailed
from crawlproc.results import TrailerWriter, checksum, result_path, write_atomic
from crawlproc.task import Task, relpath_for_processors

# Outcome kinds, first item after the task id in an outcome tuple.
DONE, FAILED, CHANGED, GONE, RETURNED = "done", "failed", "changed", "gone", "returned"

_ENCODER = json.JSONEncoder(allow_nan=False)


def _line_encoder() -> Any:
    """`_ENCODER.encode`, minus the C encoder it builds anew on every call (half its cost
    on a tiny record). No cycle check: a record that contains itself raises RecursionError."""
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        encode = make(None, _ENCODER.default, json.encoder.encode_basestring_ascii, None,
                      _ENCODER.key_separator, _ENCODER.item_separator, False, False, False)
    except TypeError:  # no C accelerator, or another signature: the plain path
        return _ENCODER.encode
    return lambda record: "".join(encode(record, 0))


_encode_json = _line_encoder()
MEMORY_CHECK_SECONDS = 0.01


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, picklable: paths, the processor spec, limits."""

    data_dir: bytes
    out: str
    processor: str
    params: Mapping[str, str]
    durable: bool = False
    max_memory: int | None = None  # bytes of RSS after which the worker retires
    source_column: str | None = None  # --source-column: each record gets its task's relpath under it
    offset_column: str | None = None  # and (with --chunk-size) its byte offset under this one
    identity: str = ""  # the run's identity (results.identity_text), written into each trailer
    shipped: bytes | None = None  # the processor by value (processors/shipping.py), when not importable
    import_paths: tuple[str, ...] = ()  # the coordinator's sys.path, for a processor given as an object


@dataclass(frozen=True)
class WorkBatch:
    batch_id: int
    tasks: tuple[tuple, ...]  # ledger.ClaimedTask-shaped: (id, path_bytes, offset, length, size, mtime_ns, attempts)


@dataclass(frozen=True)
class BatchReport:
    """Outcomes: (task_id, kind, detail, elapsed_s); detail by kind:
    done (result_offset, length, crc32) | failed (error, traceback) |
    changed (size, mtime_ns) | gone None | returned None."""

    batch_id: int
    pid: int
    outcomes: list[tuple]
    retiring: bool = False
    write_error: str | None = None
    where: str | None = None  # the Dask worker that ran it (None: this machine)
    setup_error: str | None = None  # the processor's preload or setup failed here: nothing ran


class Worker:
    """Runs batches in the current process; `run_batch` is one unit of work."""

    def __init__(self, config: WorkerConfig, slot: Any = None) -> None:
        from crawlproc.processors.hooks import WorkerHooks
        from crawlproc.processors.shipping import load_for_worker

        self.config = config
        self.hooks: WorkerHooks | None = None
        try:
            self.processor = load_for_worker(config.processor, config.shipped, config.import_paths)
        except Exception as exc:  # e.g. a processor file this Dask worker does not see: the run stops
            self.setup_error: str | None = _load_failure(config.processor, exc)
        else:
            self.hooks = WorkerHooks(self.processor, config.params)
            self.setup_error = self.hooks.start()  # once per worker process, before any task
        self.slot = slot if slot is not None else [0, 0]
        self.out = Path(config.out)
        self.pid = os.getpid()
        self._process: Any = None  # psutil.Process, made on first use
        self._memory_checked = float("-inf")
        self._trailer = TrailerWriter(config.identity, self.pid)

    def run_batch(self, batch: WorkBatch) -> BatchReport:
        if self.setup_error is not None:  # every task back, unpenalised; the run stops (exit 2)
            outcomes = [(t[0], RETURNED, None, 0.0) for t in batch.tasks]
            return BatchReport(batch.batch_id, self.pid, outcomes, retiring=True, setup_error=self.setup_error)
        chunks: list[bytes] = []
        outcomes: list[tuple] = []
        written = 0
        retiring = False
        for index, spec in enumerate(batch.tasks):
            if retiring:
                outcomes.extend((t[0], RETURNED, None, 0.0) for t in batch.tasks[index:])
                break
            outcome, data, retiring = self._run_one(spec, written)
            if data:
                chunks.append(data)
                written += len(data)
            if outcome[1] == DONE:
                self._trailer.add(spec, outcome[2], outcome[3], time.time())
            outcomes.append(outcome)
        write_error = None
        if self._trailer.tasks:
            chunks.append(self._trailer.line(batch.batch_id))
            write_error = self._write(batch.batch_id, chunks)
        return BatchReport(batch.batch_id, self.pid, outcomes, retiring, write_error)

    def _run_one(self, spec: tuple, written: int) -> tuple[tuple, bytes, bool]:
        task_id, path_bytes, offset, length, size, mtime_ns = spec[:6]
        path = os.fsdecode(self.config.data_dir + b"/" + path_bytes)
        task = Task(task_id, path, relpath_for_processors(path_bytes),
                    offset if length is not None else None, length, self.config.params,
                    self.hooks.context, self.hooks.preloaded)
        self.slot[1] = time.monotonic_ns()
        self.slot[0] = task_id
        started = time.perf_counter()
        retiring = False
        try:
            data = encode_records(self.processor.func(task), self._source_of(task))
            outcome = self._check_unchanged(task_id, path, size, mtime_ns, data, written, started)
        except Exception as exc:
            data, outcome = b"", self._failure(task_id, path, exc, started)
        except BaseException as exc:  # SystemExit, KeyboardInterrupt: fail the task, then retire
            data, outcome, retiring = b"", self._failure(task_id, path, exc, started), True
        finally:
            self.slot[0] = 0
        if outcome[1] != DONE:
            data = b""
        return outcome, data, retiring or self._over_memory()

    def close(self) -> None:
        """The processor's teardown, when the worker retires or is told to stop."""
        if self.hooks is not None:
            self.hooks.close()

    def _source_of(self, task: Task) -> dict[str, Any] | None:
        """The fields --source-column puts in front of each record of `task`."""
        if self.config.source_column is None:
            return None
        fields: dict[str, Any] = {self.config.source_column: task.relpath}
        if self.config.offset_column is not None:
            fields[self.config.offset_column] = task.offset or 0
        return fields

    def _check_unchanged(self, task_id, path, size, mtime_ns, data, written, started) -> tuple:
        """Done only if the file still has the size and mtime it was scanned with."""
        elapsed = time.perf_counter() - started
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return (task_id, GONE, None, elapsed)
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            return (task_id, CHANGED, (st.st_size, st.st_mtime_ns), elapsed)
        return (task_id, DONE, (written, len(data), checksum(data)), elapsed)

    def _failure(self, task_id: int, path: str, exc: BaseException, started: float) -> tuple:
        elapsed = time.perf_counter() - started
        if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
            return (task_id, GONE, None, elapsed)
        details = exc.details if isinstance(exc, TaskFailed) else None
        return (task_id, FAILED, (describe_exception(exc), details or traceback.format_exc()), elapsed)

    def _over_memory(self) -> bool:
        """RSS past --max-memory-per-child? Read at most every MEMORY_CHECK_SECONDS.

        A reading costs about as much as a tiny task, so back-to-back tiny tasks
        share one; a task that ran that long is always followed by a reading.
        """
        if not self.config.max_memory:
            return False
        now = time.perf_counter()
        if now - self._memory_checked < MEMORY_CHECK_SECONDS:
            return False
        self._memory_checked = now
        if self._process is None:
            import psutil

            self._process = psutil.Process()
        return self._process.memory_info().rss > self.config.max_memory

    def _write(self, batch_id: int, chunks: list[bytes]) -> str | None:
        try:
            write_atomic(result_path(self.out, batch_id), b"".join(chunks), durable=self.config.durable)
        except OSError as exc:
            return f"cannot write result file for batch {batch_id}: {exc.strerror or exc}"
        return None


def encode_records(result: Any, source: Mapping[str, Any] | None = None) -> bytes:
    """JSON lines for what a processor returned: a dict, an iterable of dicts, or None.

    `source` fields go first in each record; a record's own key of the same name keeps its value.
    """
    if result is None:
        return b""
    if type(result) is dict or isinstance(result, Mapping):
        return _encode_one(result, source)
    if isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
        raise TypeError(f"processor returned {type(result).__name__}; expected a dict, dicts, or None")
    return b"".join(_encode_one(record, source) for record in result)


def _encode_one(record: Any, source: Mapping[str, Any] | None) -> bytes:
    if type(record) is not dict and not isinstance(record, Mapping):
        raise TypeError(f"processor yielded {type(record).__name__}; each record must be a dict")
    if source is not None:
        record = {**source, **record}
    try:
        return (_encode_json(record) + "\n").encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise TypeError(f"processor returned a record that cannot be written as JSON: {exc}") from None


def _load_failure(spec: str, exc: Exception) -> str:
    """Why the processor could not be loaded in this worker process, in one line."""
    from crawlproc.errors import CrawlprocError
    from crawlproc.processors.base import import_failure, spec_for_people

    why = exc.args[0] if isinstance(exc, CrawlprocError) and exc.args else import_failure(exc)
    return f"processor {spec_for_people(spec)} cannot be loaded in worker process {os.getpid()}: {why}"


def describe_exception(exc: BaseException) -> str:
    """repr() names the exception type; a TaskFailed's own message is already written for people."""
    text = str(exc) if isinstance(exc, TaskFailed) else repr(exc)
    return text if len(text) <= 2000 else text[:2000] + "..."


# -- the worker process ---------------------------------------------------------

def worker_main(config: WorkerConfig, conn: Any, slot: Any) -> None:
    """Entry point of a worker process (started with forkserver or spawn)."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when we stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the forkserver ignores it; we need not
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_inbox, args=(conn, inbox), daemon=True, name="inbox").start()
    worker = Worker(config, slot)
    while (batch := inbox.get()) is not None:
        report = worker.run_batch(batch)
        try:
            conn.send(report)
        except OSError:  # the coordinator died (kill -9) before its inbox thread saw it: no traceback
            _coordinator_gone()
        if report.retiring:
            break
    worker.close()
    # Return without closing `conn`: the inbox thread would take its own closed
    # pipe for a dead coordinator. The process exit closes it.


def _read_inbox(conn: Any, inbox: queue.SimpleQueue) -> None:
    """Forward batches; when the coordinator's end closes (it died), stop everything at once."""
    try:
        while True:
            message = conn.recv()
            inbox.put(message)
            if message is None:
                return
    except (EOFError, OSError):
        _coordinator_gone()


def _coordinator_gone() -> None:
    """Nobody will record our work: stop at once, ourselves and anything a processor started
    (its result file, if written, is an orphan the next run removes)."""
    os.killpg(0, signal.SIGKILL)
