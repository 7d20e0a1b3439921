"""The options of `run` and `watch`: names, defaults and checks, one definition for the command
line and the Python API.

    crawlproc run DATA -w 4 --max-memory-per-child 512MB      crawlproc.run(DATA, workers=4,
      click reads strings (argv, CRAWLPROC_*) ──┐                            max_memory_per_child="512MB")
                                                 v                                   │
                     check(name, value): the one place a value is judged ◄────────────┘
                          (OptionError: click shows it as a bad --flag, the API as name=value)
                                                 │
                     job_options(data_dir, values): the rules between options ──> RunOptions

A keyword is the long option's name with '-' as '_' (the CRAWLPROC_<NAME> variable in lower
case): `--max-memory-per-child` is `max_memory_per_child`, `--format` is `format`, `--param`
is `param` (a dict, or "KEY=VALUE" strings). The command line gives strings; Python may also
give numbers, lists and dicts. The defaults are the same for both.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import UsageError

DEFAULT_OUT = "crawlproc-out"
FORMATS = ("jsonl", "csv", "parquet")
EXECUTORS = ("local", "dask")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class OptionError(UsageError):
    """A value an option does not accept; `problem` reads on its own, after the option's name."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


# -- checks: value (a string from the command line, or a Python value) -> the value a job uses --

