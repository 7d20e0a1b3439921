"""The options as click sees them: each value judged by options.check (shared with the Python API),
each readable from CRAWLPROC_<NAME>."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from crawlproc.options import (
    DEFAULT_OUT,
    EXECUTORS,
    FORMATS,
    WATCH_OPTIONS,
    OptionError,
    check,
    keyword_of,
)

STDOUT = "-"  # --output -: the merged records to stdout


OUT_KEY = "crawlproc.out"  # where the command's OUT is kept in click's shared ctx.meta


def checked(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """The value as options.check judges it; click shows a refusal as a bad value of the option
    (naming the CRAWLPROC_* variable it came from, if it did)."""
    if value is None or (param.multiple and not value):
        return value  # not given: the job takes the option's default
    try:
        return check(keyword(param), value)
    except OptionError as exc:
        raise click.BadParameter(exc.problem) from None


def keyword(param: click.Parameter) -> str:
    """The Python API's name of an option: its long name, '-' as '_'."""
    return keyword_of(next(opt for opt in param.opts if opt.startswith("--")))


def default_of(name: str) -> Any:
    return WATCH_OPTIONS[name].default


def env_name(name: str) -> str:
    return f"CRAWLPROC_{name.upper()}"


def format_option(func: Any) -> Any:
    return click.option("--format", "output_format", type=click.Choice(FORMATS),
                        default=default_of("format"), show_default=True, envvar=env_name("format"), callback=checked,
                        help="Merged output format (OUT/merged.<format> unless --output).")(func)


