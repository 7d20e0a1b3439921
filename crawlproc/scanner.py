"""Walking DATA_DIR: a pure iterator of file entries, then the glue that feeds the ledger.

    walk(root) ──FileEntry──> Scan.step() ──rows (one per task)──> Ledger.upsert_scanned
                                                   └─ finish(): files not seen -> gone

The walk works on bytes so that any file name, UTF-8 or not, is kept exactly.
It never opens a file (a FIFO would block), visits folders in sorted order,
and prunes excluded folders, OUT, unreadable folders and symlink loops.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, NamedTuple

from crawlproc.listing import DIR, FILE, OTHER, UNREADABLE, VANISHED, HelperLister, LocalLister

if TYPE_CHECKING:
    from crawlproc.ledger import Ledger

SkipReporter = Callable[[bytes, str], None]


class FileEntry(NamedTuple):  # a tuple: the walk makes one per file
    relpath: bytes  # POSIX, relative to DATA_DIR, exact bytes
    size: int
    mtime_ns: int


_new_tuple = tuple.__new__  # _new_tuple(FileEntry, (...)) skips NamedTuple's Python-level __new__


@dataclass(frozen=True)
class ScanOptions:
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    follow_symlinks: bool = False
    skip_dirs: frozenset[tuple[int, int]] = field(default_factory=frozenset)  # (st_dev, st_ino), e.g. OUT
    chunk_size: int | None = None  # files larger than this become byte-range tasks
    # Skipped like --exclude, but tasks an earlier run made of such files are kept,
    # not marked gone (watch mode's temp names: `run` may have processed them).
    ignore: Sequence[str] = ()


class PathFilter:
    """--include/--exclude globs on the path relative to DATA_DIR.

    A pattern without '/' matches a name in any folder (like .gitignore);
    a pattern with '/' matches the whole relative path. '*' crosses '/'.
    """

    def __init__(self, include: Sequence[str], exclude: Sequence[str]) -> None:
        self._include = _compile(include)
        self._exclude = _compile(exclude)

    def wants_file(self, relpath: str, name: str) -> bool:
        if self._exclude and _matches(self._exclude, relpath, name):
            return False
        return not self._include or _matches(self._include, relpath, name)

    def prunes_dir(self, relpath: str, name: str) -> bool:
        return bool(self._exclude) and _matches(self._exclude, relpath, name)

    def excludes_any_part(self, relpath: bytes) -> bool:
        """Does an exclude pattern match this path or one of its folders (as a walk would prune)?"""
        parts = os.fsdecode(relpath).split("/")
        return any(self.prunes_dir("/".join(parts[:depth]), parts[depth - 1])
                   for depth in range(1, len(parts) + 1))


def _compile(patterns: Sequence[str]) -> tuple[re.Pattern | None, re.Pattern | None] | None:
    if not patterns:
        return None
    by_name = [p for p in patterns if "/" not in p]
    by_path = [p for p in patterns if "/" in p]
    by_path += [p[3:] for p in by_path if p.startswith("**/")]  # '**/x' also matches 'x' at the top
    return (_regex(by_name), _regex(by_path))


def _regex(patterns: list[str]) -> re.Pattern | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def _matches(compiled: tuple[re.Pattern | None, re.Pattern | None], relpath: str, name: str) -> bool:
    by_name, by_path = compiled
    return bool((by_name and by_name.match(name)) or (by_path and by_path.match(relpath)))


def walk(
    root: bytes,
    options: ScanOptions,
    on_skip: SkipReporter | None = None,
    unreadable: list[bytes] | None = None,
    start: bytes = b"",
    lister: LocalLister | HelperLister | None = None,
) -> Iterator[FileEntry]:
    """Yield every regular file under `root` that the options select, in sorted order.

    `start` (a relpath ending in '/') walks only that folder of `root`.
    Folders that cannot be read are reported and their relpath prefixes appended
    to `unreadable`, so their files are not mistaken for deleted ones; so are the
    relpaths of entries that cannot be stat'ed (as prefixes too). `lister`
    lists the folders (see listing.py); by default each in turn, here.
    """
    own = lister is None  # a lister of its own is closed when the walk ends
    return _Walk(root, options, on_skip, unreadable, lister or LocalLister(), close_lister=own).files(start)


class _Walk:
    """Depth first, each folder's entries in walk order (see listing.list_folder), entering a
    folder at its place among them: relpaths come out in byte order, the ledger's."""

    def __init__(self, root: bytes, options: ScanOptions, on_skip: SkipReporter | None,
                 unreadable: list[bytes] | None, lister: LocalLister | HelperLister,
                 close_lister: bool = False) -> None:
        self.root = root
        self.close_lister = close_lister
        self.report = on_skip or (lambda relpath, reason: None)
        self.unreadable = unreadable if unreadable is not None else []
        self.lister = lister
        self.paths = PathFilter(options.include, (*options.exclude, *options.ignore))
        self.filtering = bool(options.include or options.exclude or options.ignore)
        self.follow = options.follow_symlinks
        self.real_root = os.path.realpath(root)
        self.skip_dirs = options.skip_dirs
        self.skip_inodes = {ino for _, ino in options.skip_dirs}

    def files(self, start: bytes) -> Iterator[FileEntry]:
        try:
            yield from self._files(start)
        finally:
            if self.close_lister:
                self.lister.close()

    def _files(self, start: bytes) -> Iterator[FileEntry]:
        first = os.path.join(self.root, start) if start else self.root
        try:
            ancestors = frozenset({_dir_id(first)})
        except FileNotFoundError:
            return
        # One iterator per level; a folder item is a (path, prefix, ancestors) tuple.
        stack = [iter(self._items(first, start, ancestors))]
        while stack:
            for item in stack[-1]:
                if type(item) is FileEntry:
                    yield item
                else:
                    stack.append(iter(self._items(*item)))
                    break
            else:
                stack.pop()

    def _items(self, path: bytes, prefix: bytes, ancestors: frozenset) -> list:
        """The files to yield and folders to enter of one folder, in walk order.

        Each folder to enter is announced to the lister now, so that a helper
        can list it while the walk yields what comes before it.
        """
        status, listing = self.lister.take(path, prefix)
        if status == VANISHED:
            return []  # its files will be marked gone
        if status == UNREADABLE:
            self.report(prefix.rstrip(b"/") or b".", f"cannot read folder: {listing}")
            self.unreadable.append(prefix)
            return []
        items: list = []
        plain = not self.filtering
        for _, name, kind, size, mtime_ns, inode in listing:  # once per file: keep it lean
            relpath = prefix + name
            if kind == FILE and plain:
                items.append(_new_tuple(FileEntry, (relpath, size, mtime_ns)))  # FileEntry(), in C
                continue
            st = None
            if kind == OTHER or (kind == DIR and (self.follow or inode in self.skip_inodes)):
                kind, st = _classify(path + b"/" + name, self.follow, self.real_root, relpath, self.report)
            if kind == _UNSTATABLE:  # its tasks (or those under it) must not be taken for deleted
                self.unreadable.append(relpath)
            elif kind == FILE:
                if self.filtering and not self.paths.wants_file(os.fsdecode(relpath), os.fsdecode(name)):
                    continue
                items.append(FileEntry(relpath, st.st_size, st.st_mtime_ns) if st else FileEntry(relpath, size, mtime_ns))
            elif kind == DIR:
                folder = self._folder(path + b"/" + name, relpath, name, st, ancestors)
                if folder is not None:
                    self.lister.expect(folder[0], folder[1])
                    items.append(folder)
        return items

    def _folder(self, path: bytes, relpath: bytes, name: bytes, st: os.stat_result | None,
                ancestors: frozenset) -> tuple | None:
        """(path, prefix, ancestors) of a folder to enter, or None to prune it."""
        if self.filtering and self.paths.prunes_dir(os.fsdecode(relpath), os.fsdecode(name)):
            return None
        below = ancestors
        if st is not None:
            dir_id = (st.st_dev, st.st_ino)
            if dir_id in self.skip_dirs:
                return None
            if dir_id in ancestors:
                self.report(relpath, "symlink loop: this folder is one of its own parents")
                return None
            below = ancestors | {dir_id}
        return (path, relpath + b"/", below)


