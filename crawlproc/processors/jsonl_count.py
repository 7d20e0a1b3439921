"""Built-in `jsonl-count`: valid, invalid and blank lines of JSON-lines files.

Record of one task (a file, or a byte range of it with --chunk-size):

    {"path": relpath, "offset": 0, "records": 10, "invalid": 1, "blank": 2,
     "invalid_samples": [{"offset": 1234, "error": "Expecting value: line 1 column 1 (char 0)"}]}

- `records`: lines that parse as one JSON value (an object, array, string,
  number, true/false/null; Python's json also takes NaN and Infinity),
  surrounding whitespace and a CRLF allowed.
- `invalid`: non-blank lines that do not (including lines that are not UTF-8).
- `blank`: lines holding only whitespace; they count neither as records nor as
  invalid (JSON-lines readers skip them).
- `invalid_samples` (only when `invalid` > 0): the byte offset in the file of
  the first few invalid lines, and the parser's message.

Lines are the task's own (`Task.lines()`), so byte ranges of one file count
every line exactly once; the reducer sums the counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from crawlproc.processors.base import processor
from crawlproc.task import Task

MAX_SAMPLES = 5
REDUCED_SAMPLES = 10


@processor(version="1")
def jsonl_count(task: Task) -> dict:
    """JSON lines per file: records (valid lines), invalid lines, blank lines; sums in summary."""
    records = invalid = blank = 0
    samples: list[dict] = []
    loads = json.loads
    start = _first_line_start(task)
    consumed = 0  # bytes of the task's lines before the current one
    for line in task.lines(binary=True):
        try:
            text = line.decode("utf-8")
            if not consumed and not start:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark opens the file
            loads(text)
            records += 1
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            if line.isspace():
                blank += 1
            else:
                invalid += 1
                if len(samples) < MAX_SAMPLES:
                    samples.append({"offset": start + consumed, "error": _message(exc)})
        consumed += len(line)
    record = {"path": task.relpath, "offset": task.offset or 0,
              "records": records, "invalid": invalid, "blank": blank}
    if samples:
        record["invalid_samples"] = samples
    return record


def _first_line_start(task: Task) -> int:
    """The file offset of the first line the task owns (Task.lines() semantics)."""
    if not task.offset:
        return 0
    with open(task.path, "rb") as f:
        f.seek(task.offset - 1)
        if f.read(1) == b"\n":
            return task.offset
        return task.offset + len(f.readline())


def _message(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg + f" (column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8: {exc.reason} at byte {exc.start}"
    return str(exc)[:200]


@jsonl_count.reducer
def jsonl_totals(records: Iterable[dict]) -> dict:
    """Sums over every file and chunk."""
    paths: set[str] = set()
    tasks = valid = invalid = blank = 0
    samples: list[dict] = []
    for record in records:
        tasks += 1
        paths.add(record["path"])
        valid += record["records"]
        invalid += record["invalid"]
        blank += record["blank"]
        for sample in record.get("invalid_samples", ()):
            if len(samples) < REDUCED_SAMPLES:
                samples.append({"path": record["path"], **sample})
    out = {"files": len(paths), "tasks": tasks, "records": valid, "invalid": invalid, "blank": blank}
    if samples:
        out["invalid_samples"] = samples
    return out
