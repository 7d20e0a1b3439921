"""Logging set-up: loguru to stderr (for people) and to OUT/logs/crawlproc.log (for later).

Every file line carries the pid and, where there is one, the task id. While a
rich progress bar is on screen, stderr lines go through its console so the bar
is redrawn under them instead of being torn. With --log-json, each stderr line
is one flat JSON object (`json_line`), and the CLI's final summary is one too.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from loguru import logger

LOG_DIR = "logs"
LOG_NAME = "crawlproc.log"
_FILE_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | pid={process} task={extra[task]} | {extra[printable]}"
_STDERR_FORMAT = "<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {extra[printable]}"
# Control characters but tab and newline, as \xNN: a file named with a terminal's escape sequence
# (ESC [ 2 J clears the screen) must not drive the terminal of whoever reads the log.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}

_console: Any = None
_file_sink: int | None = None
_json_lines = False  # --log-json: what the CLI prints on stderr is JSON too
_program_set_up = False  # setup_stderr ran: the program (the CLI) owns stderr logging
_loguru_default = 0  # the id of loguru's default handler (stderr, every DEBUG line), or of ours in its place


def setup_stderr(verbose: int, quiet: bool, json_lines: bool) -> None:
    global _json_lines, _program_set_up
    _json_lines = json_lines
    _program_set_up = True
    logger.remove()
    logger.configure(extra={"task": "-"})
    _add_stderr_sink(verbose, quiet, json_lines)


def _add_stderr_sink(verbose: int, quiet: bool, json_lines: bool, **only: Any) -> int:
    level = "WARNING" if quiet else ("DEBUG" if verbose else "INFO")
    if json_lines:
        return logger.add(_write_json_line, level=level, format="{message}", **only)
    return logger.add(_write_stderr, level=level, format=_stderr_format, colorize=stderr_is_a_terminal(), **only)


def printable(text: str) -> str:
    """`text` with its control characters (not tab and newline) written as \\xNN."""
    return text.translate(_CONTROLS)


def _stderr_format(record: Any) -> str:
    record["extra"]["printable"] = printable(record["message"])
    return _STDERR_FORMAT + "\n{exception}"


@contextmanager
def job_stderr(verbose: int, quiet: bool, json_lines: bool) -> Iterator[None]:
    """crawlproc's stderr lines for one job started from Python (a notebook, a script), unless the
    program set logging up itself (the CLI does: setup_stderr). Only crawlproc's records are
    shown; loguru's default handler, if nobody removed it, would print every DEBUG line, so it is
    set aside meanwhile and put back after. Other handlers are left alone. The job's file sink
    (OUT/logs) is removed at its end either way."""
    global _json_lines, _loguru_default
    if _program_set_up:
        try:
            yield
        finally:
            remove_file_sink()
        return
    try:
        logger.remove(_loguru_default)
        default_removed = True
    except ValueError:
        default_removed = False
    sink = _add_stderr_sink(verbose, quiet, json_lines, filter="crawlproc")
    previous, _json_lines = _json_lines, json_lines
    try:
        yield
    finally:
        _json_lines = previous
        logger.remove(sink)
        remove_file_sink()
        if default_removed:
            _loguru_default = logger.add(sys.stderr)  # what loguru starts with, set aside again next job


def stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def json_lines() -> bool:
    """Whether stderr carries JSON lines (--log-json)."""
    return _json_lines


def json_line(level: str, message: str, *, at: datetime | None = None, pid: int | None = None,
              task: Any = "-", **fields: Any) -> str:
    """One log line for machines: {"level", "time", "message", "pid", "task", ...fields}, flat."""
    line = {"level": level, "time": (at or datetime.now().astimezone()).isoformat(timespec="milliseconds"),
            "message": message, "pid": os.getpid() if pid is None else pid, "task": task, **fields}
    return json.dumps(line, default=str)


def _write_json_line(message: Any) -> None:
    record = message.record
    fields = {}
    if record["exception"] is not None:
        kind, value, tb = record["exception"]
        fields["exception"] = "".join(traceback.format_exception(kind, value, tb))
    sys.stderr.write(json_line(record["level"].name, record["message"], at=record["time"],
                               pid=record["process"].id, task=record["extra"].get("task", "-"), **fields) + "\n")


def add_file_sink(out: Path) -> None:
    global _file_sink
    if _file_sink is not None:
        try:
            logger.remove(_file_sink)
        except ValueError:
            pass  # already removed by setup_stderr(), which starts from no handlers
    (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
    _file_sink = logger.add(
        out / LOG_DIR / LOG_NAME, level="DEBUG", format=_file_format,
        rotation="10 MB", retention=5, encoding="utf-8",
    )


def remove_file_sink() -> None:
    global _file_sink
    if _file_sink is not None:
        try:
            logger.remove(_file_sink)
        except ValueError:
            pass
        _file_sink = None


def _file_format(record: Any) -> str:
    """The file line; `task` is '-' when no task is bound, even if setup_stderr() never ran
    (a script calling run_job itself)."""
    record["extra"].setdefault("task", "-")
    record["extra"]["printable"] = printable(record["message"])
    return _FILE_FORMAT + "\n{exception}"


def use_console(console: Any) -> None:
    """Route stderr log lines through a rich console while its live display runs."""
    global _console
    _console = console


def _write_stderr(message: str) -> None:
    if _console is not None:
        from rich.text import Text

        _console.print(Text.from_ansi(message.rstrip("\n")), highlight=False)
    else:
        sys.stderr.write(message)
