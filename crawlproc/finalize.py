"""The finalizer: done tasks' records, in (relpath, offset) order, into one output + summary.

    ledger (done, ORDER BY path_bytes, offset) ──> result file ranges, crc-checked
        ──> temp JSON lines ──reducer──> (kept for summary.json)
                  └──rename (jsonl) or convert (csv, parquet)──> --output

Readers never see a half-written file, and OUT holds one merged output:
publishing OUT/merged.csv removes an OUT/merged.jsonl of an earlier run. A done
task whose range is missing or does not match its checksum goes back to
pending: `run` processes it again before it merges; `merge` alone reports it.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import zlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from crawlproc.identity import CODE_KEY
from crawlproc.ledger import Ledger
from crawlproc.processors.base import Processor
from crawlproc.reduction import Reduction, records_in
from crawlproc.results import ResultReader, result_path, write_atomic

SUMMARY_NAME = "summary.json"
LAST_MERGE_KEY = "last_merge"


FORMATS = ("jsonl", "csv", "parquet")


@dataclass
class MergeOutcome:
    published: bool
    records_bytes: int = 0
    tasks: int = 0
    damaged: int = 0
    output: Path | None = None
    reduced: Any = None
    unchanged: bool = False  # nothing changed since the last merge: the output was kept
    # Result files of the done tasks: batch id -> bytes of records they need (0: none, but
    # the file's trailer names them). Every other result file is unreferenced (see
    # results.remove_unreferenced).
    batches: dict[int, int] = field(default_factory=dict)


def default_output(out: Path, fmt: str) -> Path:
    return out / f"merged.{fmt}"


def merge_results(
    ledger: Ledger,
    out: Path,
    output: Path,
    *,
    fmt: str = "jsonl",
    reducer: Callable[[Iterator[dict]], Any] | None = None,
    publish_if_damaged: bool = True,
    reuse_unchanged: bool = False,
    reducer_checked: bool = True,
) -> MergeOutcome:
    """Copy every done task's records into `output`, atomically, and reduce them.

    Damaged tasks are requeued; with `publish_if_damaged=False` nothing is
    published in that case, so the caller can redo them and merge again.
    With `reuse_unchanged`, when nothing changed since the last merge into the
    same `output` and its result files are all still there (size checked, not
    checksums), the published output is kept as it is: a no-op rerun stays cheap. Without
    `reducer_checked` (`crawlproc merge`, with the code found on disk, which no run compared
    with OUT's), no later merge takes this one's summary as its own.
    """
    last = _last_merge_into(ledger, output) if reuse_unchanged else None
    if last is not None and (previous := _unchanged(last, _signature(ledger, output, fmt), output, out)) is not None:
        return previous
    output.parent.mkdir(parents=True, exist_ok=True)
    temp = output.with_name(f".{output.name}.{os.getpid()}.jsonl.tmp")
    reduction = Reduction(reducer) if reducer is not None else None  # forks: before any thread starts
    # The signature is remembered with the merge: its pass over the tasks runs on a connection and
    # a thread of its own (sqlite leaves the GIL) while the copy runs, instead of before it.
    ledger.count_ahead(unless_fresh=True)
    try:
        written, tasks, damaged, batches = _copy_done_ranges(
            ledger, out, temp, also_to=reduction.feed if reduction is not None else None)
        if damaged:
            ledger.requeue_damaged(damaged, "result file missing or damaged; processed again")
            if not publish_if_damaged:
                return MergeOutcome(False, written, tasks, len(damaged), batches=batches)
        reduced = _reduced(reduction, reducer, temp, out) if reduction is not None else None
        _publish(temp, output, fmt, lambda n: describe_record(ledger, out, n))
        _remove_other_formats(out, output)
    finally:
        if reduction is not None:
            reduction.close()
        if temp.exists():
            os.unlink(temp)
    if not damaged:  # nothing written since the copy: the signature is that of the tasks copied
        _remember_merge(ledger, output, _signature(ledger, output, fmt, reducer_checked), reduced, batches)
    return MergeOutcome(True, written, tasks, len(damaged), output, reduced, batches=batches)


def _reduced(reduction: Reduction, reducer: Callable, merged: Path, out: Path) -> Any:
    """The reducer's result; if it raises, one line that names it (it is the user's code, not ours)."""
    try:
        return reduction.result(lambda: iter_records(merged))
    except Exception as exc:
        import traceback

        from crawlproc.errors import ReducerFailed
        from crawlproc.outcomes import frame_of

        where = frame_of("".join(traceback.format_exception(exc)))
        name = getattr(reducer, "__qualname__", repr(reducer))
        raise ReducerFailed(f"the reducer {name} failed: {exc!r}{f' ({where})' if where else ''}; every task is "
                            "done, and neither the merged output nor summary.json was written: fix it, then "
                            f"`crawlproc merge -o {shlex.quote(str(out))}` merges and reduces them (and the next "
                            "run on OUT takes --keep-results: the reducer is part of the processor's code)") from exc


def _remove_other_formats(out: Path, published: Path) -> None:
    """When OUT's own merged.<format> was just published, one of another format that an earlier
    run left in OUT is stale: remove it. A --output file elsewhere is never touched."""
    ours = {os.path.abspath(default_output(out, fmt)) for fmt in FORMATS}
    published_path = os.path.abspath(published)
    if published_path not in ours:
        return
    for stale in sorted(ours - {published_path}):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            continue
        logger.info("removed {}: a merged output of an earlier --format (now {})", stale, published)


def _signature(ledger: Ledger, output: Path, fmt: str, reducer_checked: bool = True) -> list:
    """What a merge's outcome depends on: the output, the done tasks, and the code whose reducer
    made the summary (an edit accepted with --keep-results changes no task, but the totals);
    None for code that no run compared with OUT's."""
    meta = ledger.meta()
    code = [meta.get("processor_version"), meta.get(CODE_KEY)] if reducer_checked else [None, None]
    return [str(output), fmt, *ledger.done_signature(), *code]


