"""The small commands around a run: status, failures, retry, merge; and the hints they print.

They read the ledger while a run may be going (WAL readers never block the
writer); `retry` and `merge` write, so they take OUT's lock like a run does.
Functions here return data or rich renderables; the CLI prints them.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import LedgerError, UsageError
from crawlproc.finalize import default_output, merge_results, write_summary
from crawlproc.given_paths import DATA_DIR_ITSELF, relpath_under
from crawlproc.ledger import RUN_OPTIONS_KEY, SCAN_SETTINGS_KEY, Ledger
from crawlproc.lock import OutLock, running_pid
from crawlproc.processors.shipping import is_shipped_spec
from crawlproc.results import remove_temp_files, remove_unreferenced
from crawlproc.run import LEDGER_NAME, check_out_entries, check_output_is_not_input
from crawlproc.task import relpath_for_people
from crawlproc.words import plural

ERROR_WIDTH = 100
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# The last run's state in `status`: its coordinator holds OUT's lock, or it closed its
# row, or neither (killed, or the machine went down).
GOING, FINISHED, ENDED_ABRUPTLY = "going", "finished", "ended abruptly"


def _open_readonly(out: Path) -> Ledger:
    """OUT's ledger for reading; a lost one beside result files is a hint to rebuild it, not a guess."""
    if not out.exists():
        raise UsageError(f"OUT {out} does not exist")
    if not out.is_dir():
        raise UsageError(f"OUT {out} exists and is not a folder")
    try:
        return Ledger(out / LEDGER_NAME, readonly=True)
    except LedgerError:
        from crawlproc.rebuild import lost_ledger_hint

        hint = lost_ledger_hint(out)
        if hint is None:
            raise
        raise LedgerError(hint) from None


def read_ledger(out: Path) -> Ledger:
    """OUT's ledger, read-only, for a reader that is not a command (the Python API, `explain`)."""
    return _open_readonly(out)


def run_command(out: Path, meta: Mapping[str, str], last_run: Mapping[str, Any] | None = None) -> str | None:
    """The command line that carries on with OUT, shell-quoted: a hint to print.

    It is the last run's command (`crawlproc watch` after a watch, else `crawlproc run`,
    given its row of the runs table), with what OUT's identity holds (DATA_DIR, the
    processor or --cmd, params, chunk size, source column), so it is accepted as printed,
    the last run's choice of files (--include, --exclude, --follow-symlinks: without them
    it would take in what that run left out), how it ran (-w, --timeout, --format, a
    watch's --settle... as options.CARRIED says), and the cluster it ran on. None while
    OUT has no identity yet.
    """
    from crawlproc.processors.command import OK_EXIT_CODES

    if "data_dir" not in meta or is_shipped_spec(meta.get("processor")):
        return None  # no command line can load a processor sent from Python by value
    command = "watch" if last_run and last_run["command"] == "watch" else "run"
    executor = _info_of(last_run).get("executor")
    args = ["crawlproc", command, meta["data_dir"], "-o", str(out)]
    params = dict(json.loads(meta.get("params") or "{}"))
    processor = meta.get("processor", "linecount")
    if processor == "cmd" and "cmd" in params:
        args += ["--cmd", params.pop("cmd")]
        if OK_EXIT_CODES in params:  # refused as a --param
            args += ["--ok-exit-codes", params.pop(OK_EXIT_CODES)]
    elif processor != "linecount":
        args += ["-p", processor]
    for key, value in params.items():
        args += ["--param", f"{key}={value}"]
    if chunk_size := json.loads(meta.get("chunk_size") or "null"):
        args += ["--chunk-size", str(chunk_size)]
    if columns := json.loads(meta.get("added_columns") or "null"):
        args += ["--source-column", columns["source"]]
    args += json.loads(meta.get(RUN_OPTIONS_KEY) or "[]")
    settings = json.loads(meta.get(SCAN_SETTINGS_KEY) or "{}")
    for flag in ("include", "exclude"):
        for pattern in settings.get(flag, ()):
            args += [f"--{flag}", pattern]
    if settings.get("follow_symlinks"):
        args.append("--follow-symlinks")
    if executor and executor.get("executor") == "dask":  # a job on a cluster carries on there
        args += ["--executor", "dask"]
        if executor.get("scheduler_option"):  # else Dask's own setting, which still holds
            args += ["--scheduler", executor["scheduler_option"]]
    return shlex.join(args)


