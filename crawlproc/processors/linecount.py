"""Built-in `linecount`: lines, words and bytes of each file, like `wc`."""

from __future__ import annotations

from collections.abc import Iterable

from crawlproc.processors.base import processor
from crawlproc.task import Task


@processor(version="1")
def linecount(task: Task) -> dict:
    """Lines, words and bytes per file (a last line without newline counts); totals in summary."""
    if task.is_range:
        lines = words = size = 0
        for line in task.lines(binary=True):
            lines += 1
            words += len(line.split())
            size += len(line)
    else:
        data = task.read_bytes()
        size = len(data)
        lines = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
        words = len(data.split())
    return {"path": task.relpath, "lines": lines, "words": words, "bytes": size}


@linecount.reducer
def totals(records: Iterable[dict]) -> dict:
    files = lines = words = size = 0
    previous = None
    for record in records:  # in merge order: the chunks of a file are adjacent
        files += record["path"] != previous
        previous = record["path"]
        lines += record["lines"]
        words += record["words"]
        size += record["bytes"]
    return {"files": files, "lines": lines, "words": words, "bytes": size}
