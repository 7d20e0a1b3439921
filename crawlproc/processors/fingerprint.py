"""The fingerprint of a processor's code: edited code makes another processor.

    built-in processor (and --cmd) ─> "built-in"            its version says it all (maintainers bump it)
    plugin (an entry point name)   ─> "plugin DIST VERSION"  its distribution's name and version
    user code (file.py:func, package.module:function)
        the function ─┬─ code object: bytecode, constants, names, flags; nested code objects too
                      │   (inner functions, lambdas, comprehensions)
                      ├─ default arguments, closure cells
                      ├─ the reducer, and the setup and preload hooks if any, hashed the same way
                      ├─ the globals its code loads by name that are functions, classes or
                      │   processors of its own module, transitively (a class by its bases,
                      │   methods, and the attributes its body assigns a literal: `RATE = 2`,
                      │   a dataclass field's default); another module's function or class
                      │   counts by its name only
                      └─ the globals its code loads by name that its module's source assigns a
                          literal at top level (`SCALE = 1000`, `NAMES: tuple = ("a", "b")`):
                          each such assignment's value, in source order
        ─> a BLAKE2 digest, kept with the Python version (bytecode differs between minor versions)

Left out on purpose: line numbers, line tables, file names and docstrings, so a comment, a blank
line, a moved function or a reworded docstring keep the fingerprint; and the values of module
globals computed at import (`SEED = random.random()`, `TOKEN = os.environ["TOKEN"]`, a setting
read from a file): they are not code, and would make every rerun look edited. A literal is
compared by its value, so `SCALE=1_000` is `SCALE = 1000`. Without the module's source (a
notebook's processor, a file gone since it was imported) no global's value counts.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import types
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any, NamedTuple

from crawlproc.processors.base import Processor

BUILT_IN = "built-in"
CO_OPTIMIZED = 0x1  # a function's code (not a class or module body)
CO_HAS_DOCSTRING = 0x4000000  # Python 3.14+: co_consts[0] is the docstring
_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
# Class attributes that say where or how a class was written, not what it does.
_CLASS_HOUSEKEEPING = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__",
                                 "__firstlineno__", "__static_attributes__"})
_NOT_A_LITERAL = object()


class CodeFingerprint(NamedTuple):
    """What a processor's code is, as kept in OUT's identity."""

    digest: str  # "built-in", "plugin DIST VERSION", or the hex digest of the code
    python: str | None  # "cpython 3.11" when `digest` hashes bytecode, else None


def python_version() -> str:
    """The interpreter whose bytecode a digest hashes: its implementation and minor version."""
    return f"{sys.implementation.name} {sys.version_info.major}.{sys.version_info.minor}"


def fingerprint(spec: str, proc: Processor) -> CodeFingerprint:
    """The fingerprint of `proc`, loaded from `spec` (a built-in or plugin name, or a path/module spec)."""
    from crawlproc.processors import BUILTINS, find_plugin

    home = _module_of(proc.func)
    if spec in BUILTINS or home == "crawlproc" or home.startswith("crawlproc."):
        return CodeFingerprint(BUILT_IN, None)
    if ":" not in spec:
        dist = getattr(find_plugin(spec), "dist", None)
        if dist is not None:
            return CodeFingerprint(f"plugin {dist.name} {dist.version}", None)
    return CodeFingerprint(code_digest(proc), python_version())


def code_digest(proc: Processor, *, literals: bool = True, class_literals: bool = True) -> str:
    """The hex digest of a processor's function and reducer (see the module docstring); without
    `literals` or `class_literals`, as earlier crawlprocs gave it (see earlier_digests)."""
    hasher = _CodeHasher(_module_of(proc.func), literals=literals, class_literals=class_literals)
    if literals and class_literals:
        # Today's digests start with this tag, which no earlier crawlproc's did: an earlier form
        # of edited code can never equal a stamp made by this crawlproc (see earlier_digests).
        hasher.put("scheme", CURRENT_SCHEME)
    hasher.top(proc)
    return hasher.hexdigest()


CURRENT_SCHEME = "3"  # 1: no constant counted; 2: module constants; 3: and classes' constants
# What earlier crawlprocs left out of the digest, oldest first: every literal, then the literal
# attributes of classes (module constants already counted).
_EARLIER_DIGESTS = ({"literals": False}, {"class_literals": False})


def earlier_digests(spec: str, proc: Processor) -> frozenset[str]:
    """The digests earlier crawlprocs, whose fingerprints left constants out, gave this very
    code. An OUT stamped with one ran this code as far as that crawlproc could tell
    (identity.judge adopts it). None of them can equal a stamp of today's crawlproc (its
    digests are tagged), so code edited since such a stamp is never adopted as unchanged."""
    if fingerprint(spec, proc).python is None:  # built-in or plugin: not a digest of code
        return frozenset()
    return frozenset(code_digest(proc, **left_out) for left_out in _EARLIER_DIGESTS)


def _module_of(obj: Any) -> str:
    module = _attribute(obj, "__module__")
    return module if isinstance(module, str) else type(obj).__module__


def _attribute(obj: Any, name: str) -> Any:
    """obj.name, or None: a proxy or lazy object in the user's module may raise anything."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