_UNSTATABLE = -1  # a kind of entry: lstat failed (not ENOENT), so what it is stays unknown


def _classify(
    path: bytes, follow: bool, real_root: bytes, relpath: bytes, report: SkipReporter
) -> tuple[int | None, os.stat_result | None]:
    """(FILE | DIR | _UNSTATABLE | None, stat) for a folder entry the listing left to us;
    None means skip it."""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if not follow:
                return None, None
            target = os.path.realpath(path)
            if target != real_root and not target.startswith(real_root + b"/"):
                report(relpath, "symlink points outside DATA_DIR; skipped")
                return None, None
            st = os.stat(path)
    except FileNotFoundError:
        return None, None  # a dangling link, or a file deleted under us
    except OSError as exc:
        report(relpath, f"cannot stat: {exc.strerror}")
        return _UNSTATABLE, None
    if stat.S_ISDIR(st.st_mode):
        return DIR, st
    if stat.S_ISREG(st.st_mode):
        return FILE, st
    report(relpath, f"not a regular file ({_kind_name(st.st_mode)}); skipped")
    return None, None


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def _dir_id(path: bytes) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def dir_id(path: str | bytes) -> tuple[int, int] | None:
    """(st_dev, st_ino) of a folder, or None when it does not exist yet."""
    try:
        return _dir_id(os.fsencode(path))
    except OSError:
        return None


