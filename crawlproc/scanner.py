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
from typing import TYPE_CHECKING, NamedTuple

from crawlproc.listing import DIR, FILE, LEAF, OTHER, UNCHANGED, UNREADABLE, VANISHED, HelperLister, LocalLister

if TYPE_CHECKING:
    from crawlproc.ledger import Ledger

SkipReporter = Callable[[bytes, str], None]


class FileEntry(NamedTuple):  # a tuple: the walk makes one per file
    relpath: bytes  # POSIX, relative to DATA_DIR, exact bytes
    size: int
    mtime_ns: int


_new_tuple = tuple.__new__  # _new_tuple(FileEntry, (...)) skips NamedTuple's Python-level __new__


# What a walk with fingerprints (a Scan's) yields besides files (see listing.fingerprint):
class FolderDone(NamedTuple):
    """After the files of a folder holding only files: what the ledger may record for it."""

    prefix: bytes  # the folder's relpath plus '/' ('' for DATA_DIR itself)
    fingerprint: bytes
    files: int  # files yielded for it


class FolderUnchanged(NamedTuple):
    """Instead of the files of a folder found as the ledger recorded it."""

    prefix: bytes
    files: int  # as recorded


def folder_end(prefix: bytes) -> bytes | None:
    """The first relpath after every relpath in the folder `prefix` (None: after everything).

    Relpaths in a folder are those starting with 'x/'; '0' follows '/'.
    """
    return prefix[:-1] + b"0" if prefix else None


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
) -> Iterator[FileEntry | FolderDone | FolderUnchanged]:
    """Yield every regular file under `root` that the options select, in sorted order.

    `start` (a relpath ending in '/') walks only that folder of `root`.
    Folders that cannot be read are reported and their relpath prefixes appended
    to `unreadable`, so their files are not mistaken for deleted ones; so are the
    relpaths of entries that cannot be stat'ed (as prefixes too). `lister`
    lists the folders (see listing.py); by default each in turn, here. A
    lister that knows fingerprints also makes the walk yield FolderDone and
    FolderUnchanged items.
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

    def files(self, start: bytes) -> Iterator[FileEntry | FolderDone | FolderUnchanged]:
        try:
            yield from self._files(start)
        finally:
            if self.close_lister:
                self.lister.close()

    def _files(self, start: bytes) -> Iterator[FileEntry | FolderDone | FolderUnchanged]:
        first = os.path.join(self.root, start) if start else self.root
        try:
            ancestors = frozenset({_dir_id(first)})
        except FileNotFoundError:
            return
        # One iterator per level; a folder to enter is a plain (path, prefix, ancestors) tuple.
        stack = [iter(self._items(first, start, ancestors))]
        while stack:
            for item in stack[-1]:
                if type(item) is tuple:
                    stack.append(iter(self._items(*item)))
                    break
                yield item
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
        if status == UNCHANGED:
            return [FolderUnchanged(prefix, listing)]
        if status == LEAF:
            listing, folder_print = listing
            items = self._entries(path, prefix, ancestors, listing)
            items.append(FolderDone(prefix, folder_print, len(items)))  # no folders in it: all files
            return items
        return self._entries(path, prefix, ancestors, listing)

    def _entries(self, path: bytes, prefix: bytes, ancestors: frozenset, listing: list) -> list:
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
    range [lo, hi): the ledger's tasks in that range are compared with what
    the walk saw there, and only differences are written. Memory stays flat
    whatever the tree's size. A full scan marks files it did not see as gone;
    a partial one (a folder that just appeared, in watch mode) does not.
    `hold_back` lets watch mode keep files still being written out of the
    ledger for now (not taken for deleted).

    A full scan that holds nothing back also records a fingerprint for each
    folder of files only, in the same transaction as the slice that covered
    the whole folder. The next scan skips a folder whose listing has the
    recorded fingerprint: the ledger already holds exactly what its files
    would plan. So a no-op rerun reads no task rows for such folders.
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
        self.full = not start
        # A partial scan leaves unseen tasks alone, and held-back files are not in the
        # ledger yet: either way the ledger need not match the folder, so no fingerprints.
        self._fingerprints = self.full and hold_back is None
        known = ledger.known_folders(_plan(options)) if self._fingerprints else None
        # Helpers list folders ahead of the walk (see listing.py): worth it on a big tree only,
        # which is what HelperLister waits to see before starting any.
        self._lister = HelperLister(list_helpers, known) if list_helpers else LocalLister(known)
        self._entries = walk(root, options, on_skip, self._unreadable, start, self._lister)
        self._chunk_size = options.chunk_size
        self._hold_back = hold_back
        self._lo: bytes | None = start or None  # every path under `start` sorts after it
        self._past_end = False  # reconciled to the ledger's end (lo None means its start before that)
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
        """Reconcile about `max_files` more files; the last slice also covers the range's end.

        With fingerprints a slice ends after a folder's last file where it can
        (then the folder's fingerprint is recorded with it), up to 4x longer.
        """
        plain = self._hold_back is None and not self._chunk_size  # one task per file: the common case
        slice_ = _Slice(plain)
        seen = 0
        cap = max_files * 4 if self._fingerprints else max_files
        for item in self._entries:  # once per file: keep it lean
            kind = type(item)
            if kind is FileEntry:
                if plain:
                    slice_.rows.append((item[0], 0, None, item[1], item[2]))
                else:
                    slice_.add(item, self._hold_back, self._chunk_size)
                seen += 1
                if seen >= cap:
                    self._reconcile(slice_, item.relpath + b"\0")  # just after it
                    break
            elif kind is FolderDone:
                if self._lo is None or self._lo <= item.prefix:  # the whole folder is in this slice
                    slice_.folders.append((item.prefix, item.fingerprint, item.files))
                if seen >= max_files:
                    self._reconcile(slice_, folder_end(item.prefix))
                    break
            else:  # FolderUnchanged: reconcile up to it, carry on after it
                self._reconcile(slice_, item.prefix)
                self._move_lo(folder_end(item.prefix))
                slice_ = _Slice(plain)
                seen += item.files
                self.files += item.files
                if seen >= max_files:  # a step stays short, so the pool keeps its turns (and Ctrl-C)
                    break
        else:
            self._finish(slice_)
        return seen

    def _reconcile(self, slice_: _Slice, hi: bytes | None) -> None:
        """Bring the ledger's range [lo, hi) in line with the slice; lo moves to hi."""
        if not self._past_end:
            _, gone = self._ledger.reconcile(
                slice_.rows, lo=self._lo, hi=hi, held=slice_.held, keep_prefixes=self._unreadable,
                keep=self._ignored.excludes_any_part if self._ignored else None, mark_gone=self.full,
                chunked=bool(self._chunk_size), claim_new_into=self.claimed if self._claim_new else None,
                folders=slice_.folders if self._fingerprints else (),
            )
            self.gone += gone
        self._move_lo(hi)
        self.files += slice_.files()

    def _move_lo(self, lo: bytes | None) -> None:
        """The ledger is reconciled up to `lo` (None: to its end)."""
        self._lo = lo
        self._past_end = lo is None

    def _finish(self, slice_: _Slice) -> None:
        """The walk is over: a full scan's last slice runs to the end of the ledger."""
        if self.full:
            hi = None
        else:  # a partial scan ends with its last file (or where it began)
            last = slice_.last_path()
            hi = last + b"\0" if last is not None else self._lo
        self._reconcile(slice_, hi)
        self.finished = True
        self.close()


class _Slice:
    """What one slice of the walk plans: ledger rows, held-back paths, folders to record.

    A plain slice (one task per file, nothing held back) gets its rows appended
    by Scan.step directly.
    """

    __slots__ = ("plain", "rows", "held", "folders", "_files", "_last")

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.rows: list[tuple] = []  # (path_bytes, offset, length, size, mtime_ns)
        self.held: list[bytes] = []
        self.folders: list[tuple] = []  # (prefix, fingerprint, files)
        self._files = 0
        self._last: bytes | None = None  # the last relpath added, held back or not

    def add(self, entry: FileEntry, hold_back: Callable[[FileEntry], bool] | None, chunk_size: int | None) -> None:
        self._last = entry.relpath
        if hold_back is not None and hold_back(entry):
            self.held.append(entry.relpath)
            return
        self._files += 1
        self.rows.extend(task_rows(entry, chunk_size))

    def files(self) -> int:
        """Files planned (held-back ones are not)."""
        return len(self.rows) if self.plain else self._files

    def last_path(self) -> bytes | None:
        return self.rows[-1][0] if self.plain and self.rows else self._last


def _plan(options: ScanOptions) -> str:
    """The options that decide which tasks a folder's files make: fingerprints hold under these only."""
    return repr((tuple(options.include), tuple(options.exclude), tuple(options.ignore),
                 options.chunk_size, options.follow_symlinks))