class _CodeHasher:
    """Feeds one processor's code, and what it reaches in its own module, into one digest.

    Every item goes in as a tag and a length-prefixed payload, so no two different
    sequences of items can feed the same bytes. An object reached twice (recursion,
    a helper used by two functions) is hashed once and then named by the order in
    which it was first met.
    """

    def __init__(self, home_module: str, *, literals: bool = True, class_literals: bool = True) -> None:
        self.home = home_module
        self.literals = literals  # module constants written as literals count (see earlier_digests)
        self.class_literals = literals and class_literals  # and so do class attributes written so
        self._hash = hashlib.blake2b(digest_size=16)
        self._met: dict[int, int] = {}
        self._open_containers: set[int] = set()  # a list that holds itself must not recurse forever
        # A module's source, parsed once for its constants and its classes', by id of its globals
        # (the functions and classes hashed keep them alive meanwhile).
        self._trees: dict[int, ast.Module | None] = {}
        self._literals_by_module: dict[int, dict[str, list[_Literal]]] = {}

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def put(self, tag: str, payload: bytes | str = b"") -> None:
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        self._hash.update(f"{tag}:{len(data)}:".encode() + data)

    def top(self, proc: Processor) -> None:
        """The processor being fingerprinted; its version is kept beside the digest, not in it."""
        self._met[id(proc)] = len(self._met)
        self.processor(proc)

    def processor(self, proc: Processor) -> None:
        self.put("processor")
        self.reference(proc.func)
        self.put("reducer")
        self.reference(proc.reduce)
        for hook in ("setup", "preload"):  # only when there is one: older digests stay valid
            func = getattr(proc, f"{hook}_hook", None)
            if func is not None:
                self.put(hook)
                self.reference(func)

    # -- what a name refers to ----------------------------------------------------------------
    def reference(self, obj: Any) -> None:
        """Hash code of our own module; name what comes from elsewhere; a value counts by its kind."""
        if self._met_before(obj):
            return
        if isinstance(obj, Processor):
            self.put("version", obj.version)
            self.processor(obj)
        elif isinstance(obj, partial):
            self.put("partial")
            self.reference(obj.func)
            self.value(obj.args)
            self.value(obj.keywords)
        elif isinstance(obj, types.ModuleType):
            self.put("module", obj.__name__)
        elif isinstance(obj, types.MethodType):  # bound to an object: its function is the code
            self.put("method")
            self.reference(obj.__func__)
        elif isinstance(obj, types.FunctionType) and _module_of(obj) == self.home:
            self.function(obj)
        elif isinstance(obj, type) and _module_of(obj) == self.home:
            self.klass(obj)
        elif isinstance(_attribute(obj, "__wrapped__"), types.FunctionType):  # lru_cache and the like
            self.put("wrapped", self.name_of(type(obj)))
            self.reference(obj.__wrapped__)
        elif callable(obj) and isinstance(_attribute(obj, "__qualname__"), str):  # another module's function
            self.put("elsewhere", self.name_of(obj))
        elif _module_of(type(obj)) == self.home:  # an instance of one of our classes
            self.put("instance")
            self.reference(type(obj))
        else:
            self.put("value", self.name_of(type(obj)))

    def name_of(self, obj: Any) -> str:
        """module.qualname; our own module unnamed, since a file's module name comes from its path."""
        module = _module_of(obj)
        return f"{'' if module == self.home else module}.{obj.__qualname__}"

    def _met_before(self, obj: Any) -> bool:
        if not isinstance(obj, (types.FunctionType, type, Processor)):
            return False
        order = self._met.get(id(obj))
        if order is not None:
            self.put("again", str(order))
            return True
        self._met[id(obj)] = len(self._met)
        return False

    def function(self, func: types.FunctionType) -> None:
        self.put("function")
        self.code(func.__code__)
        self.put("defaults")
        self.value(func.__defaults__)
        self.value(func.__kwdefaults__)
        self.put("closure")
        for cell in func.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # a cell not filled yet
                self.put("empty cell")
                continue
            self.value(contents)
        literals = self.literals_of(func.__globals__) if self.literals else {}
        for name in sorted(set(_global_loads(func.__code__))):
            if name in func.__globals__:
                self.put("global", name)
                self.reference(func.__globals__[name])
            if name in literals:  # only then: the digest of code that uses no literal global stays as it was
                self.assigned("literal", name, literals[name])

    def assigned(self, tag: str, name: str, literals: list[_Literal]) -> None:
        """The literal assignments of `name` (a module's constant, a class's attribute), in order."""
        self.put(tag, name)
        for literal in literals:
            self.put("assigned", literal.operator)
            self.value(literal.value)

    def tree_of(self, module_globals: Mapping[str, Any]) -> ast.Module | None:
        """The parsed source of the module whose globals these are (None: it has none)."""
        key = id(module_globals)
        if key not in self._trees:
            self._trees[key] = _parsed(_module_source(module_globals))
        return self._trees[key]

    def literals_of(self, module_globals: Mapping[str, Any]) -> dict[str, list[_Literal]]:
        """The literal assignments at the top of a function's module (its globals)."""
        key = id(module_globals)
        if key not in self._literals_by_module:
            tree = self.tree_of(module_globals)
            self._literals_by_module[key] = _literal_assignments(tree.body if tree else [])
        return self._literals_by_module[key]

    def class_literals_of(self, cls: type) -> dict[str, list[_Literal]]:
        """The literal assignments of the body of `cls`, found in its module's source by its
        qualified name. Every definition of that name counts (a class defined twice, or in both
        branches of a try): at worst a needless refusal, never mixed records."""
        module = sys.modules.get(_module_of(cls)) if self.class_literals else None
        tree = self.tree_of(vars(module)) if module is not None else None
        found: dict[str, list[_Literal]] = {}
        for body in _class_bodies(tree, cls.__qualname__) if tree is not None else ():
            for attribute, literals in _literal_assignments(body).items():
                found.setdefault(attribute, []).extend(literals)
        return found

    def klass(self, cls: type) -> None:
        self.put("class", cls.__name__)
        for base in cls.__bases__:
            self.reference(base)
        for name, attr in cls.__dict__.items():
            if name in _CLASS_HOUSEKEEPING:
                continue
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, property):
                self.put("property", name)
                for accessor in (attr.fget, attr.fset, attr.fdel):
                    self.reference(accessor)
            elif isinstance(attr, (types.FunctionType, type, partial, Processor)):
                self.put("member", name)
                self.reference(attr)
        for name, literals in self.class_literals_of(cls).items():  # in source order
            self.assigned("class literal", name, literals)

    # -- code objects and constants -----------------------------------------------------------
    def code(self, code: types.CodeType) -> None:
        self.put("code", code.co_name)
        self.put("bytecode", code.co_code)
        self.put("exceptions", getattr(code, "co_exceptiontable", b""))
        self.put("shape", f"{code.co_argcount} {code.co_posonlyargcount} {code.co_kwonlyargcount} "
                          f"{code.co_flags}")
        for tag, names in (("names", code.co_names), ("locals", code.co_varnames),
                           ("free", code.co_freevars), ("cells", code.co_cellvars)):
            self.put(tag, "\0".join(names))
        consts = code.co_consts
        if _has_docstring(code):
            consts = (None, *consts[1:])  # a docstring is documentation, as a comment is
        self.put("consts", str(len(consts)))
        for const in consts:
            self.value(const)

    def value(self, value: Any) -> None:
        """A constant, a default or a closure value: its type and content."""
        kind = type(value)
        if value is None or value is Ellipsis or kind in (bool, int, float, complex):
            self.put(kind.__name__, repr(value))
        elif kind in (str, bytes):
            self.put(kind.__name__, value)
        elif kind is types.CodeType:
            self.code(value)
        elif kind in (tuple, list, dict):
            self.container(value)
        elif kind in (set, frozenset):  # hashed in a stable order: a set's order changes between runs
            self.put(kind.__name__, b"".join(sorted(self._digest_of_value(item) for item in value)))
        else:
            self.reference(value)

    def _digest_of_value(self, value: Any) -> bytes:
        """A set's item, hashed alone (so that the set's order does not count), the same way."""
        hasher = _CodeHasher(self.home, literals=self.literals, class_literals=self.class_literals)
        hasher.value(value)
        return hasher._hash.digest()

    def container(self, value: tuple | list | dict) -> None:
        if id(value) in self._open_containers:
            self.put("itself")
            return
        self._open_containers.add(id(value))
        self.put(type(value).__name__, str(len(value)))
        for item in value.items() if isinstance(value, dict) else value:  # in order: it can reach the output
            self.value(item)
        self._open_containers.discard(id(value))


