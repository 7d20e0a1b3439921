"""The `crawlproc` command: parse, call the library, print, pick the exit code.

Nothing else in crawlproc prints. Every error a user can cause becomes one
line on stderr and the exit code of SPEC.md (2 usage, 3 OUT locked, 130
interrupted), never a traceback. Every hint printed is a command that can be
copied and run as printed (real paths, shell-quoted). With `--output -`, stdout
carries the merged records and nothing else. Heavy modules are imported inside
the commands, so `crawlproc --help` starts fast.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from crawlproc import __version__
from crawlproc.errors import CrawlprocError
from crawlproc.words import plural

DEFAULT_OUT = "crawlproc-out"
STDOUT = "-"  # --output -: the merged records to stdout
OUT_KEY = "crawlproc.out"  # where the command's OUT is kept in click's shared ctx.meta
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
            _fail(f"{where}: {_usage_message(exc)} (see {where} --help)", 2)
        except click.ClickException as exc:
            _fail(f"crawlproc: {exc.format_message()}", exc.exit_code)
        except click.Abort:
            _fail("crawlproc: interrupted", 130)
        except CrawlprocError as exc:
            command_line = sys.argv[1:] if args is None else list(args)
            _fail(f"crawlproc: {_with_commands(exc, command_line)}", exc.exit_code)
        except KeyboardInterrupt:
            _fail("crawlproc: interrupted; run the same command again to resume", 130)
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

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except sqlite3.DatabaseError as exc:  # here the command's OUT is known
            raise _ledger_failure(exc, ctx.meta.get(OUT_KEY)) from None

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        for param in cmd.params:  # --help names each option's CRAWLPROC_* variable
            if isinstance(param, click.Option) and param.envvar:
                param.show_envvar = True
        super().add_command(cmd, name)


def _usage_message(exc: click.UsageError) -> str:
    """click's message; a bad value names the variable it came from, and only then (some click
    versions name an option's variable whatever the value's source)."""
    param = getattr(exc, "param", None)
    if isinstance(exc, click.BadParameter) and isinstance(param, click.Option) and param.name and exc.ctx:
        exc.param_hint = click.Parameter.get_error_hint(param, exc.ctx)
        if exc.ctx.get_parameter_source(param.name) == click.core.ParameterSource.ENVIRONMENT:
            exc.param_hint += f" from {param.envvar}"
    return exc.format_message()


def _ledger_failure(exc: sqlite3.DatabaseError, out: Path | None) -> click.ClickException:
    if "full" in str(exc):  # SQLITE_FULL: the ledger could not grow
        where = f"the disk holding OUT {shlex.quote(str(out))}" if out is not None else "OUT's disk"
        failure = click.ClickException(f"{where} is full ({exc}); free some space and run again to resume")
        failure.exit_code = 1
        return failure
    ledger = f" {shlex.quote(str(out / 'ledger.db'))}" if out is not None else ""
    failure = click.ClickException(f"the ledger{ledger} cannot be used ({exc}); it may be damaged")
    failure.exit_code = 2
    return failure


def _with_commands(exc: CrawlprocError, args: list[str]) -> str:
    """The error's message, with each of its ways out (if any) as the command to run: this one, changed."""
    ways_out = getattr(exc, "ways_out", ())
    if not ways_out:
        return str(exc)
    import shlex

    hints = []
    for way in ways_out:
        argv = [arg for arg in args if arg not in way.drop]
        # before a "--" that ends the options, or else at the end
        argv.insert(argv.index("--") if "--" in argv else len(argv), way.flag)
        hints.append(f"{way.purpose}: crawlproc {shlex.join(argv)}")
    return "; ".join([exc.args[0], *hints])


def _fail(message: str, code: int) -> None:
    logs = sys.modules.get("crawlproc.logs")  # set up by a run: its errors are JSON lines too
    if logs is not None and logs.json_lines():
        message = logs.json_line("ERROR", message, exit_code=code)
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


def _exit_codes_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    from crawlproc.processors.command import parse_exit_codes

    try:
        return parse_exit_codes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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


