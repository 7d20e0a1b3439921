"""`crawlproc run` and `crawlproc watch`: the job through the Python API, --dry-run, --output -, and
what is printed at the end."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from crawlproc.cli.app import cli
from crawlproc.cli.flags import (
    STDOUT,
    checked,
    default_of,
    env_name,
    keyword,
    processing_options,
)
from crawlproc.processors import BUILTINS
from crawlproc.words import plural


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@processing_options
@click.pass_context
def run(ctx: click.Context, data_dir: Path, **kw: Any) -> None:
    """Scan DATA_DIR, process every pending file, merge the results, exit."""
    if kw["dry_run"]:
        ctx.exit(_dry_run(ctx, data_dir, kw, watching=False))
    to_stdout = _output_to_stdout(kw)
    with stdout_kept_for_records(to_stdout), _forkserver_head_start(kw):
        outcome = _job(ctx, data_dir, kw, watching=False)
    records_out = to_stdout and outcome.exit_code in (0, 1)  # not when interrupted: the rerun writes them all
    _print_run_summary(outcome, to_stdout=records_out, quiet=kw["quiet"])
    if records_out:
        write_records((outcome.summary or {}).get("merged_output"))
    ctx.exit(outcome.exit_code)


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@processing_options
@click.option("--settle", type=str, default=default_of("settle"), show_default=True, envvar=env_name("settle"),
              callback=checked, metavar="SECONDS",
              help="Seconds a file must stay unchanged when no close-after-write event is seen.")
@click.option("--rescan-interval", type=str, default=default_of("rescan_interval"), show_default=True,
              envvar=env_name("rescan_interval"), callback=checked, metavar="SECONDS",
              help="Seconds between full rescans (events can be lost).")
@click.option("--merge-interval", type=str, default=default_of("merge_interval"), show_default=True,
              envvar=env_name("merge_interval"), callback=checked, metavar="SECONDS",
              help="Seconds between refreshes of the merged output (the first comes once the catch-up is done).")
@click.option("--poll", type=str, default=None, envvar=env_name("poll"), callback=checked, metavar="SECONDS",
              help="Find changes by a scan every SECONDS, without file events (NFS, SMB, Lustre). "
                   "Watch also falls back to it, with a warning, when the kernel refuses more watches.")
@click.pass_context
def watch(ctx: click.Context, data_dir: Path, **kw: Any) -> None:
    """Catch up like `run`, then process new and changed files as they arrive, until Ctrl-C.

    The merged output is published once the catch-up is processed, then every
    --merge-interval and at the stop. `--output -` is refused: read OUT/merged.<format>.
    """
    if kw["dry_run"]:
        ctx.exit(_dry_run(ctx, data_dir, kw, watching=True))
    if kw["output"] == STDOUT:
        merged = shlex.quote(str(kw["out"] / f"merged.{kw['output_format']}"))
        raise click.BadParameter(f"watch refreshes its merged output every --merge-interval, so there is no "
                                 f"one moment to write it to stdout; read {merged}, or give --output FILE",
                                 param_hint="--output -")
    outcome = _job(ctx, data_dir, kw, watching=True)
    _print_run_summary(outcome, to_stdout=False, quiet=kw["quiet"])
    ctx.exit(outcome.exit_code)


def _job(ctx: click.Context, data_dir: Path, kw: dict[str, Any], *, watching: bool) -> Any:
    """The job through the Python API (crawlproc.run / watch): one path for both. The options
    the user gave go as keywords; the others take the API's defaults, which are the command's."""
    from crawlproc import api, logs

    logs.setup_stderr(kw["verbose"], kw["quiet"], kw["log_json"])  # the program's own logging
    given = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if isinstance(param, click.Option) and source not in (None, click.core.ParameterSource.DEFAULT):
            given[keyword(param)] = kw[param.name]
    return (api.watch if watching else api.run)(data_dir, **given)


@contextmanager
def _forkserver_head_start(kw: dict[str, Any]) -> Iterator[None]:
    """A local run of a built-in processor with heavy imports (csv-stats: pyarrow, ~0.2 s) into a
    new OUT: the workers' forkserver starts now and imports them while the coordinator imports
    and sets up the job, which takes it over (processes.ForkServer.start). Ended here if not."""
    from crawlproc.ledger import LEDGER_NAME

    spec = BUILTINS.get(kw["processor"] or "")
    if kw["executor"] != "local" or spec is None or (kw["out"] / LEDGER_NAME).exists():
        yield
        return
    from crawlproc.processors.base import load

    modules = load(spec).imports
    if not modules:
        yield
        return
    from crawlproc import processes

    processes.start_early(modules)
    try:
        yield
    finally:
        processes.end_early()


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
def stdout_kept_for_records(keep: bool) -> Iterator[None]:
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


def write_records(merged_output: str | None) -> None:
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


def _dry_run(ctx: click.Context, data_dir: Path, kw: dict[str, Any], *, watching: bool) -> int:
    """--dry-run: what would change, with -v file by file, on stdout; exit code 0."""
    result = _job(ctx, data_dir, kw, watching=watching)
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


def _print_run_summary(outcome: Any, *, to_stdout: bool, quiet: bool) -> None:
    """The end of a run on stderr: counts, where the output is, what to do next (--log-json: one
    object). With -q, only what to do next (failures, problems, an interruption), if anything."""
    from crawlproc import logs

    summary = outcome.summary or {}
    counts = summary.get("counts", {})
    timings = summary.get("timings", {})
    out = Path(summary.get("out", "."))
    lines = [f"{counts.get('done', 0)} done, {counts.get('failed', 0)} failed, {counts.get('gone', 0)} gone "
             f"of {plural(summary.get('total', 0), 'task')}",
             f"{timings.get('tasks_done_this_run', 0)} processed this run in {timings.get('elapsed_s', 0):.2f}s"]
    hints = _next_steps(outcome.exit_code, counts, out, len(summary.get("scan_problems") or []))
    if quiet:
        if hints and logs.json_lines():
            click.echo(logs.json_line("WARNING", "; ".join(hints), event="next_steps", exit_code=outcome.exit_code,
                                      hints=hints), err=True)
        else:
            for line in hints:
                click.echo(line, err=True)
        return
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
    left = counts.get("pending", 0) + counts.get("running", 0)
    if exit_code == 0 and left:  # a watch stopped before it caught up (a stop is no error for a watch)
        steps.append(f"{plural(left, 'task')} still to process: run the same command again to carry on")
    if not counts.get("failed"):
        return steps
    return steps + [f"{plural(counts['failed'], 'task')} failed; to see why: crawlproc failures -o {quoted}",
                    f"to put them back to pending for the next run: crawlproc retry -o {quoted}"]