class _Literal(NamedTuple):
    """One top-level assignment of a literal to a name: `=` (plain or annotated), or `Add`... for `+=`."""

    operator: str
    value: Any


def _parsed(source: str | None) -> ast.Module | None:
    if source is None:
        return None
    try:
        return ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # e.g. a file broken since the import
        return None


_DEFINITIONS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _class_bodies(tree: ast.Module, qualname: str) -> list[list[ast.stmt]]:
    """The body of each class statement that defines `qualname` ("A.B", "make.<locals>.C")."""
    parts = qualname.split(".")
    bodies = [tree.body]
    for i, name in enumerate(parts):
        if name == "<locals>":
            continue
        in_function = i + 1 < len(parts) and parts[i + 1] == "<locals>"
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if in_function else (ast.ClassDef,)
        bodies = [node.body for body in bodies for node in _statements(body)
                  if isinstance(node, kinds) and node.name == name]
    return bodies


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """The statements of `body` and of the blocks in it (if, try, with, for, while, match),
    not of the functions and classes it defines."""
    for statement in body:
        yield statement
        if isinstance(statement, _DEFINITIONS):
            continue
        for field in ("body", "orelse", "finalbody"):
            inner = getattr(statement, field, None)
            if isinstance(inner, list):
                yield from _statements(inner)
        for clause in (*getattr(statement, "handlers", ()), *getattr(statement, "cases", ())):
            yield from _statements(clause.body)


