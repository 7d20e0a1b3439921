from __future__ import annotations

import os
import re
import selectors
import shlex
import signal
import subprocess
from collections.abc import Mapping
from typing import Any

from crawlproc.errors import TaskFailed, UsageError
from crawlproc.processors.base import processor
from crawlproc.task import Task

MAX_OUTPUT = 1 << 20      # bytes kept of stdout and of stderr
OUTPUT_TAIL = 2000        # characters of stderr and of stdout kept with a failure
OK_EXIT_CODES = "ok_exit_codes"  # the param that holds --ok-exit-codes
DEFAULT_OK_EXIT_CODES = (0,)
# {} {/} {//} {.} {/.}; the group is what stands between the braces
PLACEHOLDER = re.compile(r"\{(//|/\.|/|\.)?\}")
_EXTENSION = re.compile(r"\.[^/.]*$")  # GNU parallel's own rule for {.}
_EXIT_CODE = re.compile(r"\d{1,3}", re.ASCII)


class CommandFailed(TaskFailed):
    """The command could not be started or exited with a code not in --ok-exit-codes."""


def check_template(template: str | None) -> list[str]:
    """The words of a --cmd template; UsageError (exit 2) for an empty or unparsable one."""
    if template is None or not template.strip():
        raise UsageError("--cmd needs a command, e.g. --cmd 'wc -l {}'")
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise UsageError(f"--cmd {_shown(template)}: {exc}") from None
    if not words:
        raise UsageError("--cmd needs a command, e.g. --cmd 'wc -l {}'")
    return words


def _shown(template: str) -> str:
    """A template in an error line: shell-quoted, and on one line (a script may hold newlines)."""
    return shlex.quote(template).replace("\n", "\\n")


def parse_exit_codes(text: str) -> tuple[int, ...]:
    """'1,0' -> (0, 1): sorted, without repeats; ValueError unless every item is a code 0-255."""
    items = [item.strip() for item in text.split(",")]
    if not all(_EXIT_CODE.fullmatch(item) and int(item) <= 255 for item in items):
        raise ValueError(f"{text!r} is not a comma-separated list of exit codes 0-255, e.g. 0,1")
    return tuple(sorted({int(item) for item in items}))


def format_exit_codes(codes: tuple[int, ...]) -> str:
    """The param's text for `codes` (the same codes always give the same text, so the same identity)."""
    return ",".join(str(code) for code in sorted(set(codes)))


def check_command(params: Mapping[str, str]) -> None:
    """Refuse a --cmd run that cannot work (UsageError, exit 2) before any task runs:
    a bad template, a bad code list, or a program that exec would not find or run."""
    template = params.get("cmd")
    words = check_template(template)
    try:
        parse_exit_codes(params.get(OK_EXIT_CODES, "0"))
    except ValueError as exc:
        raise UsageError(f"--ok-exit-codes {exc}") from None
    for word in words:
        quoted = _quoted_placeholder(word)
        if quoted:
            raise UsageError(
                f"--cmd {_shown(template)}: {quoted} is inside quotes, backticks, $'...' or a here-document "
                f"in {word!r}, where the shell quoting crawlproc gives it does not hold (a file named "
                "x'; touch PWNED would run its command): write it bare, e.g. sh -c 'wc -c < {}', or pass "
                "it as an argument: sh -c 'wc -c < \"$1\"' sh {}")
    program = words[0]
    if PLACEHOLDER.search(program):
        return  # which program runs depends on the file: each task finds out
    problem = program_problem(program)
    if problem:
        raise UsageError(f"--cmd {_shown(template)}: {problem}")


# Shell syntax in which a shell-quoted value is not safe either: backticks (a backtick in the
# name ends them), ANSI-C quotes $'...' (where \' does not end them), here-documents (whose
# body ignores quotes). A placeholder in a word holding any of them is refused outright.
_UNQUOTABLE_SYNTAX = ("`", "$'", "<<")


def _quoted_placeholder(word: str) -> str | None:
    """The first placeholder of a larger word (a shell script, e.g. `sh -c` gets) that a shell
    would read inside quotes, after a backslash, or in syntax where the quoting it gets
    (_substitute) does not hold; None if there is none. Quotes as POSIX sh reads them; this errs
    on the side of refusing (a placeholder inside "$(...)" is refused too)."""
    if PLACEHOLDER.fullmatch(word) or not (first := PLACEHOLDER.search(word)):
        return None  # passed raw, never to a shell as part of a script; or no placeholder at all
    if any(syntax in word for syntax in _UNQUOTABLE_SYNTAX):
        return first.group()
    quote = None  # None, "'" or '"': the quotes we are in
    i = 0
    while i < len(word):
        placeholder = PLACEHOLDER.match(word, i)
        if placeholder and quote:
            return placeholder.group()
        char = word[i]
        if char == "\\" and quote != "'":
            if escaped := PLACEHOLDER.match(word, i + 1):
                return escaped.group()
            i += 2  # the next character is taken literally
            continue
        if char == quote:
            quote = None
        elif quote is None and char in "'\"":
            quote = char
        i += 1
    return None


