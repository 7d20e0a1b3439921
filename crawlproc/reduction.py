"""The processor's reducer, run beside the merge in a forked child.

    merge ──records, as they are copied──> pipe ──> child: parse the JSON lines, reducer(records)
          <──────────── the pickled result ─────────────────┘

Turning every merged record back into a dict is most of what a reduction
costs, and it needs nothing but the records: a child does it on another core
while the merge is still copying, instead of after it. Whenever the child
cannot give a result (another thread runs here, so a fork could copy a held
lock; the reducer raised; the result does not pickle; the child died), the
reducer runs here over the merged file, exactly as it would have without the
child, errors and all.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import threading
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, TextIO

Reducer = Callable[[Iterator[dict]], Any]

_NO_RESULT = object()


class Reduction:
    """Feed it the merged bytes in order (`feed`), then ask for the `result`."""

    def __init__(self, reducer: Reducer) -> None:
        self._reducer = reducer
        self._pid: int | None = None
        self._records: int | None = None  # the pipe's write end, while feeding
        self._answer: int | None = None  # the child's result pipe, read end
        if threading.active_count() == 1:
            self._fork()

    def feed(self, data: bytes) -> None:
        if self._records is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._records, view):]
        except OSError:  # the child is gone: result() will say so
            self._end_feeding()

    def result(self, merged: Callable[[], Iterator[dict]]) -> Any:
        """The reducer's result; `merged` gives the records again if it must run here."""
        self._end_feeding()
        answer = self._collect()
        if answer is _NO_RESULT:
            return self._reducer(merged())
        return answer

    def close(self) -> None:
        """Stop the child if it still runs (the merge failed or gave up)."""
        self._end_feeding()
        if self._answer is not None:
            os.close(self._answer)
            self._answer = None
        if self._pid is not None:
            try:
                os.kill(self._pid, 9)
            except ProcessLookupError:
                pass
            os.waitpid(self._pid, 0)
            self._pid = None

    # -- internals --------------------------------------------------------------------
    def _fork(self) -> None:
        _flush_quietly(sys.stdout)  # or the child would write out our buffered output again
        _flush_quietly(sys.stderr)
        records_r, records_w = os.pipe()
        answer_r, answer_w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            for fd in (records_r, records_w, answer_r, answer_w):
                os.close(fd)
            return
        if pid == 0:  # the child: never returns
            os.close(records_w)
            os.close(answer_r)
            _reduce_and_exit(self._reducer, records_r, answer_w)
        os.close(records_r)
        os.close(answer_w)
        self._pid, self._records, self._answer = pid, records_w, answer_r

    def _end_feeding(self) -> None:
        if self._records is not None:
            os.close(self._records)  # the child sees the end of the records
            self._records = None

    def _collect(self) -> Any:
        if self._answer is None:
            return _NO_RESULT
        with open(self._answer, "rb") as answer:
            self._answer = None
            data = answer.read()
        os.waitpid(self._pid, 0)
        self._pid = None
        try:
            return pickle.loads(data) if data else _NO_RESULT
        except Exception:  # a result that pickles but does not load back here
            return _NO_RESULT


def _reduce_and_exit(reducer: Reducer, records_fd: int, answer_fd: int) -> None:
    """In the child: reduce the records from the pipe, send back the pickled result, and end
    without running anything of the parent's (atexit handlers, buffered output, the ledger)."""
    try:
        with open(records_fd, encoding="utf-8") as stream:
            payload = pickle.dumps(reducer(records_in(stream)))
        with open(answer_fd, "wb") as answer:
            answer.write(payload)
    except BaseException:  # noqa: BLE001 - no result: the parent runs the reducer itself
        pass
    finally:
        _flush_quietly(sys.stdout)
        _flush_quietly(sys.stderr)
        os._exit(0)


def records_in(stream: TextIO, block: int = 4096) -> Iterator[dict]:
    """Parse JSON lines; a block of lines is parsed as one array (far fewer calls)."""
    while lines := list(islice(stream, block)):
        yield from json.loads("[" + ",".join(lines) + "]")


def _flush_quietly(stream: TextIO) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        pass
