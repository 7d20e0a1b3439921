"""The processor protocol: a function of a `Task`, a version, an optional reducer.

    @processor(version="1")
    def words(task): ...            # -> dict | iterable of dicts | None

    @words.reducer
    def total(records): ...          # all records, in merge order -> dict

    @words.preload
    def table(params): ...           # once, before the workers fork -> task.preloaded (shared)

    @words.setup
    def connection(params, preloaded): ...   # once per worker -> task.context; code after a
                                             # `yield` is its teardown (see hooks.py)

A processor is named on the command line by a built-in name, by
`package.module:function`, or by `path/to/file.py:function`; `load()` turns
that spec into a `Processor` in whichever process needs it (the coordinator for
the identity and the reducer, each worker for the function).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, overload

from crawlproc.errors import ProcessorLoadError

UNVERSIONED = "unversioned"


class Processor:
    """A processor function with its version and optional reducer."""

    def __init__(self, func: Callable[..., Any], version: str = UNVERSIONED, imports: Iterable[str] = ()) -> None:
        self.func = func
        self.version = str(version)
        # modules that the function imports when it runs, and that the workers' forkserver
        # imports once for all of them: loading the processor (the coordinator does) stays light
        self.imports = tuple(imports)
        self.reduce: Callable[[Iterable[dict]], Any] | None = None
        self.setup_hook: Callable[[Mapping[str, str], Any], Any] | None = None
        self.preload_hook: Callable[[Mapping[str, str]], Any] | None = None
        # a built-in's rules for its --param: UsageError (exit 2) at the start, not a failure per file
        self.check_params: Callable[[Mapping[str, str]], None] | None = None
        self.__doc__ = func.__doc__
        self.__name__ = getattr(func, "__name__", "processor")
        self.__wrapped__ = func

    def __call__(self, task: Any) -> Any:
        return self.func(task)

    def reducer(self, func: Callable[[Iterable[dict]], Any]) -> Callable[[Iterable[dict]], Any]:
        """Decorator: combine all records of a run into summary.json's `reduced`."""
        self.reduce = func
        return func

    def setup(self, func: Callable[[Mapping[str, str], Any], Any]) -> Callable[[Mapping[str, str], Any], Any]:
        """Decorator: `func(params, preloaded)` runs once in each worker process, before its first
        task; what it returns is `task.context` there. A generator function yields it instead, and
        the code after its `yield` is the teardown, run when the worker retires or stops. If it
        raises, the run stops at its start (exit 2) instead of failing every task."""
        self.setup_hook = func
        return func

    def preload(self, func: Callable[[Mapping[str, str]], Any]) -> Callable[[Mapping[str, str]], Any]:
        """Decorator: `func(params)` runs once before the workers are forked, in the process they
        fork from; what it returns is `task.preloaded` in every worker (and setup's second
        argument). Workers share its memory copy-on-write: treat it as read-only."""
        self.preload_hook = func
        return func

    @property
    def summary_line(self) -> str:
        doc = (self.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@overload
def processor(func: Callable[..., Any], /) -> Processor: ...
@overload
def processor(*, version: str = ..., imports: Iterable[str] = ...) -> Callable[[Callable[..., Any]], Processor]: ...


def processor(func: Callable[..., Any] | None = None, /, *, version: str = "1", imports: Iterable[str] = ()) -> Any:
    """Declare a processor; use as `@processor` or `@processor(version="2")`.

    Bump `version` when the function's output changes: an existing OUT made by
    another version is refused unless the run passes `--reprocess`. `imports`
    names modules the function imports inside (heavy ones, such as pyarrow):
    the workers' forkserver imports them once, and loading the processor does not.
    (Data to share between workers is a preload hook: see `Processor.preload`.)
    """
    if func is not None:
        return Processor(func, version)
    return lambda f: Processor(f, version, imports)


def normalise_spec(spec: str) -> str:
    """Make a spec independent of the current directory (files become absolute).

    Built-in and plugin names stay names (a plugin is looked up only when the
    name is not a built-in).
    """
    from crawlproc.processors import BUILTINS, find_plugin

    if spec in BUILTINS:
        return spec
    target, sep, func = spec.rpartition(":")
    if not sep:
        if spec and find_plugin(spec) is not None:
            return spec
    if not sep or not target or not func:
        raise ProcessorLoadError(
            f"processor {spec!r} is not a built-in or plugin name, 'package.module:function' "
            "or 'path/to/file.py:function' (see `crawlproc processors`)"
        )
    if target.endswith(".py") or os.sep in target:
        return f"{os.path.abspath(target)}:{func}"
    return spec


def processor_file(spec: str) -> str | None:
    """The file a normalised spec names (`path/to/file.py:function`), or None (a built-in, a
    plugin, a module)."""
    target, sep, _ = spec.rpartition(":")
    return target if sep and target.endswith(".py") else None


def spec_for_people(spec: str) -> str:
    """A normalised spec as people read it: a file below the current folder by its relative path."""
    target, sep, func = spec.rpartition(":")
    if sep and (target.endswith(".py") or os.sep in target):
        return f"{path_for_people(target)}:{func}"
    return spec


def path_for_people(path: str) -> str:
    """`path` relative to the current folder when it is below it, else as it is."""
    try:
        relative = os.path.relpath(path)
    except (ValueError, OSError):  # no current folder any more
        return path
    return path if relative.startswith("..") else relative


def load(spec: str) -> Processor:
    """Import the processor named by `spec` (already normalised or not)."""
    from crawlproc.processors import BUILTINS, find_plugin

    if spec in BUILTINS:
        spec = BUILTINS[spec]
    elif ":" not in spec and spec:
        entry_point = find_plugin(spec)
        if entry_point is not None:
            return _load_plugin(spec, entry_point)
    spec = normalise_spec(spec)
    target, _, func_name = spec.rpartition(":")
    module = _import_file(target) if processor_file(spec) else _import_module(target)
    try:
        obj = getattr(module, func_name)
    except AttributeError:
        raise _no_such_function(spec, module, func_name) from None
    if isinstance(obj, Processor):
        return obj
    if not callable(obj):
        raise ProcessorLoadError(f"processor {spec!r} is not callable")
    return Processor(obj)


def _load_plugin(name: str, entry_point: Any) -> Processor:
    """The processor of an entry point in the group `crawlproc.processors`."""
    try:
        obj = entry_point.load()
    except Exception as exc:
        raise ProcessorLoadError(
            f"cannot load plugin processor {name!r} ({entry_point.value}): {import_failure(exc)}"
        ) from None
    if isinstance(obj, Processor):
        return obj
    if not callable(obj):
        raise ProcessorLoadError(f"plugin processor {name!r} ({entry_point.value}) is not callable")
    return Processor(obj)


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise ProcessorLoadError(_located(exc) or f"cannot import processor module {name!r}: "
                                 f"{_exception_line(exc)}") from None


def _import_file(path: str) -> Any:
    if not os.path.isfile(path):
        raise ProcessorLoadError(f"processor file {path} does not exist")
    # A stable module name per file, so a worker and the coordinator agree and
    # records that reference module-level classes still pickle.
    name = "crawlproc_user_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size)
    cached = sys.modules.get(name)
    if cached is not None and getattr(cached, "__crawlproc_stamp__", None) == stamp:
        return cached  # else the file was edited since: load it again, as a worker would
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ProcessorLoadError(f"cannot load processor file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module.__crawlproc_stamp__ = stamp
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise ProcessorLoadError(_located(exc) or f"cannot load processor file {path_for_people(path)}: "
                                 f"{_exception_line(exc)}") from None
    return module


# -- load errors as people read them ----------------------------------------------------------

def import_failure(exc: BaseException) -> str:
    """An exception raised while importing a processor's module, in one line: where, what."""
    return _located(exc) or _exception_line(exc)


def _located(exc: BaseException) -> str | None:
    """`file:line: message` for a syntax error; `file:line: ExcType: message` at the deepest
    frame of the user's own code (not Python's, an installed package's, or crawlproc's); None
    when no such frame exists (a module that is not there)."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        line = (exc.text or "").strip().splitlines()[0] if (exc.text or "").strip() else ""
        shown = f" ({line})" if line and len(line) <= 60 else ""
        return f"{path_for_people(exc.filename)}:{exc.lineno}: {exc.msg}{shown}"
    frame = _deepest_user_frame(exc.__traceback__)
    if frame is None:
        return None
    filename, lineno = frame
    return f"{path_for_people(filename)}:{lineno}: {_exception_line(exc)}"


def _exception_line(exc: BaseException) -> str:
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__


def _deepest_user_frame(tb: Any) -> tuple[str, int] | None:
    import sysconfig

    paths = sysconfig.get_paths()
    not_users = tuple(os.path.join(os.path.realpath(paths[key]), "") for key in
                      ("stdlib", "platstdlib", "purelib", "platlib") if key in paths)
    not_users += (os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), ""),)
    found = None
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<") and not os.path.realpath(filename).startswith(not_users):
            found = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def _no_such_function(spec: str, module: Any, func_name: str) -> ProcessorLoadError:
    """A missing function, with the callables its module defines (and the nearest name)."""
    import difflib

    defined = sorted(name for name, obj in vars(module).items()
                     if not name.startswith("_") and callable(obj) and _defined_in(obj, module))
    where = spec_for_people(spec).rpartition(":")[0]
    listing = ", ".join(defined[:8]) + (f" and {len(defined) - 8} more" if len(defined) > 8 else "")
    close = difflib.get_close_matches(func_name, defined, n=1)
    return ProcessorLoadError(
        f"processor {spec_for_people(spec)}: {where} has no function {func_name!r}"
        + (f"; did you mean {close[0]!r}?" if close else "")
        + (f" (it defines {listing})" if defined else " (it defines no functions)")
    )


def _defined_in(obj: Any, module: Any) -> bool:
    """Whether `obj` was written in `module`, not imported into it."""
    inner = obj.func if isinstance(obj, Processor) else obj
    return getattr(inner, "__module__", None) == module.__name__