def _remember_out(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    ctx.meta[OUT_KEY] = value  # for messages about OUT's files (see CrawlprocGroup.invoke)
    return value


def out_option(func: Any) -> Any:
    return click.option("-o", "--out", type=click.Path(path_type=Path), default=DEFAULT_OUT,
                        envvar=_env("out"), show_default=True, callback=_remember_out,
                        help="Where the ledger, results, merged output and logs live.")(func)


def _output_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    return value if value in (None, STDOUT) else Path(value)


def _name_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise click.BadParameter("needs a column name")
    return value


def processing_options(func: Any) -> Any:
    """The options `run` (and later `watch`) share; each also reads CRAWLPROC_<NAME>."""
    options = [
        click.option("-p", "--processor", default="linecount", envvar=_env("processor"), show_default=True,
                     help="Built-in name, package.module:function, or path/to/file.py:function."),
        click.option("--param", "params", multiple=True, callback=_params_option, metavar="KEY=VALUE",
                     envvar=_env("param"), help="Given to the processor as task.params; repeatable."),
        click.option("--cmd", metavar="'PROG ARGS {}'", envvar=_env("cmd"),
                     help="Run an external command per file instead of -p; split with shlex, never a shell. "
                          "As in GNU parallel, {} is the file's absolute path, {/} its basename, {//} its folder, "
                          "{.} the path without its last extension, {/.} the basename without it. A placeholder "
                          "that is a whole argument is passed raw (to hand a path to a program that is not a "
                          "shell, give {} as an argument of its own); inside a larger argument, as in "
                          "sh -c 'wc -c < {}', it is shell-quoted. Without a placeholder the path is appended "
                          "as the last argument."),
        click.option("--ok-exit-codes", callback=_exit_codes_option, metavar="CODES", envvar=_env("ok_exit_codes"),
                     help="With --cmd: exit codes that count as done, e.g. 0,1 for grep -c "
                          "(the record keeps the code).  [default: 0]"),
        out_option,
        click.option("-w", "-j", "--workers", type=click.IntRange(1), default=os.cpu_count() or 1,
                     envvar=_env("workers"), show_default="CPU count", help="Worker processes."),
        click.option("--include", multiple=True, envvar=_env("include"), metavar="GLOB",
                     help="Only files matching GLOB (on the path relative to DATA_DIR); repeatable."),
        click.option("--exclude", multiple=True, envvar=_env("exclude"), metavar="GLOB",
                     help="Skip files and folders matching GLOB; repeatable."),
        click.option("--max-tasks-per-child", type=click.IntRange(1), default=1000, show_default=True,
                     envvar=_env("max_tasks_per_child"), help="Recycle a worker after N tasks."),
        click.option("--max-memory-per-child", "max_memory", callback=_size_option, metavar="SIZE",
                     envvar=_env("max_memory_per_child"), help="Recycle a worker whose RSS passed SIZE (e.g. 512MB)."),
        click.option("--max-memory-per-task", callback=_size_option, metavar="SIZE",
                     envvar=_env("max_memory_per_task"),
                     help="Kill a worker whose RSS passes SIZE while a task runs; that task alone is charged "
                          "an attempt."),
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
        click.option("--keep-results", is_flag=True, envvar=_env("keep_results"),
                     help="Accept edited processor code on an existing OUT: keep the done tasks' records, "
                          "process the rest with the new code (recorded in summary.json)."),
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
        click.option("--output", type=click.Path(dir_okay=False, allow_dash=True), envvar=_env("output"),
                     callback=_output_option, metavar="FILE|-",
                     help="Merged output file; - writes the records to stdout too (OUT/merged.<format> "
                          "is still written) [default: OUT/merged.jsonl]."),
        format_option,
        click.option("--source-column", metavar="NAME", envvar=_env("source_column"), callback=_name_option,
                     help="Put each record's relpath under NAME, first (with --chunk-size also its byte "
                          "offset, under NAME_offset); a record that has NAME keeps its own value."),
        click.option("--no-merge", is_flag=True, envvar=_env("no_merge"), help="Skip the finalizer."),
        click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
                     envvar=_env("executor"),
                     help="Where batches run: worker processes here, or a Dask distributed cluster "
                          "(pip install 'crawlproc[dask]')."),
        click.option("--scheduler", metavar="ADDR", envvar=_env("scheduler"),
                     help="With --executor dask: tcp://HOST:PORT of a running scheduler, or local[:N] for a "
                          "LocalCluster of N worker processes [default: Dask's scheduler-address setting]."),
        click.option("-v", "--verbose", count=True, envvar=_env("verbose"), help="More log lines (debug)."),
        click.option("-q", "--quiet", is_flag=True, envvar=_env("quiet"), help="Only warnings and errors."),
        click.option("--log-json", is_flag=True, envvar=_env("log_json"),
                     help="Each stderr line one flat JSON object (level, time, message, pid, task); the final "
                          "summary too."),
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
    to_stdout = _output_to_stdout(kw)
    with _stdout_kept_for_records(to_stdout):
        outcome = _with_progress(kw, lambda options, reporter: run_job(options, on_progress=reporter), data_dir,
                                 to_stdout=to_stdout)
    if to_stdout and outcome.exit_code in (0, 1):  # not when interrupted: the rerun writes them all
        _write_records((outcome.summary or {}).get("merged_output"))
    ctx.exit(outcome.exit_code)


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@processing_options
@click.option("--settle", type=click.FloatRange(0), default=2.0, show_default=True, envvar=_env("settle"),
              help="Seconds a file must stay unchanged when no close-after-write event is seen.")
@click.option("--rescan-interval", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True,
              envvar=_env("rescan_interval"), help="Seconds between full rescans (events can be lost).")
@click.option("--merge-interval", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True,
              envvar=_env("merge_interval"),
              help="Seconds between refreshes of the merged output (the first comes once the catch-up is done).")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=None, envvar=_env("poll"),
              metavar="SECONDS",
              help="Find changes by a scan every SECONDS, without file events (NFS, SMB, Lustre). "
                   "Watch also falls back to it, with a warning, when the kernel refuses more watches.")
