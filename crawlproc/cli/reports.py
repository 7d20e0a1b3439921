"""The commands around a run: status, failures, retry, merge, explain, serve, processors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import click

from crawlproc.cli.app import cli
from crawlproc.cli.flags import (
    STDOUT,
    env_name,
    format_option,
    out_option,
    output_argument,
)
from crawlproc.cli.jobs import stdout_kept_for_records, write_records
from crawlproc.serve import DEFAULT_HOST, DEFAULT_PORT
from crawlproc.words import plural


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
@click.option("--failed", "failed_only", is_flag=True, help="Failed tasks (the default).")
@click.option("--all", "redo_all", is_flag=True, help="Failed and done tasks: redo everything.")
@click.argument("paths", nargs=-1)
def retry(out: Path, failed_only: bool, redo_all: bool, paths: tuple[str, ...]) -> None:
    """Put tasks back to pending (failed ones, or all; optionally only PATHs).

    A PATH is read as `crawlproc explain` reads it: absolute, relative to the current
    folder when that lies under DATA_DIR, or relative to DATA_DIR (as `crawlproc
    failures` shows it); when two of these readings are files, the one with a task
    wins. A PATH that no task has is an error (exit 2), and then nothing is put back.
    """
    from crawlproc.errors import UsageError
    from crawlproc.report import retry_tasks

    if failed_only and redo_all:
        raise UsageError("--failed and --all exclude each other (--all redoes failed tasks too)")
    which = "all" if redo_all else "failed"
    retried = retry_tasks(out, include_done=redo_all, relpaths=paths)
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
@click.option("--output", type=click.Path(dir_okay=False, allow_dash=True), callback=output_argument,
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
    from crawlproc import logs
    from crawlproc.report import merge_only

    logs.setup_stderr(0, False, False)  # what the merge logs reads as a run's lines do, not loguru's default
    to_stdout = output == STDOUT
    with stdout_kept_for_records(to_stdout):
        report = merge_only(out, None if to_stdout else output, output_format)
    counts = report.summary["counts"]
    click.echo(f"merged {plural(counts['done'], 'done task')} into {report.summary['merged_output']}", err=True)
    if report.damaged:
        click.echo(f"{plural(report.damaged, 'done task')} had a missing or damaged result and went back "
                   "to pending", err=True)
    if report.unprocessed:
        click.echo(f"the output lacks {plural(report.unprocessed, 'task')} not processed yet; "
                   f"to process them: {report.run_command or 'run its processor on OUT again'}", err=True)
    if counts["failed"]:
        click.echo(f"the output lacks {plural(counts['failed'], 'failed task')}; "
                   f"to see why: crawlproc failures -o {shlex.quote(str(out))}", err=True)
    if to_stdout:
        write_records(report.summary["merged_output"])
    ctx.exit(1 if report.unprocessed or counts["failed"] else 0)


@cli.command()
@click.argument("path")
@out_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def explain(path: str, out: Path, as_json: bool) -> None:
    """Why PATH was or was not processed: its tasks, states, attempts and last error, the run
    that did it and whether the file changed since; or the rule that leaves it out.

    PATH may be absolute; a relative PATH is taken from the current folder when that
    lies under DATA_DIR, else relative to DATA_DIR (as `crawlproc failures` prints
    paths); when both readings are under DATA_DIR, the one with a task wins. A PATH
    outside DATA_DIR is an error (exit 2).
    """
    from crawlproc.explain import explain as explain_path

    found = explain_path(path, out)
    if as_json:
        click.echo(json.dumps(found.to_json(), indent=2))
    else:
        from crawlproc.logs import printable

        for line in found.lines:
            click.echo(printable(line))  # a name may hold a terminal's escape sequence: shown as \xNN


def _listen_host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """--host as the socket takes it; empty or blank is a bad value (see serve.listen_host)."""
    from crawlproc.errors import UsageError
    from crawlproc.serve import listen_host

    try:
        return listen_host(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@out_option
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              envvar=env_name("port"), help="Port to listen on (0: any free port).")
@click.option("--host", default=DEFAULT_HOST, show_default=True, envvar=env_name("host"), callback=_listen_host,
              help="Address to listen on (0.0.0.0: every interface; the page is read-only).")
def serve(out: Path, port: int, host: str) -> None:
    """Serve the live status page, /status.json, /healthz and Prometheus /metrics of OUT.

    OUT may be finished or have a run going: everything is read from its ledger,
    read-only, like `crawlproc status`. Until Ctrl-C (exit 0).
    """
    from crawlproc.serve import Address, serve_out

    serve_out(out, Address(host, port),
              ready=lambda url: click.echo(f"serving {out} on {url} (Ctrl-C to stop)", err=True))


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