def task_rows(entry: FileEntry, chunk_size: int | None = None) -> list[tuple]:
    """The ledger rows (path_bytes, offset, length, size, mtime_ns) of one file.

    A file larger than `chunk_size` becomes one task per byte range; each range
    owns the lines that start inside it (see Task.lines), so ranges need not
    fall on line boundaries.
    """
    if not chunk_size or entry.size <= chunk_size:
        return [(entry.relpath, 0, None, entry.size, entry.mtime_ns)]
    return [
        (entry.relpath, offset, min(chunk_size, entry.size - offset), entry.size, entry.mtime_ns)
        for offset in range(0, entry.size, chunk_size)
    ]


class Scan:
    """One walk reconciled with the ledger a slice at a time, so the pool runs between slices.

    The walk yields paths in the ledger's order, so each slice covers a key
    range (previous slice's last path, this slice's last path]: the ledger's
    tasks in that range are compared with what the walk saw there, and only
    differences are written. Memory stays flat whatever the tree's size. A
    full scan marks files it did not see as gone; a partial one (a folder that
    just appeared, in watch mode) does not. `hold_back` lets watch mode keep
    files still being written out of the ledger for now (not taken for deleted).
    """

    def __init__(
        self,
        ledger: "Ledger",
        root: bytes,
        options: ScanOptions,
        on_skip: SkipReporter,
        *,
        start: bytes = b"",
        hold_back: Callable[[FileEntry], bool] | None = None,
        claim_new: bool = False,
        list_helpers: int = 0,
    ) -> None:
        self._ledger = ledger
        # With claim_new, files the ledger never saw are recorded already claimed
        # and handed to the pool through `claimed` (see Ledger.reconcile).
        self._claim_new = claim_new
        self.claimed: list[tuple] = []
        self._unreadable: list[bytes] = []
        # Helpers list folders ahead of the walk (see listing.py): worth it on a big tree only,
        # which is what HelperLister waits to see before starting any.
        self._lister = HelperLister(list_helpers) if list_helpers else LocalLister()
        self._entries = walk(root, options, on_skip, self._unreadable, start, self._lister)
        self.full = not start
        self._chunk_size = options.chunk_size
        self._hold_back = hold_back
        self._lo: bytes | None = start or None  # every path under `start` sorts after it
        self._ignored = PathFilter((), options.ignore) if options.ignore else None
        self.files = 0
        self.finished = False
        self.gone = 0

    # The pool's work-source protocol (see pool.WorkerPool): a scan always has
    # more to do right now until it is finished, and never needs waking up.
    wakeup_fd = None

    @property
    def exhausted(self) -> bool:
        return self.finished

    @property
    def busy(self) -> bool:
        return not self.finished

    def wait_hint(self) -> float | None:
        return None

    def close(self) -> None:
        """Stop the listing helpers (a scan given up before its end)."""
        self._lister.close()

    def step(self, max_files: int = 2000) -> int:
        """Reconcile up to `max_files` more files; the last slice also covers the range's end."""
        entries = list(islice(self._entries, max_files))
        last_slice = len(entries) < max_files
        hi = None if last_slice and self.full else (entries[-1].relpath if entries else self._lo)
        held: list[bytes] = []
        if self._hold_back is None and not self._chunk_size:  # one task per file: the common case
            rows = [(e.relpath, 0, None, e.size, e.mtime_ns) for e in entries]
        else:
            rows = []
            for entry in entries:
                if self._hold_back is not None and self._hold_back(entry):
                    held.append(entry.relpath)
                else:
                    rows.extend(task_rows(entry, self._chunk_size))
        _, gone = self._ledger.reconcile(
            rows, lo=self._lo, hi=hi, held=held, keep_prefixes=self._unreadable,
            keep=self._ignored.excludes_any_part if self._ignored else None, mark_gone=self.full,
            chunked=bool(self._chunk_size), claim_new_into=self.claimed if self._claim_new else None,
        )
        self._lo = hi
        self.gone += gone
        self.files += len(entries) - len(held)
        self.finished = last_slice
        if last_slice:
            self.close()
        return len(entries)