def _remember_out(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    ctx.meta[OUT_KEY] = value  # for messages about OUT's files (see CrawlprocGroup.invoke)
    return value


def out_option(func: Any) -> Any:
    return click.option("-o", "--out", type=click.Path(path_type=Path), default=DEFAULT_OUT,
                        envvar=env_name("out"), show_default=True, callback=_remember_out,
                        help="Where the ledger, results, merged output and logs live.")(func)


def output_argument(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | str | None:
    return value if value in (None, STDOUT) else Path(value)


def processing_options(func: Any) -> Any:
    """The options `run` (and later `watch`) share; each also reads CRAWLPROC_<NAME>."""
    options = [
        click.option("-p", "--processor", default=default_of("processor"), envvar=env_name("processor"), show_default=True,
                     help="Built-in name, package.module:function, or path/to/file.py:function."),
        click.option("--param", "params", multiple=True, callback=checked, metavar="KEY=VALUE",
                     envvar=env_name("param"), help="Given to the processor as task.params; repeatable."),
        click.option("--cmd", metavar="'PROG ARGS {}'", envvar=env_name("cmd"), callback=checked,
                     help="Run an external command per file instead of -p; split with shlex, never a shell. "
                          "As in GNU parallel, {} is the file's absolute path, {/} its basename, {//} its folder, "
                          "{.} the path without its last extension, {/.} the basename without it. A placeholder "
                          "that is a whole argument is passed raw (to hand a path to a program that is not a "
                          "shell, give {} as an argument of its own); inside a larger argument, as in "
                          "sh -c 'wc -c < {}', it is shell-quoted. Without a placeholder the path is appended "
                          "as the last argument."),
        click.option("--ok-exit-codes", callback=checked, metavar="CODES", envvar=env_name("ok_exit_codes"),
                     help="With --cmd: exit codes that count as done, e.g. 0,1 for grep -c "
                          "(the record keeps the code).  [default: 0]"),
        out_option,
        click.option("-w", "-j", "--workers", type=str, default=default_of("workers"), callback=checked, metavar="N",
                     envvar=env_name("workers"), show_default="CPU count", help="Worker processes."),
        click.option("--include", multiple=True, envvar=env_name("include"), metavar="GLOB", callback=checked,
                     help="Only files matching GLOB (on the path relative to DATA_DIR); repeatable."),
        click.option("--exclude", multiple=True, envvar=env_name("exclude"), metavar="GLOB", callback=checked,
                     help="Skip files and folders matching GLOB; repeatable."),
        click.option("--max-tasks-per-child", type=str, default=default_of("max_tasks_per_child"), show_default=True,
                     callback=checked, metavar="N", envvar=env_name("max_tasks_per_child"),
                     help="Recycle a worker after N tasks."),
        click.option("--max-memory-per-child", "max_memory", callback=checked, metavar="SIZE",
                     envvar=env_name("max_memory_per_child"), help="Recycle a worker whose RSS passed SIZE (e.g. 512MB)."),
        click.option("--max-memory-per-task", callback=checked, metavar="SIZE",
                     envvar=env_name("max_memory_per_task"),
                     help="Kill a worker whose RSS passes SIZE while a task runs; that task alone is charged "
                          "an attempt."),
        click.option("--timeout", callback=checked, metavar="SECONDS", envvar=env_name("timeout"),
                     help="Kill a task's worker after SECONDS; counts as a failed attempt."),
        click.option("--retries", type=str, default=default_of("retries"), show_default=True, callback=checked, metavar="N",
                     envvar=env_name("retries"), help="Extra attempts for a failing task, with exponential backoff and jitter."),
        click.option("--retry-delay", type=str, default=default_of("retry_delay"), show_default=True, callback=checked,
                     metavar="SECONDS", envvar=env_name("retry_delay"),
                     help="Base delay in seconds before the first retry; doubles each time."),
        click.option("--max-failures", callback=checked, metavar="N|N%", envvar=env_name("max_failures"),
                     help="Stop early (exit 1) once more tasks than this have failed. Without it, a run "
                          "stops only if its first 10 failures, before any task is done, share one error."),
        click.option("--durable", is_flag=True, envvar=env_name("durable"),
                     help="fsync each result file and its folder before its tasks are marked done."),
        click.option("--retry-failed", is_flag=True, envvar=env_name("retry_failed"),
                     help="Put failed tasks back to pending before running."),
        click.option("--reprocess", is_flag=True, envvar=env_name("reprocess"),
                     help="Accept another processor/version/params on an existing OUT and redo every task."),
        click.option("--keep-results", is_flag=True, envvar=env_name("keep_results"),
                     help="Accept edited processor code on an existing OUT: keep the done tasks' records, "
                          "process the rest with the new code (recorded in summary.json)."),
        click.option("--dry-run", is_flag=True, envvar=env_name("dry_run"),
                     help="Say how many files would be new, changed, retried and gone (with -v, which), "
                          "then exit 0; process nothing, write nothing in OUT (watch: what its catch-up "
                          "would do). Retried: unchanged files a run would process again: pending tasks "
                          "(an interrupted run's, or after failed attempts), running ones a stopped run "
                          "left, failed ones with --retry-failed, all with --reprocess."),
        click.option("--batch-size", callback=checked, metavar="N", envvar=env_name("batch_size"),
                     help="Most tasks in one claimed batch and result file [default: adaptive, up to 512]."),
        click.option("--chunk-size", callback=checked, metavar="SIZE", envvar=env_name("chunk_size"),
                     help="Split files larger than SIZE (e.g. 64MB) into line-aligned byte ranges, one task each "
                          "(0 or off: whole files)."),
        click.option("--follow-symlinks", is_flag=True, envvar=env_name("follow_symlinks"),
                     help="Follow symlinks (never outside DATA_DIR; loops are detected)."),
        click.option("--output", type=click.Path(dir_okay=False, allow_dash=True), envvar=env_name("output"),
                     callback=checked, metavar="FILE|-",
                     help="Merged output file; - writes the records to stdout too (OUT/merged.<format> "
                          "is still written) [default: OUT/merged.jsonl]."),
        format_option,
        click.option("--source-column", metavar="NAME", envvar=env_name("source_column"), callback=checked,
                     help="Put each record's relpath under NAME, first (with --chunk-size also its byte "
                          "offset, under NAME_offset); a record that has NAME keeps its own value."),
        click.option("--no-merge", is_flag=True, envvar=env_name("no_merge"), help="Skip the finalizer."),
        click.option("--executor", type=click.Choice(EXECUTORS), default=default_of("executor"), show_default=True,
                     envvar=env_name("executor"), callback=checked,
                     help="Where batches run: worker processes here, or a Dask distributed cluster "
                          "(pip install 'crawlproc[dask]')."),
        click.option("--scheduler", metavar="ADDR", envvar=env_name("scheduler"), callback=checked,
                     help="With --executor dask: tcp://HOST:PORT of a running scheduler, or local[:N] for a "
                          "LocalCluster of N worker processes (local alone: -w of them) [default: Dask's "
                          "scheduler-address setting]."),
        click.option("--serve", metavar="[HOST:]PORT", envvar=env_name("serve"), callback=checked,
                     help="Serve a live status page, /status.json, /healthz and Prometheus /metrics while "
                          "running (host 127.0.0.1 unless given; port 0: any free port, the log says which; "
                          "pip install 'crawlproc[serve]')."),
        click.option("-v", "--verbose", count=True, envvar=env_name("verbose"), help="More log lines (debug)."),
        click.option("-q", "--quiet", is_flag=True, envvar=env_name("quiet"),
                     help="Only warnings and errors (and, if tasks failed, what to run next)."),
        click.option("--log-json", is_flag=True, envvar=env_name("log_json"),
                     help="Each stderr line one flat JSON object (level, time, message, pid, task); the final "
                          "summary too."),
        click.option("--no-progress", is_flag=True, envvar=env_name("no_progress"), help="No progress bar."),
    ]
    for option in reversed(options):
        func = option(func)
    return func