@click.pass_context
def watch(ctx: click.Context, data_dir: Path, settle: float, rescan_interval: float, merge_interval: float,
          poll: float | None, **kw: Any) -> None:
    """Catch up like `run`, then process new and changed files as they arrive, until Ctrl-C.

    The merged output is published once the catch-up is processed, then every
    --merge-interval and at the stop. `--output -` is refused: read OUT/merged.<format>.
    """
    from crawlproc.run import watch_job

    if kw["dry_run"]:
        ctx.exit(_dry_run(data_dir, kw, watching=True))
    if kw["output"] == STDOUT:
        merged = shlex.quote(str(kw["out"] / f"merged.{kw['output_format']}"))
        raise click.BadParameter(f"watch refreshes its merged output every --merge-interval, so there is no "
                                 f"one moment to write it to stdout; read {merged}, or give --output FILE",
                                 param_hint="--output -")
    outcome = _with_progress(kw, lambda options, reporter: watch_job(
        options, settle=settle, rescan_interval=rescan_interval, merge_interval=merge_interval, poll=poll,
        on_progress=reporter), data_dir, watching=True)
    ctx.exit(outcome.exit_code)


def _with_progress(kw: dict[str, Any], job: Callable[[Any, Any], Any], data_dir: Path, *,
                   watching: bool = False, to_stdout: bool = False) -> Any:
    """Set up logging and progress, build RunOptions from the shared options, run `job`."""
    from crawlproc import logs
    from crawlproc.progress import ProgressReporter

    if kw["scheduler"] is not None and kw["executor"] != "dask":
        raise click.UsageError("--scheduler needs --executor dask")
    logs.setup_stderr(kw["verbose"], kw["quiet"], kw["log_json"])
    bar = not (kw["no_progress"] or kw["quiet"] or kw["log_json"]) and sys.stderr.isatty()
    reporter = ProgressReporter(bar=bar, watching=watching)
    try:
        outcome = job(_run_options(data_dir, kw), reporter)
    finally:
        reporter.close()
    if not kw["quiet"]:
        _print_run_summary(outcome, to_stdout=to_stdout)
    return outcome


def _output_to_stdout(kw: dict[str, Any]) -> bool:
    """--output -: the job publishes OUT/merged.<format> as usual (resume and no-op reruns rely
    on it), and the CLI copies it to stdout at the end."""
    if kw["output"] != STDOUT:
        return False
    if kw["no_merge"]:
        raise click.UsageError("--output - writes the merged records, and --no-merge skips the merge: "
                               "give one of them")
    kw["output"] = None
    return True


