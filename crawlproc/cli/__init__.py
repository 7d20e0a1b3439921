"""The `crawlproc` command: parse, call the library, print, pick the exit code.

Nothing else in crawlproc prints. Every error a user can cause becomes one
line on stderr and the exit code of SPEC.md (2 usage, 3 OUT locked, 130
interrupted), never a traceback. Every hint printed is a command that can be
copied and run as printed (real paths, shell-quoted). With `--output -`, stdout
carries the merged records and nothing else. Heavy modules are imported inside
the commands, so `crawlproc --help` starts fast.

    app.py      the group: errors -> one line + exit code; main() and the way out
    flags.py    options as click sees them (checks shared with the Python API: options.py)
    jobs.py     run, watch (through api.py), --dry-run, --output -, the closing lines
    reports.py  status, failures, retry, merge, explain, serve, processors
"""

from __future__ import annotations

from crawlproc.cli import jobs, reports  # noqa: F401  (importing them adds their commands to the group)
from crawlproc.cli.app import cli, main

__all__ = ["cli", "main"]
