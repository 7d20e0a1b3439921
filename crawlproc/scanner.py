"""Feeding the ledger from a walk: `Scan` reconciles what the walk yields, a slice at a time.

    walk (walk.py) ──FileEntry──> Scan.step() ──rows of a slice──> Ledger.reconcile (or, in a
      │                                         dry run, Ledger.preview_reconcile: no writes)
      └─ WalkFindings ──> Ledger.record_scan_problems, record_scan_skipped

A full scan marks the files it did not see gone (but not under a path it
could not read); a partial one (a new folder, in watch mode) leaves them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from crawlproc.listing import HelperLister, LocalLister
from crawlproc.walk import (
    FileEntry,
    FolderDone,
    PathFilter,
    ProblemReporter,
    ScanOptions,
    SkipReporter,
    WalkFindings,
    describe_skipped,
    folder_end,
    walk,
)

if TYPE_CHECKING:
    from crawlproc.dryrun import ScanPreview
    from crawlproc.ledger import Ledger


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

    A full scan also records a fingerprint for each folder of files only
    (none held back), in the same transaction as the slice that covered the
    whole folder. The next scan skips a folder whose listing has the
    recorded fingerprint: the ledger already holds exactly what its files
    would plan. So a no-op rerun reads no task rows for such folders.

    Paths the walk cannot read are recorded in the ledger as they are met; a
    scan that ends clears those under its start that it did not meet again.
    Of the files gone, `excluded` counts those that the scan's --include and
    --exclude no longer select. With `preview` (a dry run) the ledger is only
    read: each slice's differences go to the preview, and nothing is written.
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
        on_problem: ProblemReporter | None = None,
        preview: ScanPreview | None = None,
    ) -> None:
        self._ledger = ledger
        self._preview = preview
        # With claim_new, files the ledger never saw are recorded already claimed
        # and handed to the pool through `claimed` (see Ledger.reconcile).
        self._claim_new = claim_new
        self.claimed: list[tuple] = []
        self._unreadable: list[bytes] = []
        self.full = not start
        # A partial scan leaves unseen tasks alone, so the ledger need not match the folder:
        # no fingerprints. Held-back files are not in the ledger yet: their folders get
        # none (see _Slice.add), the others do, so watch's rescans and polls skip them too.
        # A dry run lists every folder: the retried tasks of unchanged ones count too.
        self._fingerprints = self.full and preview is None
        known = ledger.known_folders(_plan(options)) if self._fingerprints else None
        # Helpers list folders ahead of the walk (see listing.py): worth it on a big tree only,
        # which is what HelperLister waits to see before starting any.
        self._lister = HelperLister(list_helpers, known) if list_helpers else LocalLister(known)
        self.findings = WalkFindings()
        self._problems_recorded = 0
        self._entries = walk(root, options, on_skip, self._unreadable, start, self._lister,
                             findings=self.findings, on_problem=on_problem)
        self._start = start
        self._selected = PathFilter(options.include, options.exclude).selects if (
            options.include or options.exclude) else None
        self._chunk_size = options.chunk_size
        self._hold_back = hold_back
        self._lo: bytes | None = start or None  # every path under `start` sorts after it
        self._past_end = False  # reconciled to the ledger's end (lo None means its start before that)
        self._ignored = PathFilter((), options.ignore) if options.ignore else None
        self.files = 0
        self.finished = False
        self.gone = 0
        self.excluded = 0  # of the gone files, those --include/--exclude no longer select

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
                # The whole folder is in this slice, and none of its files waits to settle.
                if (self._lo is None or self._lo <= item.prefix) and item.prefix not in slice_.held_in:
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
            keep = self._ignored.excludes_any_part if self._ignored else None
            if self._preview is not None:
                self._preview_range(slice_, hi, keep)
            else:
                self._write_range(slice_, hi, keep)
                self._record_problems()
        self._move_lo(hi)
        self.files += slice_.files()

    def _write_range(self, slice_: _Slice, hi: bytes | None, keep: Callable[[bytes], bool] | None) -> None:
        gone_paths: list[bytes] | None = [] if self._selected else None
        _, gone = self._ledger.reconcile(
            slice_.rows, lo=self._lo, hi=hi, held=slice_.held, keep_prefixes=self._unreadable,
            keep=keep, mark_gone=self.full,
            chunked=bool(self._chunk_size), claim_new_into=self.claimed if self._claim_new else None,
            folders=slice_.folders if self._fingerprints else (), gone_into=gone_paths,
        )
        self.gone += gone
        self.excluded += len(self._not_selected(gone_paths or []))

    @property
    def disappeared(self) -> int:
        """Files gone from the tree (not those the patterns no longer select)."""
        return self.gone - self.excluded

    def outcome_lines(self, *, skipped: bool = True) -> list[str]:
        """What the finished scan changed that a user should hear of: files that left the output
        (gone, or no longer selected), and with `skipped`, entries skipped on purpose."""
        lines = []
        if self.disappeared:
            lines.append(f"{_files(self.disappeared)} disappeared since the last scan; their records leave the output")
        if self.excluded:
            lines.append(f"{_files(self.excluded)} no longer selected by --include/--exclude; "
                         "their records leave the output")
        described = describe_skipped(self.findings.skipped) if skipped else None
        if described:
            lines.append(f"skipped {described}")
        return lines

    def emptied_warning(self) -> str | None:
        """A full scan that found no file at all where earlier scans had some: most likely
        DATA_DIR is a mount point not mounted, or a share gone. Said, not refused: an inbox that
        another process empties after each run looks just the same."""
        if not (self.full and self.files == 0 and self.disappeared):
            return None
        return (f"DATA_DIR holds no file now: every file of the last scan ({self.disappeared:,}) is gone and its "
                "records left the output; if DATA_DIR is a mount point, check that it is mounted (the next "
                "run then processes its files again)")

    def _not_selected(self, paths: list[bytes]) -> list[bytes]:
        """The paths the scan's --include/--exclude do not select."""
        return [path for path in paths if not self._selected(path)] if self._selected else []

    def _preview_range(self, slice_: _Slice, hi: bytes | None, keep: Callable[[bytes], bool] | None) -> None:
        """A dry run's reconcile: what would change in [lo, hi), told to the preview."""
        diff = self._ledger.preview_reconcile(slice_.rows, lo=self._lo, hi=hi, keep_prefixes=self._unreadable,
                                              keep=keep, retry_states=self._preview.retry_states)
        excluded = self._not_selected(diff.gone)
        self.gone += len(diff.gone)
        self.excluded += len(excluded)
        dropped = set(excluded)
        self._preview.add(new=diff.new, changed=diff.changed, gone=[p for p in diff.gone if p not in dropped],
                          excluded=excluded, retried=diff.retried)

    def _record_problems(self) -> None:
        """Paths met since the last slice that could not be read go to the ledger now."""
        problems = self.findings.problems
        if len(problems) > self._problems_recorded:
            self._ledger.record_scan_problems(problems[self._problems_recorded:])
            self._problems_recorded = len(problems)

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
        if self._preview is None:
            self._ledger.clear_scan_problems(self._start, [p.relpath for p in self.findings.problems])
            if self.full:
                self._ledger.record_scan_skipped(self.findings.skipped_counts())
        self.finished = True
        self.close()