def _last_merge_into(ledger: Ledger, output: Path) -> dict | None:
    """What the last merge remembered, if `output` is still the file it published."""
    stored = ledger.meta().get(LAST_MERGE_KEY)
    if stored is None:
        return None
    last = json.loads(stored)
    try:
        st = output.stat()
    except FileNotFoundError:
        return None
    return last if last["output_stat"] == [st.st_size, st.st_mtime_ns] else None


def _unchanged(last: dict, signature: list, output: Path, out: Path) -> MergeOutcome | None:
    """The last merge's outcome if it is still exactly what a new merge would publish."""
    if last["signature"] != signature:
        return None
    if "batches" not in last:
        return None  # remembered by an older crawlproc: merge in full once
    # The same done tasks as then (the signature says so), so the same result files.
    batches = {int(batch_id): needed for batch_id, needed in last["batches"].items()}
    if not _result_files_present(out, batches):
        return None  # a full merge finds which tasks lost their results, and requeues them
    return MergeOutcome(True, last["output_stat"][0], signature[2], 0, output, last["reduced"], unchanged=True,
                        batches=batches)


def _remember_merge(ledger: Ledger, output: Path, signature: list, reduced: Any, batches: dict[int, int]) -> None:
    st = output.stat()
    ledger.set_meta({LAST_MERGE_KEY: json.dumps(
        {"signature": signature, "output_stat": [st.st_size, st.st_mtime_ns], "reduced": reduced,
         "batches": batches}, default=str)})


def _result_files_present(out: Path, batches: dict[int, int]) -> bool:
    """Cheap check: every referenced result file exists and is long enough."""
    for batch_id, needed in batches.items():
        if not needed:
            continue  # no records to copy (an older crawlproc wrote no file for such a batch)
        try:
            if result_path(out, batch_id).stat().st_size < needed:
                return False
        except FileNotFoundError:
            return False
    return True


def _copy_done_ranges(
    ledger: Ledger, out: Path, sink_path: Path, also_to: Callable[[bytes], None] | None = None,
) -> tuple[int, int, list[int], dict[int, int]]:
    """Append each done task's crc-checked records to `sink_path` (and hand them to `also_to`).

    Returns (bytes, tasks, damaged task ids, {batch id: bytes of its file the tasks use}).

    This loop runs once per task, so it is kept tight: a batch's tasks follow merge order and
    lie back to back in its result file, so each such run of ranges is written as one slice
    (every task's crc is still checked on its own).
    """
    reader = ResultReader(out)
    crc32 = zlib.crc32
    damaged: list[int] = []
    batches: dict[int, int] = {}
    tasks = written = 0
    current: int | None = None
    data: memoryview | None = None  # the current result file, whole (None: missing, or read by ranges)
    loaded = False
    run_start = run_end = 0  # the ranges of `data` checked but not yet written

    def write_run() -> None:
        if run_end > run_start:
            sink.write(data[run_start:run_end])
            if batches.get(current, -1) < run_end:
                batches[current] = run_end

    try:
        with _Sink(sink_path, also_to) as sink:
            for task_id, batch_id, offset, length, crc in ledger.done_in_merge_order():
                end = offset + (length or 0)
                if batch_id != current:
                    write_run()
                    current, run_start, run_end = batch_id, 0, 0
                    data, loaded = None, False
                if not length:  # no records (the file may not even exist)
                    if crc != 0:
                        damaged.append(task_id)
                        continue
                    if batches.get(batch_id, -1) < end:
                        batches[batch_id] = end
                    tasks += 1
                    continue
                if not loaded:
                    data, loaded = reader.whole(batch_id), True
                if data is None:  # a file too big to hold, or missing: range by range
                    chunk = reader.read(batch_id, offset, length)
                    if chunk is None or crc32(chunk) != crc:
                        damaged.append(task_id)
                        continue
                    sink.write(chunk)
                    written += length
                    tasks += 1
                    if batches.get(batch_id, -1) < end:
                        batches[batch_id] = end
                    continue
                if end > len(data) or crc32(data[offset:end]) != crc:
                    damaged.append(task_id)
                    continue
                if offset != run_end:
                    write_run()
                    run_start = offset
                run_end = end
                written += length
                tasks += 1
            write_run()
    finally:
        reader.close()
    return written, tasks, damaged, batches


