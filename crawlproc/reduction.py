"""The processor's reducer, run beside the merge in a forked child.

    merge ──records, as they are copied──> pipe ──> child: parse the JSON lines, reducer(records)
          <──────────── the pickled result ─────────────────┘

Turning every merged record back into a dict is most of what a reduction
costs, and it needs nothing but the records: a child does it on another core
while the merge is still copying, instead of after it. Whenever the child
cannot give a result (another thread that may hold a lock runs here, so a
fork could copy it held: children.forking_is_safe; the reducer raised; the result does not pickle; the child died), the
reducer runs here over the merged file, exactly as it would have without the
child, errors and all.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any, TextIO

from crawlproc.children import flush_std_streams, fork_child, forking_is_safe

Reducer = Callable[[Iterator[dict]], Any]

_NO_RESULT = object()
PIPE_BYTES = 1 << 20  # see _widen_pipe


class Reduction:
    """Feed it the merged bytes in order (`feed`), then ask for the `result`."""

    def __init__(self, reducer: Reducer) -> None:
        self._reducer = reducer
        self._pid: int | None = None
        self._records: int | None = None  # the pipe's write end, while feeding
        self._answer: int | None = None  # the child's result pipe, read end
        if forking_is_safe():
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
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self._pid, 0)
            self._pid = None

    # -- internals --------------------------------------------------------------------
    def _fork(self) -> None:
        child = fork_child(lambda records, answer: _reduce(self._reducer, records, answer))
        if child is not None:
            self._pid, self._records, self._answer = child
            _widen_pipe(self._records)

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


def _widen_pipe(fd: int) -> None:
    """Let the pipe hold a whole block of the merge (finalize._Sink writes 1 MB at a time).

    With Linux's default 64 KB, the merge waited on the child sixteen times a block
    and the two took turns instead of working side by side: copying 100,000 tiny
    records took 0.23 s instead of 0.18 s. Where pipes cannot grow (not Linux, or
    over /proc/sys/fs/pipe-max-size), it stays as it is."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


def _reduce(reducer: Reducer, records_fd: int, answer_fd: int) -> None:
    """In the child: reduce the records from the pipe and send back the pickled result."""
    try:
        with open(records_fd, encoding="utf-8") as stream:
            payload = pickle.dumps(reducer(records_in(stream)))
        with open(answer_fd, "wb") as answer:
            answer.write(payload)
    except BaseException:  # noqa: BLE001 - no result: the parent runs the reducer itself
        pass
    finally:
        flush_std_streams()  # what the reducer printed: fork_child ends the child with os._exit


def records_in(stream: TextIO, block: int = 4096) -> Iterator[dict]:
    """Parse JSON lines; a block of lines is parsed as one array (far fewer calls)."""
    while lines := list(islice(stream, block)):
        yield from json.loads("[" + ",".join(lines) + "]")
