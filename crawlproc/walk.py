"""Walking DATA_DIR: a pure iterator of the files a scan takes in, in the ledger's order.

    walk(root) ──take(folder)──> listing (here, or in helper processes: see listing.py)
        ──> FileEntry per file selected, in byte order of relpaths (FolderDone / FolderUnchanged
            too when the lister knows fingerprints)
        └─> WalkFindings: entries skipped on purpose, by kind; paths it could not read

The walk works on bytes so that any file name, UTF-8 or not, is kept exactly.
It never opens a file (a FIFO would block), visits folders in sorted order,
and prunes excluded folders, OUT and any folder holding a crawlproc ledger,
unreadable folders and symlink loops. What it skips is counted by kind (see
SKIP_KINDS) for summary.json and the log; what it cannot read is a problem the
user must see (a failure in `failures`, exit 1), never a silent gap.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from crawlproc.listing import (
    DIR, FILE, LEAF, OTHER, OUT_FOLDER, UNCHANGED, UNREADABLE, VANISHED, HelperLister, LocalLister,
)
from crawlproc.task import relpath_for_people

SkipReporter = Callable[[bytes, str], None]
_LOOP_BACK = "symlink loop: this folder is one of its own parents"

# Entries a walk skips on purpose, by kind (summary.json's "skipped"), with how the log names them:
SKIP_KINDS = {
    "symlinks": ("symlink", "symlinks", "not followed without --follow-symlinks"),
    "links_outside": ("symlink", "symlinks", "leading out of DATA_DIR"),
    "broken_links": ("symlink", "symlinks", "whose target does not exist"),
    "symlink_loops": ("symlink", "symlinks", "looping back to a folder above them"),
    "special_files": ("special file", "special files", "FIFOs, sockets or devices"),
    "crawlproc_outs": ("folder", "folders", "holding a crawlproc ledger: an OUT, never input"),
}


class ScanProblem(NamedTuple):
    """A path the walk could not read: its files may be missing from the output."""

    relpath: bytes  # a folder's ends in '/' ('' for DATA_DIR itself); an entry it could not stat: its own
    error: str

    @property
    def shown(self) -> str:
        """The relpath for people; DATA_DIR itself is './'."""
        return relpath_for_people(self.relpath) or "./"


ProblemReporter = Callable[[ScanProblem], None]


@dataclass
class WalkFindings:
    """What a walk left out: entries skipped on purpose (by SKIP_KINDS key), paths it could not read."""

    skipped: Counter = field(default_factory=Counter)
    problems: list[ScanProblem] = field(default_factory=list)

    def skipped_counts(self) -> dict[str, int]:
        """Every kind, zeros included, in SKIP_KINDS order."""
        return {kind: self.skipped[kind] for kind in SKIP_KINDS}


def describe_skipped(counts: dict[str, int]) -> str | None:
    """'3 symlinks (not followed without --follow-symlinks), 1 special file (...)', or None."""
    parts = []
    for kind, (one, many, why) in SKIP_KINDS.items():
        n = counts.get(kind, 0)
        if n:
            parts.append(f"{n} {one if n == 1 else many} ({why})")
    return ", ".join(parts) or None


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
        self._patterns = (tuple(include), tuple(exclude))

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

    def selects(self, relpath: bytes) -> bool:
        """Would a walk yield this file: no folder of it pruned, and the file itself wanted?"""
        parent, _, name = relpath.rpartition(b"/")
        if parent and self.excludes_any_part(parent):
            return False
        return self.wants_file(os.fsdecode(relpath), os.fsdecode(name))


    def rule_against(self, relpath: bytes) -> str | None:
        """Why a walk would not yield this file, for people: the --exclude pattern that matches
        it or one of its folders, or no --include pattern matching it; None if it is selected."""
        include, exclude = self._patterns
        parts = os.fsdecode(relpath).split("/")
        for depth in range(1, len(parts) + 1):
            sub, name = "/".join(parts[:depth]), parts[depth - 1]
            for pattern in exclude:
                if _matches(_compile([pattern]), sub, name):
                    what = f"its folder {sub}/" if depth < len(parts) else "it"
                    return f"--exclude {pattern!r} matches {what}"
        if self._include and not _matches(self._include, "/".join(parts), parts[-1]):
            return f"no --include pattern matches it ({', '.join(map(repr, include))})"
        return None


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
    *,
    findings: WalkFindings | None = None,
    on_problem: ProblemReporter | None = None,
) -> Iterator[FileEntry | FolderDone | FolderUnchanged]:
    """Yield every regular file under `root` that the options select, in sorted order.

    `start` (a relpath ending in '/') walks only that folder of `root`.
    Entries skipped on purpose are counted in `findings` and reported to
    `on_skip` (not symlinks that are simply not followed: there can be
    many). Folders that cannot be read, and entries that cannot be stat'ed,
    are problems: kept in `findings`, reported to `on_problem` (else to
    `on_skip`), and appended to `unreadable` (folders as prefixes), so their
    files are not mistaken for deleted ones. `lister` lists the folders (see
    listing.py); by default each in turn, here. A lister that knows
    fingerprints also makes the walk yield FolderDone and FolderUnchanged items.
    """
    own = lister is None  # a lister of its own is closed when the walk ends
    walker = _Walk(root, options, on_skip, unreadable, lister or LocalLister(), close_lister=own,
                   findings=findings, on_problem=on_problem)
    return walker.files(start)


class _Walk:
    """Depth first, each folder's entries in walk order (see listing.list_folder), entering a
    folder at its place among them: relpaths come out in byte order, the ledger's."""

    def __init__(self, root: bytes, options: ScanOptions, on_skip: SkipReporter | None,
                 unreadable: list[bytes] | None, lister: LocalLister | HelperLister,
                 close_lister: bool = False, findings: WalkFindings | None = None,
                 on_problem: ProblemReporter | None = None) -> None:
        self.root = root
        self.close_lister = close_lister
        self.report = on_skip or (lambda relpath, reason: None)
        self.on_problem = on_problem
        self.unreadable = unreadable if unreadable is not None else []
        self.findings = findings if findings is not None else WalkFindings()
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
            above, here = self._folders_above(start), _dir_id(first)
        except FileNotFoundError:
            return
        if here in above:  # a followed link to a folder above it (watch scans a new folder alone)
            self._skip("symlink_loops", start.rstrip(b"/"), _LOOP_BACK)
            return
        ancestors = above | {here}
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

    def _folders_above(self, start: bytes) -> frozenset:
        """The folders a walk from `start` is inside: DATA_DIR's and each one's on the way down
        to it, so that a link back to any of them is a loop there too."""
        if not start:
            return frozenset()
        above = {_dir_id(self.root)}
        for end in (i + 1 for i, byte in enumerate(start[:-1]) if byte == ord("/")):
            above.add(_dir_id(os.path.join(self.root, start[:end])))
        return frozenset(above)

    def _skip(self, kind: str, relpath: bytes, reason: str | None) -> None:
        """Count an entry skipped on purpose; report it unless `reason` is None."""
        self.findings.skipped[kind] += 1
        if reason is not None:
            self.report(relpath, reason)

    def _problem(self, relpath: bytes, error: str) -> None:
        """A path that could not be read: its tasks are kept, and the user is told."""
        problem = ScanProblem(relpath, error)
        self.unreadable.append(relpath)
        self.findings.problems.append(problem)
        if self.on_problem is not None:
            self.on_problem(problem)
        else:
            self.report(relpath.rstrip(b"/") or b".", error)

    def _items(self, path: bytes, prefix: bytes, ancestors: frozenset) -> list:
        """The files to yield and folders to enter of one folder, in walk order.

        Each folder to enter is announced to the lister now, so that a helper
        can list it while the walk yields what comes before it.
        """
        status, listing = self.lister.take(path, prefix)
        if status == VANISHED:
            return []  # its files will be marked gone
        if status == UNREADABLE:
            self._problem(prefix, f"cannot read folder: {listing}")
            return []
        if status == OUT_FOLDER:  # its files become gone if an earlier scan took them in
            self._skip("crawlproc_outs", prefix.rstrip(b"/") or b".",
                       "holds a crawlproc ledger (an OUT folder, never input)")
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
                kind, st = self._classify(path + b"/" + name, relpath)
            if kind == FILE:
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
                self._skip("crawlproc_outs", relpath, "this run's OUT")
                return None
            if dir_id in ancestors:
                self._skip("symlink_loops", relpath, _LOOP_BACK)
                return None
            below = ancestors | {dir_id}
        return (path, relpath + b"/", below)

    def _classify(self, path: bytes, relpath: bytes) -> tuple[int | None, os.stat_result | None]:
        """(FILE | DIR | None, stat) for a folder entry the listing left to us; None means skip it
        (or, for an entry that cannot be stat'ed, that it is a problem: see _problem)."""
        verdict = judge_entry(path, self.real_root, self.follow)
        if verdict.skipped is not None:
            self._skip(verdict.skipped, relpath, verdict.reason)
        elif verdict.kind is None and verdict.reason is not None:
            self._problem(relpath, verdict.reason)
        return verdict.kind, verdict.st