def _info_of(run: Mapping[str, Any] | None) -> dict[str, Any]:
    """A `runs` row's info: its watcher, its cluster, its waiting tasks ({} for none)."""
    return json.loads(run["info"]) if run and run["info"] else {}


def _last_run_and_holder(ledger: Ledger, out: Path) -> tuple[dict[str, Any] | None, int | None]:
    """The last run's row, and the pid holding OUT's lock (None: no run is going).

    A live coordinator closes its row before it lets go of the lock. So when the
    lock is free and the row is still open, it is read again: still open, that
    run died; closed, it finished in between.
    """
    last = ledger.last_run()
    pid = running_pid(out)
    if pid is None and last is not None and last["finished"] is None:
        again = ledger.last_run()
        if again["id"] != last["id"]:  # a new run started after the lock was tested
            pid = running_pid(out)
        last = again
    return last, pid


def _run_state(last: Mapping[str, Any], pid: int | None) -> str:
    if last["finished"] is not None:
        return FINISHED
    return GOING if pid is not None else ENDED_ABRUPTLY


def status_data(out: Path) -> dict[str, Any]:
    """What `crawlproc status --json` prints."""
    ledger = _open_readonly(out)
    try:
        return status_from(ledger, out, ledger.counts_for_people())
    finally:
        ledger.close()


def status_from(ledger: Ledger, out: Path, counts: dict[str, int]) -> dict[str, Any]:
    """status_data, from OUT's ledger open already and its counts (the status page reads
    them in a pass that also tells it more: Ledger.counts_for_the_page)."""
    meta = ledger.meta()
    last, pid = _last_run_and_holder(ledger, out)
    problems = ledger.scan_problems()
    data: dict[str, Any] = {
        "out": str(out), "counts": counts, "total": sum(counts.values()), "scan_problems": problems,
        "data_dir": meta.get("data_dir"), "processor": meta.get("processor"),
        "processor_version": meta.get("processor_version"),
        "running_pid": pid, "last_run": None, "throughput_files_per_s": None,
        "requeued_at_next_start": 0, "run_command": None,
    }
    info = _info_of(last)
    data["run_command"] = run_command(out, meta, last)
    if last:
        end = last["finished"] or last["updated"] or time.time()
        elapsed = max(end - last["started"], 1e-9)
        data["last_run"] = {k: last[k] for k in ("id", "command", "pid", "started", "updated", "finished",
                                                  "exit_code", "done", "failed")}
        data["last_run"]["watch"] = info if "watching_since" in info else None
        data["last_run"]["executor"] = info.get("executor")
        data["last_run"]["state"] = _run_state(last, pid)
        if data["last_run"]["state"] == ENDED_ABRUPTLY:  # its running tasks wait for the next start
            data["requeued_at_next_start"] = counts["running"]
        elif data["last_run"]["state"] == GOING:
            data["counts"] = _with_waiting_as_pending(counts, info.get("waiting", 0))
        data["throughput_files_per_s"] = round(last["done"] / elapsed, 1)
    return data


def _with_waiting_as_pending(counts: dict[str, int], waiting: int) -> dict[str, int]:
    """A going run's first scan records new tasks as running (claimed in the same write, see
    Ledger.reconcile) long before a worker has them: for people they are pending. Its last
    heartbeat (at most a second old) says how many there are."""
    moved = min(waiting, counts["running"])
    return {**counts, "pending": counts["pending"] + moved, "running": counts["running"] - moved}