class _Slice:
    """What one slice of the walk plans: ledger rows, held-back paths, folders to record.

    A plain slice (one task per file, nothing held back) gets its rows appended
    by Scan.step directly.
    """

    __slots__ = ("plain", "rows", "held", "held_in", "folders", "_files", "_last")

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.rows: list[tuple] = []  # (path_bytes, offset, length, size, mtime_ns)
        self.held: list[bytes] = []
        self.held_in: set[bytes] = set()  # folders ('x/', '' for the top) holding a held-back file
        self.folders: list[tuple] = []  # (prefix, fingerprint, files)
        self._files = 0
        self._last: bytes | None = None  # the last relpath added, held back or not

    def add(self, entry: FileEntry, hold_back: Callable[[FileEntry], bool] | None, chunk_size: int | None) -> None:
        self._last = entry.relpath
        if hold_back is not None and hold_back(entry):
            self.held.append(entry.relpath)
            self.held_in.add(entry.relpath[:entry.relpath.rfind(b"/") + 1])
            return
        self._files += 1
        self.rows.extend(task_rows(entry, chunk_size))

    def files(self) -> int:
        """Files planned (held-back ones are not)."""
        return len(self.rows) if self.plain else self._files

    def last_path(self) -> bytes | None:
        return self.rows[-1][0] if self.plain and self.rows else self._last


def _files(n: int) -> str:
    return f"{n} file" if n == 1 else f"{n} files"


def _plan(options: ScanOptions) -> str:
    """The options that decide which tasks a folder's files make: fingerprints hold under these only."""
    return repr((tuple(options.include), tuple(options.exclude), tuple(options.ignore),
                 options.chunk_size, options.follow_symlinks))