@contextmanager
def _stdout_kept_for_records(keep: bool) -> Iterator[None]:
    """With --output -, stdout carries the records and nothing else: while the job runs, what
    is written to descriptor 1 (by a processor in a worker, by any library) goes to stderr."""
    try:
        stdout_fd, stderr_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # not real files (click's CliRunner): nothing to keep apart
        keep = False
    if not keep:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(stdout_fd)
    os.dup2(stderr_fd, stdout_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, stdout_fd)
        os.close(saved)


def _write_records(merged_output: str | None) -> None:
    """Copy the published merged output to stdout; a reader that went away (`| head`) ends it quietly."""
    if merged_output is None:
        return
    import shutil

    with open(merged_output, "rb") as records:
        try:
            shutil.copyfileobj(records, sys.stdout.buffer, 1 << 20)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # Python would report the pipe again when it flushes stdout on the way out.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


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


def _processor_and_params(kw: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """-p and --param, or --cmd: the command line (and --ok-exit-codes, unless it is the
    default) become the `cmd` processor's params."""
    if kw["cmd"] is None:
        if kw["ok_exit_codes"] is not None:
            raise click.UsageError("--ok-exit-codes goes with --cmd, e.g. --cmd 'grep -c x {}' --ok-exit-codes 0,1")
        return kw["processor"], kw["params"]
    from crawlproc.processors.command import DEFAULT_OK_EXIT_CODES, OK_EXIT_CODES, format_exit_codes

    source = click.get_current_context().get_parameter_source("processor")
    if source not in (None, click.core.ParameterSource.DEFAULT):
        raise click.UsageError("--cmd and -p/--processor exclude each other")
    for name, what, option in (("cmd", "the command", "--cmd"), (OK_EXIT_CODES, "the exit codes", "--ok-exit-codes")):
        if name in kw["params"]:
            raise click.UsageError(f"give {what} with {option}, not --param {name}=...")
    params = {**kw["params"], "cmd": kw["cmd"]}
    if kw["ok_exit_codes"] not in (None, DEFAULT_OK_EXIT_CODES):
        params[OK_EXIT_CODES] = format_exit_codes(kw["ok_exit_codes"])
    return "cmd", params


def _run_options(data_dir: Path, kw: dict[str, Any]) -> Any:
    from crawlproc.run import RunOptions

    processor, params = _processor_and_params(kw)
    return RunOptions(
        data_dir=data_dir, out=kw["out"], processor=processor, params=params,
        workers=kw["workers"], include=kw["include"], exclude=kw["exclude"],
        max_tasks_per_child=kw["max_tasks_per_child"], max_memory=kw["max_memory"],
        max_memory_per_task=kw["max_memory_per_task"], timeout=kw["timeout"],
        retries=kw["retries"], retry_delay=kw["retry_delay"], max_failures=kw["max_failures"],
        durable=kw["durable"], retry_failed=kw["retry_failed"], reprocess=kw["reprocess"],
        keep_results=kw["keep_results"],
        batch_size=kw["batch_size"], follow_symlinks=kw["follow_symlinks"], chunk_size=kw["chunk_size"],
        output=kw["output"], output_format=kw["output_format"],
        merge=not kw["no_merge"], source_column=kw["source_column"], executor=kw["executor"],
        scheduler=kw["scheduler"],
    )


def _print_run_summary(outcome: Any, *, to_stdout: bool) -> None:
    """The end of a run on stderr: counts, where the output is, what to do next (--log-json: one object)."""
    from crawlproc import logs

    summary = outcome.summary or {}
    counts = summary.get("counts", {})
    timings = summary.get("timings", {})
    out = Path(summary.get("out", "."))
    lines = [f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, {counts.get('gone', 0)} gone "
             f"of {plural(summary.get('total', 0), 'task')}",
             f"{timings.get('tasks_done_this_run', 0)} processed this run in {timings.get('elapsed_s', 0):.2f}s"]
    hints = _next_steps(outcome.exit_code, counts, out, len(summary.get("scan_problems") or []))
    if logs.json_lines():
        click.echo(logs.json_line(
            "INFO", "; ".join(lines), event="summary", exit_code=outcome.exit_code, **counts,
            total=summary.get("total", 0), processed_this_run=timings.get("tasks_done_this_run", 0),
            elapsed_s=timings.get("elapsed_s"), merged_output=summary.get("merged_output"),
            records_on_stdout=to_stdout, summary_file=str(out / "summary.json"), hints=hints), err=True)
        return
    if summary.get("merged_output"):
        lines.append(f"merged output: {summary['merged_output']}" + (" (records on stdout)" if to_stdout else ""))
    lines.append(f"summary: {out / 'summary.json'}")
    for line in lines + hints:
        click.echo(line, err=True)


def _next_steps(exit_code: int, counts: dict[str, int], out: Path, problems: int = 0) -> list[str]:
    quoted = shlex.quote(str(out))
    steps = []
    if problems:
        steps.append(f"not scanned: {plural(problems, 'path')} (what they hold is missing from the output): "
                     f"see crawlproc failures -o {quoted}")
    if exit_code == 130:
        return steps + ["interrupted: run the same command again to resume"]
    if not counts.get("failed"):
        return steps
    return steps + [f"{plural(counts['failed'], 'task')} failed; to see why: crawlproc failures -o {quoted}",
                    f"to put them back to pending for the next run: crawlproc retry -o {quoted}"]


@cli.command()
@out_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def status(out: Path, as_json: bool) -> None:
    """Counts by state, throughput, failures and the last run of OUT.

    A last run that holds no lock on OUT but never finished ended abruptly (killed,
    or the machine went down): the tasks it left running go back to pending when
    the next run starts.
    """
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
    """Put tasks back to pending (failed ones, or all; optionally only PATHs).

    A PATH is relative to DATA_DIR, as `crawlproc failures` shows it (an absolute
    path inside DATA_DIR works too). A PATH that no task has is an error (exit 2),
    and then nothing is put back.
    """
    from crawlproc.report import retry_tasks

    retried = retry_tasks(out, include_done=which == "all", relpaths=paths)
    if retried.count:
        them = "it" if retried.count == 1 else "them"
        then = f"to process {them}: {retried.run_command}" if retried.run_command else "the next run processes them"
        click.echo(f"{plural(retried.count, 'task')} back to pending; {then}", err=True)
    else:
        none = "no failed or done task" if which == "all" else "no failed task"
        among = " among those paths" if paths else ""
        advice = "" if which == "all" else " (--all redoes done tasks too)"
        click.echo(f"nothing put back to pending: {none}{among}{advice}", err=True)


@cli.command()
@out_option
@click.option("--output", type=click.Path(dir_okay=False, allow_dash=True), callback=_output_option,
              metavar="FILE|-", help="Merged output file; - writes the records to stdout too "
                                     "(OUT/merged.<format> is still written).")
@format_option
@click.pass_context
def merge(ctx: click.Context, out: Path, output: Path | str | None, output_format: str) -> None:
    """Run the finalizer alone: merged output and summary.json from the done results.

    Exit 0 when the output holds every task's records; 1 when it lacks some
    (failed tasks, or tasks a run has yet to process, such as those whose result
    turned out missing or damaged), with the command that carries on.
    """
    from crawlproc.report import merge_only

    to_stdout = output == STDOUT
    with _stdout_kept_for_records(to_stdout):
        report = merge_only(out, None if to_stdout else output, output_format)
    counts = report.summary["counts"]
    click.echo(f"merged {plural(counts['done'], 'done task')} into {report.summary['merged_output']}", err=True)
    if report.damaged:
        click.echo(f"{plural(report.damaged, 'done task')} had a missing or damaged result and went back "
                   "to pending", err=True)
    if report.unprocessed:
        click.echo(f"the output lacks {plural(report.unprocessed, 'task')} not processed yet; "
                   f"to process them: {report.run_command}", err=True)
    if counts["failed"]:
        click.echo(f"the output lacks {plural(counts['failed'], 'failed task')}; "
                   f"to see why: crawlproc failures -o {shlex.quote(str(out))}", err=True)
    if to_stdout:
        _write_records(report.summary["merged_output"])
    ctx.exit(1 if report.unprocessed or counts["failed"] else 0)


@cli.command()
def processors() -> None:
    """List the built-in processors."""
    from crawlproc.processors import describe_builtins

    for name, version, line in describe_builtins():
        click.echo(f"{name:<12} v{version:<4} {line}")


def _print_rich(renderable: Any) -> None:
    from rich.console import Console

    # soft_wrap: rich breaks no line itself; the terminal wraps a long path or command,
    # which then stays one line to copy.
    Console().print(renderable, soft_wrap=True)


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