def program_problem(program: str) -> str | None:
    """Why exec could not run `program`, or None: a bare name is looked up on PATH
    (like execvp), a name with a `/` is taken as a path from the current folder."""
    if "/" not in program:
        import shutil

        return None if shutil.which(program) else f"no program {program!r} on PATH"
    if not os.path.exists(program):
        return f"program {shlex.quote(program)} does not exist"
    if os.path.isdir(program) or not os.access(program, os.X_OK):
        return f"program {shlex.quote(program)} is not executable"
    return None


def build_argv(template: str, path: str) -> list[str]:
    """argv for one file: placeholders replaced (the path appended if the template has none)."""
    words = check_template(template)
    if not any(PLACEHOLDER.search(word) for word in words):
        return [*words, path]
    return [_substitute(word, path) for word in words]


def _substitute(word: str, path: str) -> str:
    """A whole-word placeholder gives the raw value; inside a larger word, a shell-quoted one."""
    whole = PLACEHOLDER.fullmatch(word)
    if whole:
        return placeholder_value(whole.group(1) or "", path)
    return PLACEHOLDER.sub(lambda match: shlex.quote(placeholder_value(match.group(1) or "", path)), word)


def placeholder_value(kind: str, path: str) -> str:
    """What `{kind}` stands for, as GNU parallel defines it: '' the path, '/' its basename,
    '//' its dirname, '.' the path without its extension, '/.' the basename without it."""
    if kind == "//":
        return os.path.dirname(path) or "."
    name = path.rpartition("/")[2] if kind.startswith("/") else path
    return _EXTENSION.sub("", name) if kind.endswith(".") else name


@processor(version="1")
def run_command(task: Task) -> dict:
    """Run the --cmd command on each file (argv via shlex, {} = absolute path, no shell)."""
    template = task.params.get("cmd")
    try:
        argv = build_argv(template or "", task.path)
        ok_codes = parse_exit_codes(task.params.get(OK_EXIT_CODES, "0"))
    except (UsageError, ValueError) as exc:
        raise CommandFailed(str(exc)) from None
    with _start(argv, template) as proc:
        (out, out_dropped), (err, err_dropped) = _collect(proc)
        code = proc.wait()
    stdout = out.decode("utf-8", "replace")
    stderr = err.decode("utf-8", "replace")
    if code not in ok_codes:
        raise CommandFailed(_failure_message(code, stderr), details=_output_tails(stdout, stderr))
    record: dict[str, Any] = {"path": task.relpath, "exit_code": code, "stdout": stdout, "stderr": stderr}
    if out_dropped:
        record["stdout_truncated"] = out_dropped
    if err_dropped:
        record["stderr_truncated"] = err_dropped
    if task.is_range:
        record["offset"] = task.offset
        record["length"] = task.length
    return record


def _start(argv: list[str], template: str | None) -> subprocess.Popen:
    try:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True,
        )
    except FileNotFoundError:
        raise CommandFailed(f"command not found: {argv[0]!r} (from --cmd {template!r})") from None
    except PermissionError:
        raise CommandFailed(f"command not executable: {argv[0]!r} (from --cmd {template!r})") from None
    except OSError as exc:
        raise CommandFailed(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None


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
    """One line: how the command ended, and the first line of its stderr."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        head = f"command killed by {name}"
    else:
        head = f"command exited with code {code}"
    first = next((line for line in stderr.splitlines() if line.strip()), None)
    return head if first is None else f"{head}: {first[:300]}"


def _output_tails(stdout: str, stderr: str) -> str:
    """What a failed command leaves in the ledger's traceback field: the ends of its output."""
    return "\n".join(_tail(name, text) for name, text in (("stderr", stderr), ("stdout", stdout)))


def _tail(name: str, text: str) -> str:
    if not text:
        return f"--- {name}: empty ---"
    if len(text) <= OUTPUT_TAIL:
        return f"--- {name} ---\n{text.rstrip()}"
    return f"--- {name} (last {OUTPUT_TAIL} characters) ---\n{text[-OUTPUT_TAIL:].rstrip()}"


run_command.check_params = check_command  # a bad --cmd is exit 2 at the start
