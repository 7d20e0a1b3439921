"""The processor protocol: a function of a `Task`, a version, an optional reducer.

    @processor(version="1")
    def words(task): ...            # -> dict | iterable of dicts | None

    @words.reducer
    def total(records): ...          # all records, in merge order -> dict

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
from collections.abc import Callable, Iterable
from typing import Any, overload

from crawlproc.errors import ProcessorLoadError

UNVERSIONED = "unversioned"


class Processor:
    """A processor function with its version and optional reducer."""

    def __init__(self, func: Callable[..., Any], version: str = UNVERSIONED) -> None:
        self.func = func
        self.version = str(version)
        self.reduce: Callable[[Iterable[dict]], Any] | None = None
        self.__doc__ = func.__doc__
        self.__name__ = getattr(func, "__name__", "processor")
        self.__wrapped__ = func

    def __call__(self, task: Any) -> Any:
        return self.func(task)

    def reducer(self, func: Callable[[Iterable[dict]], Any]) -> Callable[[Iterable[dict]], Any]:
        """Decorator: combine all records of a run into summary.json's `reduced`."""
        self.reduce = func
        return func

    @property
    def summary_line(self) -> str:
        doc = (self.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


@overload
def processor(func: Callable[..., Any], /) -> Processor: ...
@overload
def processor(*, version: str = ...) -> Callable[[Callable[..., Any]], Processor]: ...


def processor(func: Callable[..., Any] | None = None, /, *, version: str = "1") -> Any:
    """Declare a processor; use as `@processor` or `@processor(version="2")`.

    Bump `version` when the function's output changes: an existing OUT made by
    another version is refused unless the run passes `--reprocess`.
    """
    if func is not None:
        return Processor(func, version)
    return lambda f: Processor(f, version)


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
    module = _import_file(target) if target.endswith(".py") else _import_module(target)
    try:
        obj = getattr(module, func_name)
    except AttributeError:
        raise ProcessorLoadError(f"processor {spec!r}: {target} has no attribute {func_name!r}") from None
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
            f"cannot load plugin processor {name!r} ({entry_point.value}): {exc!r}"
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
        raise ProcessorLoadError(f"cannot import processor module {name!r}: {exc!r}") from None


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
        raise ProcessorLoadError(f"cannot load processor file {path}: {exc!r}") from None
    return module
