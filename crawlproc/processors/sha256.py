"""Built-in `sha256`: the SHA-256 digest and size of each file (or byte range)."""

from __future__ import annotations

import hashlib

from crawlproc.processors.base import processor
from crawlproc.task import Task


@processor(version="1")
def sha256(task: Task) -> dict:
    """Size and SHA-256 hex digest of each file (of each byte range with --chunk-size)."""
    digest = hashlib.sha256()
    size = 0
    with task.open() as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    record = {"path": task.relpath, "size": size, "sha256": digest.hexdigest()}
    if task.is_range:
        record["offset"] = task.offset
    return record