class _Sink:
    """A file written in blocks of about a megabyte, each also handed to `also_to`."""

    BLOCK = 1 << 20

    def __init__(self, path: Path, also_to: Callable[[bytes], None] | None) -> None:
        self._file = open(path, "wb")  # buffered: it writes a whole block, whatever the OS takes at once
        self._also_to = also_to
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self.BLOCK:
            self._flush()

    def _flush(self) -> None:
        block = b"".join(self._parts)
        self._parts, self._size = [], 0
        self._file.write(block)
        if self._also_to is not None:
            self._also_to(block)

    def __enter__(self) -> _Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None and self._size:
                self._flush()
        finally:
            self._file.close()


def _publish(merged_jsonl: Path, output: Path, fmt: str, describe_record: Callable[[int], str]) -> None:
    """Put the merged records at `output` in `fmt`, atomically (temp in the same folder, rename)."""
    if fmt == "jsonl":
        os.replace(merged_jsonl, output)
        return
    temp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        if fmt == "csv":
            _write_csv(merged_jsonl, temp)
        else:
            from crawlproc.parquet import write_parquet

            write_parquet(merged_jsonl, temp, describe_record)
        os.replace(temp, output)
    finally:
        if temp.exists():
            os.unlink(temp)


def _write_csv(merged_jsonl: Path, target: Path) -> None:
    """Columns: the union of record keys in first-seen order; nested values as JSON text."""
    columns: dict[str, None] = {}
    for record in iter_records(merged_jsonl):
        columns.update(dict.fromkeys(record))
    # Names that are not UTF-8 come back from JSON as lone surrogates: write them escaped.
    with open(target, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for record in iter_records(merged_jsonl):
            writer.writerow({k: _csv_cell(v) for k, v in record.items()})


def _csv_cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, (dict, list)) else value


def describe_record(ledger: Ledger, out: Path, index: int) -> str:
    """Which task wrote the `index`-th merged record (from 0): for messages, so it may read a while."""
    reader = ResultReader(out)
    try:
        for task_id, batch_id, offset, length, _ in ledger.done_in_merge_order():
            records = (reader.read(batch_id, offset, length) or b"").count(b"\n") if length else 0
            if index < records:
                relpath, chunk = ledger.task_place(task_id) or ("?", None)
                return f"task {task_id}, {relpath}" + (f" at offset {chunk}" if chunk is not None else "")
            index -= records
    finally:
        reader.close()
    return "task unknown"


def iter_records(path: Path) -> Iterator[dict]:
    """The records of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        yield from records_in(f)


def write_summary(
    out: Path,
    ledger: Ledger,
    processor: Processor,
    identity: Mapping[str, Any],
    merged: MergeOutcome | None,
    timings: Mapping[str, Any],
) -> dict:
    """summary.json: counts by state, timings, identity and the reducer's result; what the last
    full scan skipped on purpose ("skipped", by kind) and the paths no scan could read
    ("scan_problems": their files are missing from the output)."""
    counts = ledger.counts()
    summary: dict[str, Any] = {
        "out": str(out),
        "processor": identity.get("processor"),
        "processor_version": identity.get("processor_version"),
        "params": identity.get("params", {}),
        "kept_results": ledger.kept_results(),  # each --keep-results that kept records of older code
        "counts": counts,
        "total": sum(counts.values()),
        "merged_output": str(merged.output) if merged and merged.output else None,
        "skipped": ledger.scan_skipped(),
        "scan_problems": ledger.scan_problems(),
        "timings": dict(timings),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if processor.reduce is not None and merged is not None:
        summary["reduced"] = merged.reduced
    text = json.dumps(summary, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(out / SUMMARY_NAME, text.encode())
    return summary