class EntryVerdict(NamedTuple):
    """What the walk's rules make of one entry (judge_entry)."""

    kind: int | None  # FILE or DIR to take in (`st` is its stat, a link's target's when followed); None: not
    st: os.stat_result | None = None
    skipped: str | None = None  # a SKIP_KINDS key: left out on purpose
    reason: str | None = None  # for people; with `skipped` None, a problem: it could not be stat'ed


def judge_entry(path: bytes, real_root: bytes, follow: bool) -> EntryVerdict:
    """The walk's rules for an entry that may be a symlink or not a regular file (the watch's
    events meet the same ones): links are followed only with `follow`, and never out of DATA_DIR
    (`real_root`: its realpath); FIFOs, sockets and devices are never taken, so never opened.
    An entry deleted meanwhile is EntryVerdict(None) with no reason."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return EntryVerdict(None)
    except OSError as exc:
        return EntryVerdict(None, reason=f"cannot stat: {exc.strerror}")
    if stat.S_ISLNK(st.st_mode):
        if not follow:
            return EntryVerdict(None, skipped="symlinks")  # counted, not reported one by one
        target = os.path.realpath(path)
        if target != real_root and not target.startswith(real_root + b"/"):
            return EntryVerdict(None, skipped="links_outside", reason="symlink points outside DATA_DIR")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return EntryVerdict(None, skipped="broken_links", reason="symlink to nothing")
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # links that point at each other
                return EntryVerdict(None, skipped="symlink_loops", reason="symlink loop: the links point at each other")
            return EntryVerdict(None, reason=f"cannot stat: {exc.strerror}")
    if stat.S_ISDIR(st.st_mode):
        return EntryVerdict(DIR, st)
    if stat.S_ISREG(st.st_mode):
        return EntryVerdict(FILE, st)
    return EntryVerdict(None, skipped="special_files", reason=f"not a regular file ({kind_name(st.st_mode)})")


def kind_name(mode: int) -> str:
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
