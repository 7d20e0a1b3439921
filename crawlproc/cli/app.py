"""The `crawlproc` group: one line and SPEC.md's exit code for every error a user can cause, and
the way out of the process (see cli/__init__.py)."""

from __future__ import annotations

import errno
import os
import shlex
import sqlite3
import sys
from pathlib import Path
from typing import Any

import click

from crawlproc import __version__
from crawlproc.cli.flags import OUT_KEY
from crawlproc.errors import CrawlprocError, Interrupted

INTERRUPTED = "interrupted; run the same command again to resume"


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
        except click.Abort:  # Ctrl-C before a command began (click's own word for it)
            _fail(f"crawlproc: {INTERRUPTED}", Interrupted.exit_code)
        except CrawlprocError as exc:
            command_line = sys.argv[1:] if args is None else list(args)
            _fail(f"crawlproc: {_with_commands(exc, command_line)}", exc.exit_code)
        except KeyboardInterrupt:
            _fail(f"crawlproc: {INTERRUPTED}", Interrupted.exit_code)
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
        except KeyboardInterrupt:  # before click's main turns it into Abort and prints an empty line
            raise Interrupted(INTERRUPTED) from None
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


@click.group(cls=CrawlprocGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="crawlproc")
def cli() -> None:
    """Run one processor over every file of a folder tree, on all cores, resumably.

    A SQLite ledger in OUT records every file as a task; rerunning the same
    command after a crash or Ctrl-C carries on where it stopped.
    """


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
    the process ends at once (Dask's client leaves daemon threads behind: ~0.1 s of
    teardown after a run on Dask). With a non-daemon thread still running, a profiler
    or tracer watching (cProfile, coverage: they write their data after us),
    or an exit code Python would print, the usual exit does it all instead.
    """
    import atexit

    threading = sys.modules.get("threading")
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere, the usual exit
    if (not isinstance(code, int) and code is not None or (threading and _threads_left(threading))
            or sys.getprofile() is not None or sys.gettrace() is not None or run_exit_handlers is None):
        sys.exit(code)
    if "loguru" in sys.modules:
        from loguru import logger

        logger.remove()  # closes the log file, flushing its last lines
    from crawlproc.children import flush_std_streams

    run_exit_handlers()
    flush_std_streams()
    os._exit(code or 0)


def _threads_left(threading: Any) -> bool:
    """A thread other than the main one that the usual exit would wait for. Daemon threads
    (Dask's client keeps two after it closed) are stopped by that exit too, without waiting."""
    main = threading.main_thread()
    return any(not thread.daemon for thread in threading.enumerate() if thread is not main)

