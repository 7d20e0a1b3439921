"""A processor given as a function object (the Python API), on its way to the worker processes.

    function of an importable module ───────> by reference: its spec, as -p names it (mypkg.procs:words;
                                              a processor file's path; a built-in's name)
    function of __main__ (a script, a notebook
    cell), a lambda, a nested function ─────> by value: `pack` pickles the Processor, its function
                                              (code object by marshal) and what the code uses: the
                                              globals it loads, defaults, closure cells; functions
                                              of __main__ it calls go by value too, modules by name
        WorkerConfig.shipped ──> forkserver / worker: `unpack` rebuilds the functions in a namespace
                                 of their own. The caller's __main__ is never imported again, so a
                                 script needs no `if __name__ == "__main__":` guard.

Refused, naming the culprit (ProcessorLoadError): a class defined in __main__, or an instance of
one (its definition would have to travel too: move it to a module), and values that do not pickle
(an open file, a lock, a connection: open those in a @processor.setup hook instead). Marshalled
code runs only under the Python that made it: a Dask worker must run the coordinator's version.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import io
import marshal
import os
import pickle
import secrets
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from crawlproc.errors import ProcessorLoadError
from crawlproc.processors.base import Processor

MAIN = "__main__"
SHIPPED_MODULE = "crawlproc_shipped"  # __name__ of the namespace shipped functions live in
_FILE_MODULE_PREFIX = "crawlproc_user_"  # base._import_file's module names


class ProcessorRef(NamedTuple):
    """How a processor object given to the Python API is named, and how workers get it."""

    spec: str  # what the run's identity records; "__main__:name" for one sent by value
    processor: Processor
    shipped: bytes | None  # `pack`ed, when workers cannot import it
    import_paths: tuple[str, ...]  # this process's sys.path, so workers import what it imported


def is_shipped_spec(spec: str | None) -> bool:
    """Whether OUT's processor was sent by value: no command line can load it again."""
    return bool(spec) and spec.startswith(MAIN + ":")


def processor_ref(obj: Callable[..., Any]) -> ProcessorRef:
    """The ref of a processor function (decorated with @processor or not)."""
    proc = obj if isinstance(obj, Processor) else Processor(obj)
    spec = _importable_spec(obj, proc)
    if spec is not None:
        return ProcessorRef(spec, proc, None, tuple(path for path in sys.path if path))
    return ProcessorRef(f"{MAIN}:{proc.__name__}", proc, pack(proc), ())


def _importable_spec(obj: Any, proc: Processor) -> str | None:
    """module:name when a fresh interpreter finds `obj` by importing its module (not __main__)."""
    from crawlproc.processors import BUILTINS

    module_name = getattr(proc.func, "__module__", None)
    qualname = getattr(proc.func, "__qualname__", "")
    module = sys.modules.get(module_name or "")
    if module is None or module_name == MAIN or "." in qualname or getattr(module, qualname, None) is not obj:
        return None
    if module_name.startswith(_FILE_MODULE_PREFIX) and getattr(module, "__file__", None):
        return f"{module.__file__}:{qualname}"  # a processor file loaded by its path
    spec = f"{module_name}:{qualname}"
    return next((name for name, builtin in BUILTINS.items() if builtin == spec), spec)


# -- by value ------------------------------------------------------------------------------------

def pack(proc: Processor) -> bytes:
    """The processor by value (see the module docstring); ProcessorLoadError naming what cannot go."""
    stream = io.BytesIO()
    try:
        pickle.dump(_python(), stream)
        _Packer(stream, secrets.token_hex(8)).dump(proc)
    except Exception as exc:
        raise ProcessorLoadError(f"processor {proc.__name__} cannot be sent to the worker processes: "
                                 f"{_culprit(proc) or _reason(exc)}") from None
    return stream.getvalue()


_UNPACKED: dict[bytes, Processor] = {}


def unpack(shipped: bytes) -> Processor:
    """The processor `pack` made (rebuilt once per process: a forked worker reuses its server's)."""
    key = hashlib.blake2b(shipped, digest_size=16).digest()
    if key not in _UNPACKED:
        stream = io.BytesIO(shipped)
        made_by = pickle.load(stream)
        if made_by != _python():
            raise ProcessorLoadError(f"the processor was sent by {made_by} and cannot run under {_python()}: "
                                     "run the workers with the coordinator's Python")
        _UNPACKED[key] = pickle.load(stream)
    return _UNPACKED[key]


def load_for_worker(spec: str, shipped: bytes | None, import_paths: tuple[str, ...] = ()) -> Processor:
    """The processor of a worker's config: sent by value, or loaded by its spec (with the
    coordinator's import paths after this interpreter's own)."""
    if shipped is not None:
        return unpack(shipped)
    from crawlproc.processors.base import load

    sys.path.extend(path for path in import_paths if path not in sys.path and os.path.isdir(path))
    return load(spec)


