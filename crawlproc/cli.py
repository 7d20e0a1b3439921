"""The `crawlproc` command: parse, call the library, print, pick the exit code.

Nothing else in crawlproc prints. Every error a user can cause becomes one
line on stderr and the exit code of SPEC.md (2 usage, 3 OUT locked, 130
interrupted), never a traceback. Heavy modules are imported inside the
commands, so `crawlproc --help` starts fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from crawlproc import __version__
from crawlproc.errors import CrawlprocError

DEFAULT_OUT = "crawlproc-out"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class CrawlprocGroup(click.Group):
    """A click group whose errors are one line each, with SPEC.md's exit codes."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx else "crawlproc"
            _fail(f"{where}: {exc.format_message()} (see {where} --help)", 2)
        except click.ClickException as exc:
            _fail(f"crawlproc: {exc.format_message()}", exc.exit_code)
        except click.Abort:
            _fail("crawlproc: interrupted", 130)
        except CrawlprocError as exc:
            _fail(f"crawlproc: {exc}", exc.exit_code)
        except KeyboardInterrupt:
            _fail("crawlproc: interrupted; run the same command again to resume", 130)
        except sqlite3.DatabaseError as exc:
            if "full" in str(exc):
                _fail(f"crawlproc: OUT's disk is full ({exc}); free some space and run again to resume", 1)
            _fail(f"crawlproc: the ledger cannot be used ({exc}); is OUT/ledger.db damaged?", 2)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            hint = "; free some space and run again to resume" if exc.errno == errno.ENOSPC else ""
            _fail(f"crawlproc: {exc.strerror or exc}{where}{hint}", 1)
        except Exception as exc:
            if os.environ.get("CRAWLPROC_DEBUG"):
                raise
            _fail(f"crawlproc: internal error: {exc!r} (set CRAWLPROC_DEBUG=1 for the traceback; "
                  "the run can be resumed)", 1)
        sys.exit(code or 0)


def _fail(message: str, code: int) -> None:
    click.echo(message, err=True)
    sys.exit(code)


# -- option parsing -------------------------------------------------------------

def parse_size(text: str) -> int:
    """'64MB', '512M', '1GiB', '4096' -> bytes (powers of 1024)."""
    match = _SIZE.match(text)
    if not match:
        raise click.BadParameter(f"{text!r} is not a size like 512MB or 1GiB")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    return None if value in (None, "", "off") else parse_size(value)


def _params_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        params[key] = value
    return params


def _failures_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, bool] | None:
    if value in (None, ""):
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", value)
    if not match:
        raise click.BadParameter(f"{value!r} is not N or N%")
    return float(match.group(1)), bool(match.group(2))


def _env(name: str) -> str:
    return f"CRAWLPROC_{name.upper()}"


def _check_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise click.BadParameter("parquet output needs pyarrow: pip install 'crawlproc[parquet]'") from None
    return value


def format_option(func: Any) -> Any:
    return click.option("--format", "output_format", type=click.Choice(["jsonl", "csv", "parquet"]),
                        default="jsonl", show_default=True, envvar=_env("format"), callback=_check_format,
                        help="Merged output format (OUT/merged.<format> unless --output).")(func)


def out_option(func: Any) -> Any:
    return click.option("-o", "--out", type=click.Path(path_type=Path), default=DEFAULT_OUT,
                        envvar=_env("out"), show_default=True,
                        help="Where the ledger, results, merged output and logs live.")(func)


