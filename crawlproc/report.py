"""The small commands around a run: status, failures, retry, merge.

They read the ledger while a run may be going (WAL readers never block the
writer); `retry` and `merge` write, so they take OUT's lock like a run does.
Functions here return data or rich renderables; the CLI prints them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from crawlproc.errors import UsageError
from crawlproc.finalize import default_output, merge_results, write_summary
from crawlproc.ledger import Ledger
from crawlproc.lock import LOCK_NAME, OutLock
from crawlproc.results import remove_temp_files, remove_unreferenced
from crawlproc.run import LEDGER_NAME, check_out_entries

ERROR_WIDTH = 100


def _open_readonly(out: Path) -> Ledger:
    if not out.is_dir():
        raise UsageError(f"OUT {out} does not exist")
    return Ledger(out / LEDGER_NAME, readonly=True)


def running_pid(out: Path) -> int | None:
    """The pid of the coordinator holding OUT's lock, or None when no run is going."""
    try:
        fd = os.open(out / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)


def status_data(out: Path) -> dict[str, Any]:
    ledger = _open_readonly(out)
    try:
        counts = ledger.counts()
        meta = ledger.meta()
        last = ledger.last_run()
        problems = ledger.scan_problems()
    finally:
        ledger.close()
    data: dict[str, Any] = {
        "out": str(out), "counts": counts, "total": sum(counts.values()), "scan_problems": problems,
        "data_dir": meta.get("data_dir"), "processor": meta.get("processor"),
        "processor_version": meta.get("processor_version"),
        "running_pid": running_pid(out), "last_run": None, "throughput_files_per_s": None,
    }
    if last:
        end = last["finished"] or last["updated"] or time.time()
        elapsed = max(end - last["started"], 1e-9)
        data["last_run"] = {k: last[k] for k in ("id", "command", "pid", "started", "updated", "finished",
                                                  "exit_code", "done", "failed")}
        data["last_run"]["watch"] = json.loads(last["info"]) if last["info"] else None
        data["throughput_files_per_s"] = round(last["done"] / elapsed, 1)
    return data


def status_table(data: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(show_header=True)
    table.add_column("state")
    table.add_column("tasks", justify="right")
    for state, n in data["counts"].items():
        table.add_row(state, str(n))
    table.add_row("total", str(data["total"]), style="bold")
    lines = [f"OUT: {data['out']}", table, f"processor: {data['processor']} (version {data['processor_version']})",
             f"data dir: {data['data_dir']}"]
    if data["scan_problems"]:
        lines += _scan_problems_lines(data["scan_problems"], data["out"])
    if data["running_pid"]:
        lines.append(f"a run is going (pid {data['running_pid']})")
    run = data["last_run"]
    if run:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"]))
        end = "still going" if run["finished"] is None else f"exit code {run['exit_code']}"
        lines.append(f"last {run['command']}: started {when}, {run['done']} done, {run['failed']} failed, {end}; "
                     f"{data['throughput_files_per_s']} files/s")
        if run["watch"] and run["finished"] is None:
            lines.append(_watch_line(run["watch"]))
    from rich.console import Group

    return Group(*lines)


def _scan_problems_lines(problems: list[dict[str, Any]], out: str) -> list[str]:
    """Paths no scan could read: what they hold is missing from the output."""
    first = problems[0]
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return [f"not scanned: {first['relpath']} ({first['error']}){more}",
            f"  see: crawlproc failures -o {shlex.quote(out)}"]


def _watch_line(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["watching_since"]))
    last = "none yet" if not info["last_event"] else f"{time.time() - info['last_event']:.0f}s ago"
    return (f"watching since {since}; queue depth {info['queue_depth']}; last event {last}; "
            f"{info['events']} events, {info['rescans']} scans")


def failures_data(out: Path) -> list[dict[str, Any]]:
    ledger = _open_readonly(out)
    try:
        return ledger.failures()
    finally:
        ledger.close()


def failures_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    unscanned = sum(1 for row in rows if row["kind"] == "scan")
    title = f"{len(rows) - unscanned} failed tasks" + (
        f", {unscanned} {'path' if unscanned == 1 else 'paths'} not scanned" if unscanned else "")
    table = Table(title=title)
    for column in ("relpath", "offset", "attempts", "error"):
        table.add_column(column)
    for row in rows:
        error = (row["error"] or "").splitlines()[0] if row["error"] else ""
        offset = "-" if row["offset"] is None else str(row["offset"])
        table.add_row(row["relpath"], offset, str(row["attempts"]), error[:ERROR_WIDTH])
    return table


def retry_tasks(out: Path, *, include_done: bool, relpaths: tuple[str, ...]) -> int:
    check_out_entries(out)
    _open_readonly(out).close()  # a clear message when OUT has no ledger
    with OutLock(out):
        ledger = Ledger(out / LEDGER_NAME)
        try:
            return ledger.retry(include_done=include_done, relpaths=relpaths)
        finally:
            ledger.close()


def merge_only(out: Path, output: Path | None, fmt: str = "jsonl") -> tuple[dict[str, Any], int]:
    """The finalizer alone; damaged results are requeued and reported, not redone."""
    from crawlproc.processors.base import load

    check_out_entries(out)
    _open_readonly(out).close()
    with OutLock(out):
        ledger = Ledger(out / LEDGER_NAME)
        try:
            meta = ledger.meta()
            processor = load(meta["processor"])
            remove_temp_files(out)
            merged = merge_results(ledger, out, output or default_output(out, fmt), fmt=fmt,
                                   reducer=processor.reduce)
            remove_unreferenced(out, set(merged.batches))
            identity = {k: meta.get(k) for k in ("processor", "processor_version")}
            identity["params"] = json.loads(meta.get("params", "{}"))
            summary = write_summary(out, ledger, processor, identity, merged, {"merged_at": time.time()})
            return summary, merged.damaged
        finally:
            ledger.close()
