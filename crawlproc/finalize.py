"""The finalizer: done tasks' records, in (relpath, offset) order, into one output + summary.

    ledger (done, ORDER BY path_bytes, offset) ──> result file ranges, crc-checked
        ──> temp file ──rename──> merged.jsonl ──reducer──> summary.json (temp + rename)

Readers never see a half-written file. A done task whose range is missing or
does not match its checksum goes back to pending: `run` processes it again
before it merges; `merge` alone reports it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crawlproc.ledger import Ledger
from crawlproc.processors.base import Processor
from crawlproc.results import ResultReader, checksum, write_atomic

SUMMARY_NAME = "summary.json"
MERGED_NAME = "merged.jsonl"


@dataclass
class MergeOutcome:
    published: bool
    records_bytes: int = 0
    tasks: int = 0
    damaged: int = 0
    output: Path | None = None


def merge_results(
    ledger: Ledger,
    out: Path,
    output: Path,
    *,
    publish_if_damaged: bool = True,
) -> MergeOutcome:
    """Copy every done task's records into `output`, atomically.

    Damaged tasks are requeued; with `publish_if_damaged=False` nothing is
    published in that case, so the caller can redo them and merge again.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    reader = ResultReader(out)
    damaged: list[int] = []
    tasks = written = 0
    try:
        with open(temp, "wb", buffering=1 << 20) as sink:
            for task_id, _, _, batch_id, offset, length, crc in ledger.done_in_merge_order():
                data = reader.read(batch_id, offset, length) if length else b""
                if data is None or checksum(data) != crc:
                    damaged.append(task_id)
                    continue
                sink.write(data)
                written += len(data)
                tasks += 1
    finally:
        reader.close()
    if damaged:
        ledger.requeue_damaged(damaged, "result file missing or damaged; processed again")
        if not publish_if_damaged:
            os.unlink(temp)
            return MergeOutcome(False, written, tasks, len(damaged))
    os.replace(temp, output)
    return MergeOutcome(True, written, tasks, len(damaged), output)


def iter_records(path: Path, block: int = 4096) -> Iterator[dict]:
    """Parse a JSON-lines file; a block of lines is parsed as one array (far fewer calls)."""
    with open(path, encoding="utf-8") as f:
        while lines := list(islice(f, block)):
            yield from json.loads("[" + ",".join(lines) + "]")


def write_summary(
    out: Path,
    ledger: Ledger,
    processor: Processor,
    identity: Mapping[str, Any],
    merged: MergeOutcome | None,
    timings: Mapping[str, Any],
) -> dict:
    """summary.json: counts by state, timings, identity and the reducer's result."""
    counts = ledger.counts()
    summary: dict[str, Any] = {
        "out": str(out),
        "processor": identity.get("processor"),
        "processor_version": identity.get("processor_version"),
        "params": identity.get("params", {}),
        "counts": counts,
        "total": sum(counts.values()),
        "merged_output": str(merged.output) if merged and merged.output else None,
        "timings": dict(timings),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if processor.reduce is not None and merged and merged.output:
        summary["reduced"] = processor.reduce(iter_records(merged.output))
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(out / SUMMARY_NAME, text.encode())
    return summary