def status_table(data: dict[str, Any]) -> Any:
    """The counts table and short lines (each fits 80 columns but for paths and commands)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True)
    table.add_column("state")
    table.add_column("tasks", justify="right")
    for state, n in data["counts"].items():
        table.add_row(state, str(n))
    table.add_row("total", str(data["total"]), style="bold")
    lines = [f"OUT: {data['out']}", table,
             f"processor: {data['processor']} (version {data['processor_version']})",
             f"data dir: {data['data_dir']}"]
    if data["scan_problems"]:
        lines += _scan_problems_lines(data["scan_problems"], data["out"])
    run = data["last_run"]
    if run:
        lines += _last_run_lines(run, data)
    if data["running_pid"] and (not run or run["state"] != GOING):
        lines.append(f"crawlproc pid {data['running_pid']} holds OUT now")
    # Text, not markup: a path may hold [brackets]. Print it with soft_wrap, so that a long
    # path or command is wrapped by the terminal and stays one line to copy.
    return Group(*(Text(line) if isinstance(line, str) else line for line in lines))


def _scan_problems_lines(problems: list[dict[str, Any]], out: str) -> list[str]:
    """Paths no scan could read: what they hold is missing from the output."""
    first = problems[0]
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    return [f"not scanned: {first['relpath']} ({first['error']}){more}",
            f"  see: crawlproc failures -o {shlex.quote(out)}"]


def _last_run_lines(run: dict[str, Any], data: dict[str, Any]) -> list[str]:
    lines = [f"last {run['command']}: started {_when(run['started'])}",
             f"  {run['done']} done, {run['failed']} failed; {data['throughput_files_per_s']} files/s"]
    if run["executor"]:
        lines.append(_executor_line(run["executor"]))
    if run["state"] == FINISHED:
        lines.append(f"  finished {_when(run['finished'])} with exit code {run['exit_code']}")
    elif run["state"] == GOING:
        lines.append(f"  still going (pid {data['running_pid']})")
        if run["watch"]:
            lines += _watch_lines(run["watch"])
    else:
        lines.append(f"  ended abruptly: pid {run['pid']} last seen alive {_when(run['updated'])}")
        stale = data["requeued_at_next_start"]
        if stale:
            tasks_go = "task left running goes" if stale == 1 else "tasks left running go"
            lines.append(f"  {stale} {tasks_go} back to pending when the next run starts:")
            if data["run_command"]:
                lines.append(f"  {data['run_command']}")
    return lines


def _executor_line(executor: dict[str, Any]) -> str:
    """Where the batches run, for a run that is not local (a Dask cluster)."""
    submitted = f", {plural(executor['dask_tasks'], 'Dask task')} submitted" if executor.get("dask_tasks") else ""
    return (f"  on {executor['executor']} at {executor.get('scheduler')}: {plural(executor.get('workers', 0), 'worker')}, "
            f"{plural(executor.get('threads', 0), 'thread')}{submitted}")


def _when(timestamp: float | None) -> str:
    return "at an unknown time" if timestamp is None else time.strftime(TIME_FORMAT, time.localtime(timestamp))


def _watch_lines(info: dict[str, Any]) -> list[str]:
    last = "none yet" if not info["last_event"] else f"{time.time() - info['last_event']:.0f}s ago"
    return [f"  watching since {_when(info['watching_since'])}; queue depth {info['queue_depth']}",
            f"  last event {last}; {plural(info['events'], 'event')}, {plural(info['rescans'], 'scan')}"]


def failures_data(out: Path) -> list[dict[str, Any]]:
    ledger = _open_readonly(out)
    try:
        return ledger.failures()
    finally:
        ledger.close()


def failures_table(rows: list[dict[str, Any]]) -> Any:
    if not rows:
        return "no failed tasks"
    from rich.table import Table
    from rich.text import Text

    from crawlproc.logs import printable

    unscanned = sum(1 for row in rows if row["kind"] == "scan")
    title = plural(len(rows) - unscanned, "failed task") + (
        f", {plural(unscanned, 'path')} not scanned" if unscanned else "")
    table = Table(title=title)
    for column in ("relpath", "offset", "attempts", "error"):
        table.add_column(column)
    for row in rows:
        error = (row["error"] or "").splitlines()[0] if row["error"] else ""
        offset = "-" if row["offset"] is None else str(row["offset"])
        # Text, not markup: a name or an error may hold [brackets] (page[1].html, "[/meta]" is a
        # closing tag to rich: an internal error), or a terminal's control characters.
        table.add_row(Text(printable(row["relpath"])), offset, str(row["attempts"]),
                      Text(printable(error[:ERROR_WIDTH])))
    return table


class RetryOutcome(NamedTuple):
    count: int  # tasks put back to pending
    run_command: str | None  # the command that processes them (see run_command)


def retry_tasks(out: Path, *, include_done: bool, relpaths: tuple[str, ...]) -> RetryOutcome:
    """Put failed (or failed and done) tasks back to pending; every named path must have a task.

    A path is read as `explain` reads it (given_paths.relpath_under): as `failures` prints it,
    relative to the current folder inside DATA_DIR, or absolute.
    """
    check_out_entries(out)
    _open_readonly(out).close()  # a clear message when OUT has no ledger
    with OutLock(out, advice="retry changes what a run works on: stop that one first (a watch processes "
                             "a file again by itself once the file changes)"):
        ledger = Ledger(out / LEDGER_NAME)
        try:
            meta = ledger.meta()
            names = _task_paths(relpaths, meta.get("data_dir"), out, ledger)
            if unknown := ledger.unknown_relpaths(name for name in names if isinstance(name, str)):
                raise UsageError(
                    f"OUT {out} has no task for {', '.join(map(shlex.quote, unknown))} (paths are relative "
                    f"to {meta.get('data_dir')}, as `crawlproc failures -o {shlex.quote(str(out))}` shows them); "
                    "nothing was put back to pending")
            return RetryOutcome(ledger.retry(include_done=include_done, relpaths=names),
                                run_command(out, meta, ledger.last_run()))
        finally:
            ledger.close()


def _task_paths(paths: tuple[str, ...], data_dir: str | None, out: Path, ledger: Ledger) -> list[bytes | str]:
    """Paths named on the command line: a file's bytes when the ledger has a task of that very
    file, else the name as people read it (`failures` shows a non-UTF-8 byte as \\xNN; typed so,
    it names that file, unless a file is really named with that backslash: that one wins)."""
    if not data_dir:  # no run yet: no task has any path
        return list(paths)
    found: list[bytes | str] = []
    for path in paths:
        relpath = _file_relpath(path, data_dir, out, ledger)
        found.append(relpath if ledger.has_task(relpath) else relpath_for_people(relpath))
    return found


def _file_relpath(path: str, data_dir: str, out: Path, ledger: Ledger) -> bytes:
    relpath = relpath_under(path, data_dir, out, has_task=lambda name: ledger.file_named(name) is not None)
    if relpath == DATA_DIR_ITSELF:
        raise UsageError(f"{path} is DATA_DIR {data_dir} itself: name files inside it, or give no path to "
                         "retry every task; nothing was put back to pending")
    return relpath


class MergeReport(NamedTuple):
    summary: dict[str, Any]
    damaged: int  # done tasks whose result was missing or damaged: back to pending now
    run_command: str | None  # the command that processes what the output lacks (see run_command)

    @property
    def unprocessed(self) -> int:
        """Tasks whose records the output lacks until a run processes them."""
        return self.summary["counts"]["pending"] + self.summary["counts"]["running"]


def merge_only(out: Path, output: Path | None, fmt: str = "jsonl") -> MergeReport:
    """The finalizer alone; damaged results are requeued and reported, not redone."""
    check_out_entries(out)
    _open_readonly(out).close()
    with OutLock(out):
        ledger = Ledger(out / LEDGER_NAME)
        try:
            meta = ledger.meta()
            if meta.get("data_dir"):
                check_output_is_not_input(Path(meta["data_dir"]), out, output)
            processor = _merging_processor(meta["processor"])
            remove_temp_files(out)
            merged = merge_results(ledger, out, output or default_output(out, fmt), fmt=fmt,
                                   reducer=processor.reduce, reducer_checked=False)
            remove_unreferenced(out, set(merged.batches))
            identity = {k: meta.get(k) for k in ("processor", "processor_version")}
            identity["params"] = json.loads(meta.get("params", "{}"))
            summary = write_summary(out, ledger, processor, identity, merged, {"merged_at": time.time()})
            return MergeReport(summary, merged.damaged, run_command(out, meta, ledger.last_run()))
        finally:
            ledger.close()


def _merging_processor(spec: str) -> Any:
    """The processor whose reducer the merge runs. One sent from Python by value (a notebook's)
    cannot be loaded here: the merge then goes without its reducer (no `reduced` in summary.json)."""
    from crawlproc.processors.base import Processor, load

    if is_shipped_spec(spec):
        return Processor(lambda task: None, "")
    return load(spec)
