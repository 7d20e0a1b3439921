"""A PATH given to `crawlproc explain` or `crawlproc retry`, as a relpath under OUT's DATA_DIR.

Both commands read a PATH the same way: an absolute path inside DATA_DIR; else a path
relative to the current folder, when that lies under DATA_DIR (as typed in a shell
there); else relative to DATA_DIR (as `status` and `failures` print paths). When both
readings are under DATA_DIR, the one the ledger has a task for wins, so a path that
`failures` or `explain` printed works from any folder. A relative PATH that names no
task and nothing under DATA_DIR is read from the current folder alone: DATA_DIR's own
name typed in its parent is DATA_DIR, and an existing file elsewhere is not under it.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path

from crawlproc.errors import UsageError


DATA_DIR_ITSELF = b""  # what relpath_under gives for DATA_DIR itself


def relpath_under(path: str, data_dir: str, out: Path, has_task: Callable[[bytes], bool] = lambda _: False) -> bytes:
    """PATH as a relpath under DATA_DIR (bytes), DATA_DIR_ITSELF when that is the only reading;
    UsageError when it is not under it."""
    root = os.fsencode(data_dir)
    given = os.fsencode(path)
    candidates = [given] if os.path.isabs(given) else [os.path.abspath(given), os.path.join(root, given)]
    if not os.path.isabs(given) and not inside(os.path.abspath(given), root):
        candidates.reverse()  # relative to the current folder only where that is under DATA_DIR
    spellings = [spelled for candidate in candidates for spelled in _spellings(candidate) if inside(spelled, root)]
    readings = [os.path.relpath(spelled, root).replace(os.sep.encode(), b"/") for spelled in spellings
                if spelled != root]
    with_task = next((relpath for relpath in readings if has_task(relpath)), None)
    if with_task is not None:
        return with_task
    if not os.path.isabs(given) and not any(os.path.lexists(os.path.join(root, r)) for r in readings):
        # No task and no file under DATA_DIR by that name: what the current folder holds decides.
        here = os.path.abspath(given)
        if os.path.realpath(here) == root:  # DATA_DIR's own name (or a link to it), typed in its parent
            return DATA_DIR_ITSELF
        if os.path.lexists(here):  # a file out there, not a name under DATA_DIR
            raise _not_under(path, data_dir, out)
    if readings:
        return readings[0]
    if spellings:  # DATA_DIR itself (`.` typed in it, or its own path): no file of it fits better
        return DATA_DIR_ITSELF
    raise _not_under(path, data_dir, out)


def _not_under(path: str, data_dir: str, out: Path) -> UsageError:
    return UsageError(f"{path} is not under DATA_DIR {data_dir} of OUT {out}; give a path inside it "
                      f"(absolute, or relative to it as `crawlproc failures -o {shlex.quote(str(out))}` prints them)")


def _spellings(path: bytes) -> list[bytes]:
    """The path as written, and with its folder's links resolved (DATA_DIR is kept resolved)."""
    plain = os.path.normpath(path)
    return [plain, os.path.join(os.path.realpath(os.path.dirname(plain)), os.path.basename(plain))]


def inside(path: bytes, root: bytes) -> bool:
    """`path` is `root` or under it (both normalised and absolute)."""
    return path == root or path.startswith(root.rstrip(b"/") + b"/")


def path_argument(relpath: str) -> str:
    """A relpath as the last word of a command to copy: quoted, after `--` if it would read as
    an option (a file named `-x` or `--`)."""
    return f"-- {shlex.quote(relpath)}" if relpath.startswith("-") else shlex.quote(relpath)