def _whole(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def whole_at_least(low: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        number = _whole(value)
        if number < low:
            raise ValueError(f"{number} is less than {low}")
        return number
    return check


def number_above(low: float, *, inclusive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        number = _number(value)
        if number < low or (number == low and not inclusive):
            raise ValueError(f"{number:g} is not {'at least' if inclusive else 'more than'} {low:g}")
        return number
    return check


def optional(check: Callable[[Any], Any], off: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """None (or one of the words in `off`, from the command line) means the option is not used."""
    return lambda value: None if value is None or value in off else check(value)


OFF = ("", "off")  # what turns a size limit or the failure budget off, e.g. CRAWLPROC_MAX_MEMORY_PER_CHILD=off


def parse_size(value: Any) -> int:
    """'64MB', '512M', '1GiB', '4096' or 4096 -> bytes (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(str(value)) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
    if not match:
        raise ValueError(f"{value!r} is not a size like 512MB or 1GiB")
    number, unit, _ = match.groups()
    return int(float(number) * _UNITS[unit.lower()])


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not True or False")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def column_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("needs a column name")
    return value


def globs(value: Any) -> tuple[str, ...]:
    """One pattern, or several."""
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        text(item)
    return items


def key_values(value: Any) -> dict[str, str]:
    """{"k": v} or ["k=v", ...] -> {"k": "v"}: values are text, as on the command line, so both
    give the same identity."""
    if isinstance(value, Mapping):
        pairs = [(text(key), value[key]) for key in value]
        return {key: item if isinstance(item, str) else str(item) for key, item in pairs}
    params = {}
    for item in globs(value):
        key, sep, item_value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        params[key] = item_value
    return params


def failure_budget(value: Any) -> tuple[float, bool]:
    """10 -> (10, False); '10%' -> (10, True); a pair as these give is kept."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bool):
        number, percent = failure_budget(value[0])[0], value[1]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number, percent = _number(value), False
        if number < 0:
            raise ValueError(f"{value!r} is not N or N%")
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"{value!r} is not N or N%")
        number, percent = float(match.group(1)), bool(match.group(2))
    if percent and number > 100:  # more than every task can never fail: surely a slip of the keys
        raise ValueError(f"{value!r} is more than 100% of the tasks")
    return number, percent


def exit_codes(value: Any) -> tuple[int, ...]:
    """'0,1' or [0, 1] -> (0, 1)."""
    from crawlproc.processors.command import parse_exit_codes

    if not isinstance(value, str):
        try:
            value = ",".join(str(_whole(code)) for code in value)
        except TypeError:
            raise ValueError(f"{value!r} is not a list of exit codes") from None
    return parse_exit_codes(value)


def one_of(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def output_format(value: Any) -> str:
    value = one_of(FORMATS)(value)
    if value == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError("parquet output needs pyarrow, a dependency of crawlproc: pip install pyarrow") from None
    return value


def a_path(value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{value!r} is not a path")
    return Path(value)


def output_path(value: Any) -> Path | str:
    return value if value == "-" else a_path(value)


def processor_spec(value: Any) -> Any:
    """A spec string, or (from Python) a processor function: resolved when the job starts."""
    if isinstance(value, str) or callable(value):
        return value
    raise ValueError(f"{value!r} is neither a processor name or spec nor a function")


def serve_address(value: Any) -> str:
    """--serve [HOST:]PORT: checked here, kept as given (the job parses it again)."""
    from crawlproc.serve import parse_address

    address = str(value) if isinstance(value, int) and not isinstance(value, bool) else text(value)  # serve=8080
    try:
        parse_address(address)
    except UsageError as exc:
        raise ValueError(str(exc).removeprefix("--serve ")) from None
    return address


def stop_event(value: Any) -> Any:
    if value is not None and not callable(getattr(value, "is_set", None)):
        raise ValueError(f"{value!r} is not a threading.Event")
    return value


# -- the options -----------------------------------------------------------------------------

class Option(NamedTuple):
    default: Any
    check: Callable[[Any], Any]


_CPUS = os.cpu_count() or 1

RUN_OPTIONS: dict[str, Option] = {
    "processor": Option("linecount", processor_spec),
    "param": Option({}, key_values),
    "cmd": Option(None, optional(text)),
    "ok_exit_codes": Option(None, optional(exit_codes)),
    "out": Option(Path(DEFAULT_OUT), a_path),
    "workers": Option(_CPUS, whole_at_least(1)),
    "include": Option((), globs),
    "exclude": Option((), globs),
    "max_tasks_per_child": Option(1000, whole_at_least(1)),
    "max_memory_per_child": Option(None, optional(parse_size, OFF)),
    "max_memory_per_task": Option(None, optional(parse_size, OFF)),
    "timeout": Option(None, optional(number_above(0, inclusive=False))),
    "retries": Option(2, whole_at_least(0)),
    "retry_delay": Option(0.5, number_above(0, inclusive=True)),
    "max_failures": Option(None, optional(failure_budget, OFF)),
    "durable": Option(False, flag),
    "retry_failed": Option(False, flag),
    "reprocess": Option(False, flag),
    "keep_results": Option(False, flag),
    "dry_run": Option(False, flag),
    "batch_size": Option(None, optional(whole_at_least(1))),
    "chunk_size": Option(None, optional(lambda value: parse_size(value) or None, OFF)),  # 0: whole files too
    "follow_symlinks": Option(False, flag),
    "output": Option(None, optional(output_path)),
    "format": Option("jsonl", output_format),
    "source_column": Option(None, optional(column_name)),
    "no_merge": Option(False, flag),
    "executor": Option("local", one_of(EXECUTORS)),
    "scheduler": Option(None, optional(text)),
    "serve": Option(None, optional(serve_address)),
    "verbose": Option(0, lambda value: int(value) if isinstance(value, bool) else whole_at_least(0)(value)),
    "quiet": Option(False, flag),
    "log_json": Option(False, flag),
    "no_progress": Option(False, flag),
}

WATCH_OPTIONS: dict[str, Option] = {
    **RUN_OPTIONS,
    "settle": Option(2.0, number_above(0, inclusive=True)),
    "rescan_interval": Option(300.0, number_above(0, inclusive=False)),
    "merge_interval": Option(30.0, number_above(0, inclusive=False)),
    "poll": Option(None, optional(number_above(0, inclusive=False))),
}

# Keywords of the Python API only (no command-line option): a threading.Event that stops the job
# as SIGINT would, from any thread.
PYTHON_ONLY: dict[str, Option] = {"stop": Option(None, stop_event)}


def check(name: str, value: Any, table: Mapping[str, Option] = WATCH_OPTIONS) -> Any:
    """The value `name` takes from `value`, or OptionError saying why it cannot."""
    try:
        return table[name].check(value)
    except ValueError as exc:
        raise OptionError(name, str(exc)) from None


def checked(given: Mapping[str, Any], *, watching: bool) -> dict[str, Any]:
    """Every option of the job: the given ones checked, the others at their defaults."""
    table = {**(WATCH_OPTIONS if watching else RUN_OPTIONS), **PYTHON_ONLY}
    unknown = [name for name in given if name not in table]
    if unknown:
        raise UsageError(_unknown_message(unknown[0], table, watching))
    values = {name: option.default for name, option in table.items()}
    values.update({name: check(name, value, table) for name, value in given.items()})
    return values


def _unknown_message(name: str, table: Mapping[str, Option], watching: bool) -> str:
    import difflib

    command = "watch" if watching else "run"
    if name in WATCH_OPTIONS:
        return f"crawlproc.run() has no option {name!r}: it is an option of crawlproc.watch()"
    close = difflib.get_close_matches(name, list(table), n=1)
    hint = (f"; did you mean {close[0]!r}?" if close else
            f" (a keyword is the name of an option of `crawlproc {command}`, with - as _)")
    return f"crawlproc.{command}() has no option {name!r}{hint}"


# -- the rules between options, and the job's RunOptions -----------------------------------

def processor_and_params(values: Mapping[str, Any], processor_given: bool) -> tuple[Any, dict[str, str]]:
    """-p and --param, or --cmd: the command line (and --ok-exit-codes, unless it is the
    default) become the `cmd` processor's params."""
    from crawlproc.processors.command import DEFAULT_OK_EXIT_CODES, OK_EXIT_CODES, format_exit_codes

    params = values["param"]
    if values["cmd"] is None:
        if values["ok_exit_codes"] is not None:
            raise UsageError("--ok-exit-codes goes with --cmd, e.g. --cmd 'grep -c x {}' --ok-exit-codes 0,1")
        return values["processor"], params
    if processor_given:
        raise UsageError("a command (--cmd, from Python cmd=) and a processor (-p, processor=) exclude each other")
    for name, what, option in (("cmd", "the command", "--cmd"), (OK_EXIT_CODES, "the exit codes", "--ok-exit-codes")):
        if name in params:
            raise UsageError(f"give {what} with {option}, not --param {name}=...")
    params = {**params, "cmd": values["cmd"]}
    if values["ok_exit_codes"] not in (None, DEFAULT_OK_EXIT_CODES):
        params[OK_EXIT_CODES] = format_exit_codes(values["ok_exit_codes"])
    return "cmd", params


def job_options(data_dir: Any, values: Mapping[str, Any], *, processor_given: bool) -> Any:
    """The RunOptions of a job from checked `values` (see `checked`)."""
    from crawlproc.run import RunOptions

    if values["scheduler"] is not None and values["executor"] != "dask":
        raise UsageError("--scheduler needs --executor dask")
    if values["output"] == "-":
        raise UsageError("output '-' (the records on stdout) is for the command line; from Python, "
                         "read them with crawlproc.open(out).records()")
    processor, params = processor_and_params(values, processor_given)
    if processor == "cmd" and values["chunk_size"]:
        raise UsageError("--cmd runs its command on whole files: with --chunk-size it would run once per byte "
                         "range on the whole file, so each file's output would be there several times")
    return RunOptions(
        data_dir=a_path(data_dir), out=values["out"], processor=processor, params=params,
        workers=values["workers"], include=values["include"], exclude=values["exclude"],
        max_tasks_per_child=values["max_tasks_per_child"], max_memory=values["max_memory_per_child"],
        max_memory_per_task=values["max_memory_per_task"], timeout=values["timeout"],
        retries=values["retries"], retry_delay=values["retry_delay"], max_failures=values["max_failures"],
        durable=values["durable"], retry_failed=values["retry_failed"], reprocess=values["reprocess"],
        keep_results=values["keep_results"], batch_size=values["batch_size"],
        follow_symlinks=values["follow_symlinks"], chunk_size=values["chunk_size"], output=values["output"],
        output_format=values["format"], merge=not values["no_merge"], source_column=values["source_column"],
        executor=values["executor"], scheduler=values["scheduler"], serve=values["serve"],
        carried=tuple(carried_args(values)),
    )


# The options a carry-on command repeats (status, retry and merge print one): how a run runs,
# not what it computes (OUT's identity says that), what it selects (kept with the scan's settings),
# where it runs (the runs row), a one-off action (--reprocess, --dry-run...) or how it looks.
CARRIED = ("workers", "max_tasks_per_child", "max_memory_per_child", "max_memory_per_task", "timeout", "retries",
           "retry_delay", "max_failures", "durable", "batch_size", "output", "format", "no_merge")
WATCH_CARRIED = ("settle", "rescan_interval", "merge_interval", "poll")  # and a watch's, carried on by a watch


def carried_args(values: Mapping[str, Any]) -> list[str]:
    """The CARRIED options of checked `values` (and a watch's WATCH_CARRIED) that are not at their
    defaults, as arguments."""
    args: list[str] = []
    for name in (*CARRIED, *(name for name in WATCH_CARRIED if name in values)):
        value = values[name]
        if value == WATCH_OPTIONS[name].default:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif name == "max_failures":
            number, percent = value
            args += [flag, f"{_plain_number(number)}{'%' if percent else ''}"]
        elif name == "output" and value != "-":
            args += [flag, os.path.abspath(value)]  # the same file from wherever it is run
        else:
            args += [flag, str(value)]
    return args


def _plain_number(number: float) -> str:
    """A number as the options read it back exactly: digits and a point, no exponent."""
    text = format(Decimal(repr(float(number))), "f")
    return text.removesuffix(".0")


def keyword_of(flag_name: str) -> str:
    """'--max-memory-per-child' -> 'max_memory_per_child': the API's name of a command-line option."""
    return flag_name.lstrip("-").replace("-", "_")