def _python() -> str:
    return f"{sys.implementation.name} {sys.version_info.major}.{sys.version_info.minor}"


def _by_value(func: types.FunctionType) -> bool:
    """A function a fresh interpreter cannot import by its module and name."""
    module = sys.modules.get(func.__module__ or "")
    if module is None or func.__module__ == MAIN:
        return True
    target: Any = module
    for part in func.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is not func


def _global_names(code: types.CodeType) -> Iterator[str]:
    """Names the code (and the code nested in it) may load as globals."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


class _Packer(pickle.Pickler):
    """pickle, with functions that cannot be imported sent by value (code and what it uses)."""

    def __init__(self, stream: io.BytesIO, bundle: str) -> None:
        super().__init__(stream, protocol=pickle.HIGHEST_PROTOCOL)
        self.bundle = bundle  # functions of one namespace share one rebuilt namespace
        self.namespaces: dict[int, int] = {}

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) and _by_value(obj):
            return self._function(obj)
        if isinstance(obj, types.ModuleType):
            if obj.__name__ == MAIN:
                raise _Refused("the module __main__")
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, type) and obj.__module__ == MAIN:
            raise _Refused(f"class {obj.__qualname__}, defined in __main__ (move it to a module)")
        if type(obj).__module__ == MAIN:
            raise _Refused(f"a {type(obj).__qualname__} object, whose class is defined in __main__ "
                           "(move the class to a module)")
        return NotImplemented

    def _function(self, func: types.FunctionType) -> tuple:
        namespace = self.namespaces.setdefault(id(func.__globals__), len(self.namespaces))
        used = {name: func.__globals__[name] for name in sorted(set(_global_names(func.__code__)))
                if name in func.__globals__}
        cells = [_cell_value(cell) for cell in func.__closure__ or ()]
        state = (used, func.__defaults__, func.__kwdefaults__, cells, func.__qualname__, func.__doc__,
                 dict(func.__dict__))
        skeleton_args = (marshal.dumps(func.__code__), func.__name__, self.bundle, namespace, len(cells))
        return _skeleton, skeleton_args, state, None, None, _restore


class _Refused(Exception):
    """What `_Packer` will not send."""


def _cell_value(cell: types.CellType) -> tuple[bool, Any]:
    try:
        return True, cell.cell_contents
    except ValueError:  # not filled yet
        return False, None


_NAMESPACES: dict[tuple[str, int], dict[str, Any]] = {}


def _skeleton(code: bytes, name: str, bundle: str, namespace: int, cells: int) -> types.FunctionType:
    """An empty function, filled by `_restore` once what it refers to exists (it may refer to itself)."""
    globals_ = _NAMESPACES.setdefault((bundle, namespace), {"__builtins__": builtins, "__name__": SHIPPED_MODULE})
    return types.FunctionType(marshal.loads(code), globals_, name, None,
                              tuple(types.CellType() for _ in range(cells)) or None)


def _restore(func: types.FunctionType, state: tuple) -> None:
    used, defaults, kwdefaults, cells, qualname, doc, attributes = state
    func.__globals__.update(used)
    func.__defaults__, func.__kwdefaults__ = defaults, kwdefaults
    func.__qualname__, func.__doc__ = qualname, doc
    func.__dict__.update(attributes)
    for cell, (filled, value) in zip(func.__closure__ or (), cells):
        if filled:
            cell.cell_contents = value


# -- saying what cannot go -----------------------------------------------------------------------

def _culprit(proc: Processor) -> str | None:
    """'words uses TABLE: <why>': the first name a function sent by value uses that cannot go."""
    seen: set[int] = set()
    hooks = (proc.func, proc.reduce, getattr(proc, "setup_hook", None), getattr(proc, "preload_hook", None))
    pending = [func for func in hooks if isinstance(func, types.FunctionType)]
    while pending:
        func = pending.pop()
        if id(func) in seen or not _by_value(func):
            continue
        seen.add(id(func))
        for what, value in _uses(func):
            if isinstance(value, types.FunctionType):
                pending.append(value)
                continue
            problem = _pickle_problem(value)
            if problem:
                return f"{func.__qualname__} uses {what}: {problem}"
    return None


def _uses(func: types.FunctionType) -> Iterator[tuple[str, Any]]:
    for name in sorted(set(_global_names(func.__code__))):
        if name in func.__globals__:
            yield name, func.__globals__[name]
    for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
        filled, value = _cell_value(cell)
        if filled:
            yield name, value
    for index, value in enumerate(func.__defaults__ or ()):
        yield f"default #{index + 1}", value
    for name, value in (func.__kwdefaults__ or {}).items():
        yield f"default of {name}", value


def _pickle_problem(value: Any) -> str | None:
    try:
        _Packer(io.BytesIO(), "check").dump(value)
    except Exception as exc:  # noqa: BLE001 - any failure is the reason it cannot go
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Refused):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