def _literal_assignments(body: list[ast.stmt]) -> dict[str, list[_Literal]]:
    """Each name that the statements of `body` (a module's or a class's) assign a literal, with
    those assignments in order.

    A name assigned several times keeps each literal one, in order, and nothing of the others:
    each literal is code wherever it sits, so its edit counts even when a computed assignment
    follows (at worst a needless refusal, never mixed records); a computed value counts nowhere.
    Assignments inside `if`, `try` or functions are left out, as module code is.
    """
    found: dict[str, list[_Literal]] = {}
    for statement in body:
        for name, operator, node in _assignments(statement):
            value = _literal_value(node)
            if value is not _NOT_A_LITERAL:
                found.setdefault(name, []).append(_Literal(operator, value))
    return found


def _assignments(statement: ast.stmt) -> Iterator[tuple[str, str, ast.expr]]:
    """(name, operator, value) for each plain name that `statement` assigns; unpacking is left out."""
    if isinstance(statement, ast.Assign):
        for target in statement.targets:  # A = B = 1 assigns both
            if isinstance(target, ast.Name):
                yield target.id, "=", statement.value
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        if isinstance(statement.target, ast.Name):
            yield statement.target.id, "=", statement.value
    elif isinstance(statement, ast.AugAssign) and isinstance(statement.target, ast.Name):
        yield statement.target.id, type(statement.op).__name__, statement.value


def _literal_value(node: ast.expr) -> Any:
    """The value of a literal (numbers, strings, bytes, containers of them, True, False, None),
    or _NOT_A_LITERAL for anything else."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return _NOT_A_LITERAL


def _module_source(module_globals: Mapping[str, Any]) -> str | None:
    """The source of the module whose globals these are, or None when its loader has none."""
    spec = module_globals.get("__spec__")
    loader = _attribute(spec, "loader") or module_globals.get("__loader__")
    name = _attribute(spec, "name") or module_globals.get("__name__")  # `python -m m`: __main__ loaded as m
    try:
        return loader.get_source(name)
    except Exception:  # no loader (a notebook), one without sources, or the file gone since the import
        return None


def _has_docstring(code: types.CodeType) -> bool:
    """Whether co_consts[0] is the docstring of the function this code is the body of."""
    if not code.co_consts or not isinstance(code.co_consts[0], str):
        return False
    if sys.version_info >= (3, 14):
        return bool(code.co_flags & CO_HAS_DOCSTRING)
    # Before 3.14 a def's code always starts its constants with the docstring or None;
    # lambdas and comprehensions (named <lambda>, <listcomp>...) have no docstring.
    return bool(code.co_flags & CO_OPTIMIZED) and not code.co_name.startswith("<")


def _global_loads(code: types.CodeType) -> Iterator[str]:
    """The global names this code and the code nested in it load."""
    import dis

    for instruction in dis.get_instructions(code):
        if instruction.opname in _GLOBAL_LOADS:
            yield instruction.argval
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_loads(const)