def processing_options(func: Any) -> Any:
    """The options `run` (and later `watch`) share; each also reads CRAWLPROC_<NAME>."""
    options = [
        click.option("-p", "--processor", default="linecount", envvar=_env("processor"), show_default=True,
                     help="Built-in name, package.module:function, or path/to/file.py:function."),
        click.option("--param", "params", multiple=True, callback=_params_option, metavar="KEY=VALUE",
                     envvar=_env("param"), help="Given to the processor as task.params; repeatable."),
        click.option("--cmd", metavar="'PROG ARGS {}'", envvar=_env("cmd"),
                     help="Run an external command per file instead of -p ({} = the file's absolute path; "
                          "split with shlex, never a shell)."),
        out_option,
        click.option("-w", "--workers", type=click.IntRange(1), default=os.cpu_count() or 1,
                     envvar=_env("workers"), show_default="CPU count", help="Worker processes."),
        click.option("--include", multiple=True, envvar=_env("include"), metavar="GLOB",
                     help="Only files matching GLOB (on the path relative to DATA_DIR); repeatable."),
        click.option("--exclude", multiple=True, envvar=_env("exclude"), metavar="GLOB",
                     help="Skip files and folders matching GLOB; repeatable."),
        click.option("--max-tasks-per-child", type=click.IntRange(1), default=1000, show_default=True,
                     envvar=_env("max_tasks_per_child"), help="Recycle a worker after N tasks."),
        click.option("--max-memory-per-child", "max_memory", callback=_size_option, metavar="SIZE",
                     envvar=_env("max_memory_per_child"), help="Recycle a worker whose RSS passed SIZE (e.g. 512MB)."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True), envvar=_env("timeout"),
                     help="Kill a task's worker after SECONDS; counts as a failed attempt."),
        click.option("--retries", type=click.IntRange(0), default=2, show_default=True, envvar=_env("retries"),
                     help="Extra attempts for a failing task, with exponential backoff and jitter."),
        click.option("--retry-delay", type=click.FloatRange(0), default=0.5, show_default=True,
                     envvar=_env("retry_delay"), help="Base delay in seconds before the first retry; doubles each time."),
        click.option("--max-failures", callback=_failures_option, metavar="N|N%", envvar=_env("max_failures"),
                     help="Stop early (exit 1) once more tasks than this have failed."),
        click.option("--durable", is_flag=True, envvar=_env("durable"),
                     help="fsync each result file and its folder before its tasks are marked done."),
        click.option("--retry-failed", is_flag=True, envvar=_env("retry_failed"),
                     help="Put failed tasks back to pending before running."),
        click.option("--reprocess", is_flag=True, envvar=_env("reprocess"),
                     help="Accept another processor/version/params on an existing OUT and redo every task."),
        click.option("--dry-run", is_flag=True, envvar=_env("dry_run"),
                     help="Say how many files would be new, changed, retried and gone (with -v, which), "
                          "then exit 0; process nothing, write nothing in OUT (watch: what its catch-up "
                          "would do). Retried: unchanged files a run would process again: pending tasks "
                          "(an interrupted run's, or after failed attempts), running ones a stopped run "
                          "left, failed ones with --retry-failed, all with --reprocess."),
        click.option("--batch-size", type=click.IntRange(1), envvar=_env("batch_size"),
                     help="Most tasks in one claimed batch and result file [default: adaptive, up to 512]."),
        click.option("--chunk-size", callback=_size_option, metavar="SIZE", envvar=_env("chunk_size"),
                     help="Split files larger than SIZE (e.g. 64MB) into line-aligned byte ranges, one task each."),
        click.option("--follow-symlinks", is_flag=True, envvar=_env("follow_symlinks"),
                     help="Follow symlinks (never outside DATA_DIR; loops are detected)."),
        click.option("--output", type=click.Path(path_type=Path, dir_okay=False), envvar=_env("output"),
                     help="Merged output file [default: OUT/merged.jsonl]."),
        format_option,
        click.option("--no-merge", is_flag=True, envvar=_env("no_merge"), help="Skip the finalizer."),
        click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
                     envvar=_env("executor"), help="Where tasks run."),
        click.option("--scheduler", metavar="ADDR", envvar=_env("scheduler"), help="Dask scheduler address."),
        click.option("-v", "--verbose", count=True, help="More log lines (debug)."),
        click.option("-q", "--quiet", is_flag=True, envvar=_env("quiet"), help="Only warnings and errors."),
        click.option("--log-json", is_flag=True, envvar=_env("log_json"), help="Log lines on stderr as JSON."),
        click.option("--no-progress", is_flag=True, envvar=_env("no_progress"), help="No progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# -- commands ---------------------------------------------------------------------

@click.group(cls=CrawlprocGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crawlproc")
def cli() -> None:
    """Run one processor over every file of a folder tree, on all cores, resumably.

    A SQLite ledger in OUT records every file as a task; rerunning the same
    command after a crash or Ctrl-C carries on where it stopped.
    """


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@processing_options
@click.pass_context
def run(ctx: click.Context, data_dir: Path, **kw: Any) -> None:
    """Scan DATA_DIR, process every pending file, merge the results, exit."""
    from crawlproc.run import run_job

    if kw["dry_run"]:
        ctx.exit(_dry_run(data_dir, kw, watching=False))
    outcome = _with_progress(kw, lambda options, reporter: run_job(options, on_progress=reporter), data_dir)
    ctx.exit(outcome.exit_code)


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@processing_options
@click.option("--settle", type=click.FloatRange(0), default=2.0, show_default=True, envvar=_env("settle"),
              help="Seconds a file must stay unchanged when no close-after-write event is seen.")
@click.option("--rescan-interval", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              envvar=_env("rescan_interval"), help="Seconds between full rescans (events can be lost).")
@click.option("--merge-interval", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              envvar=_env("merge_interval"), help="Seconds between refreshes of the merged output.")
@click.pass_context
def watch(ctx: click.Context, data_dir: Path, settle: float, rescan_interval: float, merge_interval: float,
          **kw: Any) -> None:
    """Catch up like `run`, then process new and changed files as they arrive, until Ctrl-C."""
    from crawlproc.run import watch_job

    if kw["dry_run"]:
        ctx.exit(_dry_run(data_dir, kw, watching=True))
    outcome = _with_progress(kw, lambda options, reporter: watch_job(
        options, settle=settle, rescan_interval=rescan_interval, merge_interval=merge_interval,
        on_progress=reporter), data_dir, watching=True)
    ctx.exit(outcome.exit_code)


def _with_progress(kw: dict[str, Any], job: Callable[[Any, Any], Any], data_dir: Path, *,
                   watching: bool = False) -> Any:
    """Set up logging and progress, build RunOptions from the shared options, run `job`."""
    from crawlproc import logs
    from crawlproc.progress import ProgressReporter

    if kw["executor"] != "local":
        raise click.UsageError("--executor dask is not available in this version; use local")
    logs.setup_stderr(kw["verbose"], kw["quiet"], kw["log_json"])
    reporter = ProgressReporter(bar=not kw["no_progress"] and not kw["quiet"] and sys.stderr.isatty(),
                                watching=watching)
    try:
        outcome = job(_run_options(data_dir, kw), reporter)
    finally:
        reporter.close()
    if not kw["quiet"]:
        _print_run_summary(outcome)
    return outcome


def _dry_run(data_dir: Path, kw: dict[str, Any], *, watching: bool) -> int:
    """--dry-run: what would change, with -v file by file, on stdout; exit code 0."""
    from crawlproc import logs
    from crawlproc.dryrun import dry_run

    logs.setup_stderr(kw["verbose"], kw["quiet"], kw["log_json"])
    result = dry_run(_run_options(data_dir, kw), watching=watching, with_paths=kw["verbose"] > 0)
    for change, paths in result.paths.items():
        for path in paths:
            click.echo(f"{change:<9} {path}")
    for line in _dry_run_lines(result):
        click.echo(line)
    return 0


def _dry_run_lines(result: Any) -> list[str]:
    from crawlproc.walk import describe_skipped

    n = result.counts
    lines = [f"dry run, nothing done: would process {n['new']} new, {n['changed']} changed and {n['retried']} "
             f"retried files; {n['gone']} gone and {n['excluded']} no longer selected by --include/--exclude "
             "would leave the output"]
    skipped = describe_skipped(result.skipped)
    if skipped:
        lines.append(f"skipped {skipped}")
    lines += [f"not scanned: {p['relpath']} ({p['error']}): what it holds would be missing from the output"
              for p in result.scan_problems]
    return lines


def _paths(n: int) -> str:
    return f"{n} path" if n == 1 else f"{n} paths"


def _processor_and_params(kw: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """-p and --param, or --cmd: the command line becomes the `cmd` processor's param."""
    if kw["cmd"] is None:
        return kw["processor"], kw["params"]
    from crawlproc.processors.command import check_template

    source = click.get_current_context().get_parameter_source("processor")
    if source not in (None, click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--cmd and -p/--processor exclude each other")
    if "cmd" in kw["params"]:
        raise click.UsageError("give the command with --cmd, not --param cmd=...")
    check_template(kw["cmd"])
    return "cmd", {**kw["params"], "cmd": kw["cmd"]}


def _run_options(data_dir: Path, kw: dict[str, Any]) -> Any:
    from crawlproc.run import RunOptions

    processor, params = _processor_and_params(kw)
    return RunOptions(
        data_dir=data_dir, out=kw["out"], processor=processor, params=params,
        workers=kw["workers"], include=kw["include"], exclude=kw["exclude"],
        max_tasks_per_child=kw["max_tasks_per_child"], max_memory=kw["max_memory"], timeout=kw["timeout"],
        retries=kw["retries"], retry_delay=kw["retry_delay"], max_failures=kw["max_failures"],
        durable=kw["durable"], retry_failed=kw["retry_failed"], reprocess=kw["reprocess"],
        batch_size=kw["batch_size"], follow_symlinks=kw["follow_symlinks"], chunk_size=kw["chunk_size"],
        output=kw["output"], output_format=kw["output_format"],
        merge=not kw["no_merge"],
    )


def _print_run_summary(outcome: Any) -> None:
    summary = outcome.summary or {}
    counts = summary.get("counts", {})
    timings = summary.get("timings", {})
    line = (f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, {counts.get('gone', 0)} gone "
            f"of {summary.get('total', 0)} tasks; {timings.get('tasks_done_this_run', 0)} processed this run "
            f"in {timings.get('elapsed_s', 0):.2f}s")
    click.echo(line, err=True)
    if summary.get("merged_output"):
        click.echo(f"merged output: {summary['merged_output']}", err=True)
    click.echo(f"summary: {Path(summary.get('out', '.')) / 'summary.json'}", err=True)
    problems = summary.get("scan_problems") or []
    if problems:
        click.echo(f"not scanned: {_paths(len(problems))} (what they hold is missing from the output): "
                   f"see crawlproc failures -o {shlex.quote(summary['out'])}", err=True)
    if outcome.exit_code == 130:
        click.echo("interrupted: run the same command again to resume", err=True)
    elif counts.get("failed"):
        click.echo("some tasks failed: see `crawlproc failures`; `crawlproc retry --failed` to try again", err=True)


@cli.command()
@out_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(out: Path, as_json: bool) -> None:
    """Counts by state, throughput, failures and the last run of OUT."""
    from crawlproc.report import status_data, status_table

    data = status_data(out)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _print_rich(status_table(data))


@cli.command()
@out_option
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
def failures(out: Path, as_json: bool) -> None:
    """Failed tasks of OUT with their last error."""
    from crawlproc.report import failures_data, failures_table

    rows = failures_data(out)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        _print_rich(failures_table(rows))


@cli.command()
@out_option
@click.option("--failed", "which", flag_value="failed", default=True, help="Failed tasks (the default).")
@click.option("--all", "which", flag_value="all", help="Failed and done tasks: redo everything.")
@click.argument("paths", nargs=-1)
def retry(out: Path, which: str, paths: tuple[str, ...]) -> None:
    """Put tasks back to pending (failed ones, or all; optionally only PATHs)."""
    from crawlproc.report import retry_tasks

    count = retry_tasks(out, include_done=which == "all", relpaths=paths)
    click.echo(f"{count} tasks back to pending; `crawlproc run DATA_DIR -o {out}` processes them", err=True)


@cli.command()
@out_option
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), help="Merged output file.")
@format_option
def merge(out: Path, output: Path | None, output_format: str) -> None:
    """Run the finalizer alone: merged output and summary.json from the done results."""
    from crawlproc.report import merge_only

    summary, damaged = merge_only(out, output, output_format)
    click.echo(f"merged {summary['counts']['done']} done tasks into {summary['merged_output']}", err=True)
    if damaged:
        click.echo(f"{damaged} tasks had a missing or damaged result and went back to pending; "
                   "run `crawlproc run` to redo them", err=True)


@cli.command()
def processors() -> None:
    """List the built-in processors."""
    from crawlproc.processors import describe_builtins

    for name, version, line in describe_builtins():
        click.echo(f"{name:<12} v{version:<4} {line}")


def _print_rich(renderable: Any) -> None:
    from rich.console import Console

    Console().print(renderable)


def main() -> None:
    """The console script (and `python -m crawlproc`)."""
    try:
        cli(prog_name="crawlproc")
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    _leave(code)


def _leave(code: Any) -> None:
    """Exit with `code` as soon as what must happen on the way out has happened.

    The interpreter's own teardown (every module and object freed one by one)
    costs tens of milliseconds, a tenth of a no-op rerun, and does nothing a
    finished command needs: the ledger is closed by then. So the log sinks
    are closed, atexit handlers run and stdout/stderr are flushed here, and
    the process ends at once. With another thread still running, a profiler
    or tracer watching (cProfile, coverage: they write their data after us),
    or an exit code Python would print, the usual exit does it all instead.
    """
    import atexit

    threading = sys.modules.get("threading")
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere, the usual exit
    if (not isinstance(code, int) and code is not None or (threading and threading.active_count() > 1)
            or sys.getprofile() is not None or sys.gettrace() is not None or run_exit_handlers is None):
        sys.exit(code)
    if "loguru" in sys.modules:
        from loguru import logger

        logger.remove()  # closes the log file, flushing its last lines
    from crawlproc.children import flush_std_streams

    run_exit_handlers()
    flush_std_streams()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
