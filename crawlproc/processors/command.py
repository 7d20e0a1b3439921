"""The processor behind `crawlproc run --cmd 'prog --flag {}'`: an external command per file.

The CLI runs it as the built-in `cmd` with the template in the params:
processor `"cmd"` and `params["cmd"] = "prog --flag {}"` (the template is then
part of the run's identity, like any param). `check_template()` lets the CLI
refuse a bad template up front, with exit code 2.

- argv is `shlex.split(template)`, with `{}` replaced by the file's absolute
  path wherever it appears (`{}` alone or inside a word, e.g. `--in={}`); a
  template without `{}` gets the path as its last argument (like xargs). There
  is never a shell: `;`, `|`, `$(...)` in a file name are just characters, and
  a name starting with `-` cannot become an option since the path is absolute.
- stdin is /dev/null; stdout and stderr are captured, each up to MAX_OUTPUT
  bytes (the rest is read and dropped, `stdout_truncated`/`stderr_truncated`
  give the number of bytes dropped) and decoded as UTF-8 with replacement.
- The command runs in the worker's process group (no new session), so a
  `--timeout` kill of the worker's group kills the command too.
- Record: `{"path", "exit_code", "stdout", "stderr"}`; a task that is a byte
  range (--chunk-size) still passes the whole file's path and adds `offset`
  and `length`, so the command should be given whole files (no --chunk-size).
- A non-zero exit fails the attempt (`CommandFailed`, retried like any failure):
  "command exited with code 2: <first line of stderr>", followed by the tail of
  stderr. A missing or non-executable program fails with a message naming it.
"""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
from typing import Any

from crawlproc.errors import TaskFailed, UsageError
from crawlproc.processors.base import processor
from crawlproc.task import Task

MAX_OUTPUT = 1 << 20      # bytes kept of stdout and of stderr
STDERR_TAIL = 1000        # characters of stderr kept in a failure's message
PLACEHOLDER = "{}"


class CommandFailed(TaskFailed):
    """The command could not be started or exited with a non-zero code."""


def check_template(template: str | None) -> list[str]:
    """The words of a --cmd template; UsageError (exit 2) for an empty or unparsable one."""
    if template is None or not template.strip():
        raise UsageError("--cmd needs a command, e.g. --cmd 'wc -l {}'")
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"--cmd {template!r}: {exc}") from None
    if not words:
        raise UsageError("--cmd needs a command, e.g. --cmd 'wc -l {}'")
    return words


def build_argv(template: str, path: str) -> list[str]:
    """argv for one file: every `{}` becomes `path` (appended if the template has none)."""
    words = check_template(template)
    if not any(PLACEHOLDER in word for word in words):
        return [*words, path]
    return [word.replace(PLACEHOLDER, path) for word in words]


@processor(version="1")
def run_command(task: Task) -> dict:
    """Run the --cmd command on each file (argv via shlex, {} = absolute path, no shell)."""
    template = task.params.get("cmd")
    try:
        argv = build_argv(template or "", task.path)
    except UsageError as exc:
        raise CommandFailed(str(exc)) from None
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True,
        )
    except FileNotFoundError:
        raise CommandFailed(f"command not found: {argv[0]!r} (from --cmd {template!r})") from None
    except PermissionError:
        raise CommandFailed(f"command not executable: {argv[0]!r} (from --cmd {template!r})") from None
    except OSError as exc:
        raise CommandFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
    with proc:
        (out, out_dropped), (err, err_dropped) = _collect(proc)
        code = proc.wait()
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if code != 0:
        raise CommandFailed(_failure_message(code, stderr))
    record: dict[str, Any] = {"path": task.relpath, "exit_code": code, "stdout": stdout, "stderr": stderr}
    if out_dropped:
        record["stdout_truncated"] = out_dropped
    if err_dropped:
        record["stderr_truncated"] = err_dropped
    if task.is_range:
        record["offset"] = task.offset
        record["length"] = task.length
    return record


def _collect(proc: subprocess.Popen, limit: int | None = None) -> list[tuple[bytes, int]]:
    """Read stdout and stderr to their end: (first `limit` bytes, bytes dropped) of each."""
    limit = MAX_OUTPUT if limit is None else limit
    streams = [proc.stdout, proc.stderr]
    kept = {id(s): bytearray() for s in streams}
    dropped = {id(s): 0 for s in streams}
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            for key, _ in selector.select():
                stream = key.fileobj
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(stream)
                    stream.close()  # type: ignore[union-attr]
                    continue
                buf = kept[id(stream)]
                room = limit - len(buf)
                if room > 0:
                    buf += chunk[:room]
                dropped[id(stream)] += max(0, len(chunk) - max(room, 0))
    return [(bytes(kept[id(s)]), dropped[id(s)]) for s in streams]


def _failure_message(code: int, stderr: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        head = f"command killed by {name}"
    else:
        head = f"command exited with code {code}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    if not lines:
        return head
    message = f"{head}: {lines[0][:300]}"
    if len(lines) > 1:
        tail = stderr.strip()[-STDERR_TAIL:]
        message += "\n" + tail
    return message
