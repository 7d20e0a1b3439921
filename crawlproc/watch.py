"""Watch mode: files that arrive or change under DATA_DIR become tasks once they are complete.

    watchdog observer thread ──events──> queue ──┐  (+ a byte on a wake-up pipe)
                                                 v
    Watcher.step() (in the coordinator, between pool turns):
        catch-up scan / periodic rescan ──┐
        events: created/modified ─────────┼──> candidates ──settled──> ledger (pending)
        close-after-write, rename-in ─────┘        (heap by due time)
        deleted / moved away ───────────────────────────────────────> ledger (gone)

A file is *settled* on its close-after-write event, or once its size and mtime
stayed the same for --settle seconds; every scan in watch mode holds back files
modified less than --settle ago and looks at them again later. Events can be
lost (inotify overflow): a rescan reconciles every --rescan-interval, and an
overflow triggers one at once.

OUT is never input: events inside our own OUT are dropped, and so are files
and new folders inside any folder that holds a crawlproc ledger (looked up
when the file would be recorded, so an OUT made while watching counts too).

Polling (--poll SECONDS) replaces the observer with a full scan every SECONDS,
for file systems that send no events (NFS, SMB, Lustre): the scans find new,
changed and deleted files, and skip each folder whose listing still has the
fingerprint the ledger recorded, so an unchanged tree costs one stat per file.
Watch falls back to it by itself, with one WARNING, when DATA_DIR (or a mount
inside it) is such a file system, or when the kernel refuses more inotify
watches or instances (at the start, or later for a new folder).
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from crawlproc.fsevents import no_events_filesystem, refused
from crawlproc.listing import DIR, FILE, holds_crawlproc_ledger
from crawlproc.scanner import Scan, task_rows
from crawlproc.walk import FileEntry, PathFilter, ProblemReporter, ScanOptions, judge_entry

if TYPE_CHECKING:
    from crawlproc.ledger import Ledger

# Names that common writers use while a file is incomplete; watched files with
# such names wait until they are renamed to their final name.
TEMP_NAME_PATTERNS = ("*.tmp", "*.part", ".*")
MAX_EVENTS_PER_STEP = 5000
DEFAULT_POLL_SECONDS = 10.0  # when watch falls back to polling by itself
ROOT_CHECK_SECONDS = 1.0  # how often a watch looks whether DATA_DIR itself was removed or replaced


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    ready: bool  # closed after writing, or renamed in: no need to wait for --settle
    seen_at: float = 0.0  # wall time of its first event: how far behind the watcher is (info)


class _EventHandler:
    """Runs in watchdog's thread: turns events into (kind, relpath, dest) on a queue."""

    def __init__(self, watcher: "Watcher") -> None:
        self.w = watcher

    def dispatch(self, event: Any) -> None:
        kind = event.event_type
        is_dir = event.is_directory
        src = self.w.relpath_of(event.src_path)
        dest = self.w.relpath_of(getattr(event, "dest_path", b"") or b"")
        if kind == "moved":
            if src is not None:
                self.w.post("dir_gone" if is_dir else "gone", src)
            if dest is not None:
                self.w.post("dir_new" if is_dir else "ready", dest)
        elif src is None:
            return
        elif kind == "created":
            self.w.post("dir_new" if is_dir else "changed", src)
        elif kind == "modified" and not is_dir:
            self.w.post("changed", src)
        elif kind == "closed":
            self.w.post("ready", src)
        elif kind == "deleted":
            self.w.post("dir_gone" if is_dir else "gone", src)


class _WatchdogSpy(logging.Handler):
    """watchdog reports a lost-events overflow, and a folder it could not watch (no inotify
    watch left for a new folder), only as log records: listen for them."""

    def __init__(self, overflow: threading.Event) -> None:
        super().__init__(logging.WARNING)
        self.overflow = overflow
        self.unwatched: str | None = None  # the first folder it could not watch

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "overflow" in message.lower():
            self.overflow.set()
        elif message.startswith("Unable to watch") and self.unwatched is None:
            path = record.args[0] if isinstance(record.args, tuple) and record.args else None
            self.unwatched = os.fsdecode(path) if isinstance(path, (bytes, str)) else message


class Watcher:
    """The work source of `crawlproc watch` (see pool.WorkSource)."""

    def __init__(
        self,
        ledger: Ledger,
        data_dir: bytes,
        scan_options: ScanOptions,
        *,
        settle: float,
        rescan_interval: float,
        out_relpath: bytes | None,
        on_skip: Callable[[bytes, str], None],
        on_problem: ProblemReporter | None = None,
        poll: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.data_dir = os.path.abspath(data_dir)
        self._real_root = os.path.realpath(self.data_dir)  # links are never followed out of it
        self.settle = settle
        self.rescan_interval = rescan_interval
        self.out_prefix = out_relpath + b"/" if out_relpath else None
        self.on_skip = on_skip
        self.on_problem = on_problem
        self.skipped: dict[str, int] = {}  # what the last full scan skipped, by kind: told again only if it changes
        self._out_folders_told: set[bytes] = set()  # folders holding a ledger, each logged once
        self.monotonic, self.wall = monotonic, wall
        self.scan_options = dataclasses.replace(scan_options, ignore=TEMP_NAME_PATTERNS)
        self.paths = PathFilter(scan_options.include, (*scan_options.exclude, *TEMP_NAME_PATTERNS))
        self.files = 0
        self.claimed: list[tuple] = []  # watch records tasks pending; the pool claims them
        self.stats: dict[str, Any] = {"watching_since": wall(), "last_event": None, "events": 0, "rescans": 0}
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._candidates: dict[bytes, _Candidate] = {}
        self._due: list[tuple[float, bytes]] = []  # heap of (monotonic due time, relpath)
        self._scans: list[tuple[Scan, float]] = []  # each with its monotonic start, for the debug log
        self._next_rescan = monotonic() + rescan_interval
        self._overflow = threading.Event()
        self._stopped = False
        self.wakeup_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wakeup_fd, False)
        os.set_blocking(self._wake_w, False)
        self.poll: float | None = None  # seconds between polling scans, once polling
        self._observer: Any = None
        self._spy: _WatchdogSpy | None = None
        self._root = _folder_identity(self.data_dir)
        self._next_root_check = monotonic() + ROOT_CHECK_SECONDS
        self._full_scan_again = False  # DATA_DIR was replaced while a full scan listed the old one
        if poll is not None:
            self._start_polling(poll)
            logger.info("polling {} every {:g}s (--poll): no file events are used", os.fsdecode(self.data_dir), poll)
        else:
            self._observe_or_poll()
        # Files the catch-up found still being written are part of it: the first merge (and
        # systemd's READY) waits until they settle, unless they change again after that.
        self._catch_up_held: set[bytes] = set()
        self._catch_up_settled_by = 0.0  # monotonic time by which those files had settled
        self._start_scan(b"")  # catch up, exactly like `run` (events meanwhile are queued)
        self._catch_up = self._scans[0][0]

    # -- pool.WorkSource ----------------------------------------------------------
    @property
    def exhausted(self) -> bool:
        return self._stopped

    @property
    def busy(self) -> bool:
        return bool(self._scans) or not self._events.empty() or self._next_due() <= self.monotonic()

    def wait_hint(self) -> float | None:
        now = self.monotonic()
        return max(0.0, min(self._next_due(), self._next_rescan) - now)

    def step(self, max_files: int) -> int:
        self._drain_wakeups()
        self._check_root()
        self._check_observer()
        if self._overflow.is_set():
            self._overflow.clear()
            logger.warning("file events were lost (inotify queue overflow); rescanning {}", os.fsdecode(self.data_dir))
            self._start_scan(b"")
        if self.monotonic() >= self._next_rescan:
            self._start_scan(b"")
        recorded = self._apply_events()
        scanned, rescan = self._step_scans(max_files)
        recorded += self._record_settled()
        self.files += recorded + (0 if rescan else scanned)  # a rescan walks files recorded before
        return recorded + scanned

    @property
    def caught_up(self) -> bool:
        """The catch-up scan, started with the watcher, is over, and the files it found still
        being written are recorded (a file that changed again since is not waited for: one
        written to all the time would hold the first merge back for ever)."""
        if not self._catch_up.finished:
            return False
        if self._catch_up_held:
            self._catch_up_held = {relpath for relpath in self._catch_up_held
                                   if (candidate := self._candidates.get(relpath)) is not None
                                   and (candidate.ready or
                                        candidate.stable_since + self.settle <= self._catch_up_settled_by)}
        return not self._catch_up_held

    def stop(self) -> None:
        self._stopped = True
        self._stop_observer()
        os.close(self.wakeup_fd)
        os.close(self._wake_w)

    def info(self) -> dict[str, Any]:
        return {**self.stats, "queue_depth": len(self._candidates) + self._events.qsize(),
                "scanning": bool(self._scans), "poll_seconds": self.poll,
                "oldest_queued_at": min((c.seen_at for c in self._candidates.values()), default=None)}

    # -- events (observer thread) ---------------------------------------------------
    def relpath_of(self, path: bytes | str) -> bytes | None:
        """The relpath of an event's path, or None when it is outside, in OUT, or filtered."""
        path = os.fsencode(path)
        if not path.startswith(self.data_dir + b"/"):
            return None
        relpath = path[len(self.data_dir) + 1:]
        if self.out_prefix and (relpath + b"/").startswith(self.out_prefix):
            return None
        return relpath

    def post(self, kind: str, relpath: bytes) -> None:
        self._events.put((kind, relpath))
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the pool will wake anyway) or closed (stopping)

    def _start_observer(self) -> None:
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
        )
        from watchdog.observers import Observer

        self._spy = _WatchdogSpy(self._overflow)
        logging.getLogger("watchdog").addHandler(self._spy)
        observer = Observer()
        observer.daemon = True
        self._observer = observer  # before it starts: a failed start is stopped and unhooked too
        observer.schedule(
            _EventHandler(self), self.data_dir, recursive=True,
            # Not opened/closed-without-writing: our own workers reading files would echo back.
            event_filter=[FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent,
                          FileDeletedEvent, DirCreatedEvent, DirMovedEvent, DirDeletedEvent],
        )
        observer.start()

    def _stop_observer(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            if self._observer.is_alive():
                self._observer.join(timeout=5)
            self._observer = None
        if self._spy is not None:
            logging.getLogger("watchdog").removeHandler(self._spy)
            self._spy = None

    # -- polling, where file events cannot be had --------------------------------------
    def _observe_or_poll(self) -> None:
        """Start the observer, or poll when events would not come (said once, as a WARNING)."""
        no_events = no_events_filesystem(self.data_dir)
        if no_events is not None:
            self._fall_back(no_events)
            return
        try:
            self._start_observer()
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            self._stop_observer()
            self._fall_back(refused(exc.errno))

    def _check_root(self, *, now: bool = False) -> bool:
        """DATA_DIR itself removed, or replaced (an inbox moved away and made again): file events
        stay with the folder they were set on, so the new one's files would wait for a rescan,
        in silence. Its events are set on the new folder, which is scanned at once. True when
        DATA_DIR changed."""
        if not now and self.monotonic() < self._next_root_check:
            return False
        self._next_root_check = self.monotonic() + ROOT_CHECK_SECONDS
        root = _folder_identity(self.data_dir, self._root)
        if root == self._root:
            return False
        was, self._root = self._root, root
        where = os.fsdecode(self.data_dir)
        if root is None:
            logger.warning("DATA_DIR {} is gone (deleted, moved away or unmounted): watching for it to come back",
                           where)
        elif was is None:
            logger.warning("DATA_DIR {} is back: watching it again", where)
        else:
            logger.warning("DATA_DIR {} is another folder now (moved away and made again?): watching the new one",
                           where)
        if self.poll is None or self._observer is not None:  # file events, not --poll: set them on the new one
            self._stop_observer()
            self.poll = None
            if root is not None:
                self._observe_or_poll()
        self._start_scan(b"", after_one_under_way=True)  # its files are what DATA_DIR holds now
        return True

    def _check_observer(self) -> None:
        """Fall back to polling when the observer stopped seeing part of the tree."""
        if self._observer is None:
            return
        if self._spy is not None and self._spy.unwatched is not None:
            self._fall_back(f"{refused(errno.ENOSPC)}; {self._spy.unwatched} is not watched")
        elif not all(emitter.is_alive() for emitter in self._observer.emitters):
            if self._check_root(now=True):  # it stops when DATA_DIR goes: that is said instead
                return
            self._fall_back("the file-event thread stopped")
        else:
            return
        self._start_scan(b"")  # what the unwatched folders got meanwhile

    def _fall_back(self, reason: str) -> None:
        self._stop_observer()
        self._start_polling(DEFAULT_POLL_SECONDS)
        logger.warning("{}: watching {} by scanning it every {:g}s instead of by file events (give "
                       "--poll SECONDS to choose the interval)", reason, os.fsdecode(self.data_dir), self.poll)

    def _start_polling(self, seconds: float) -> None:
        self.poll = seconds
        self.rescan_interval = seconds
        self._next_rescan = min(self._next_rescan, self.monotonic() + seconds)

    # -- events (coordinator) -------------------------------------------------------------
    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wakeup_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _apply_events(self) -> int:
        gone_files: list[bytes] = []
        gone_dirs: list[bytes] = []
        for _ in range(MAX_EVENTS_PER_STEP):
            try:
                kind, relpath = self._events.get_nowait()
            except queue.Empty:
                break
            self.stats["events"] += 1
            self.stats["last_event"] = self.wall()
            if kind == "dir_new":
                if self._folder_wanted(relpath) and not self._inside_crawlproc_out(relpath + b"/", {}):
                    self._start_scan(relpath + b"/")  # it may already hold files we got no event for
            elif kind == "dir_gone":
                gone_dirs.append(relpath + b"/")
            elif kind == "gone":
                self._candidates.pop(relpath, None)
                gone_files.append(relpath)
            elif self._wanted(relpath):
                self._note_change(relpath, ready=kind == "ready")
        if gone_files or gone_dirs:
            with self.ledger.transaction() as conn:
                self.ledger.mark_paths_gone(conn, gone_files, gone_dirs)
        return 0

    def _folder_wanted(self, relpath: bytes) -> bool:
        """False when the folder or one of its parents is excluded (a scan would prune it)."""
        return not self.paths.excludes_any_part(relpath)

    def _wanted(self, relpath: bytes) -> bool:
        """The same choice a scan makes: no file in a pruned folder, no excluded or temp name."""
        parent, _, name = relpath.rpartition(b"/")
        if parent and not self._folder_wanted(parent):
            return False
        return self.paths.wants_file(os.fsdecode(relpath), os.fsdecode(name))

    def _note_change(self, relpath: bytes, *, ready: bool, entry: FileEntry | None = None) -> None:
        """A file may have changed: look at it again when it could have settled.

        `entry` (from a scan) gives its stat already, so it counts as unchanged
        since its mtime rather than since now.
        """
        now = self.monotonic()
        candidate = self._candidates.get(relpath)
        if candidate is None:
            candidate = self._candidates[relpath] = _Candidate(-1, -1, now, ready, self.wall())
        candidate.ready = candidate.ready or ready
        if entry is not None:
            candidate.size, candidate.mtime_ns = entry.size, entry.mtime_ns
            candidate.stable_since = self._mono_of_mtime(entry.mtime_ns, now)
        elif not ready:
            candidate.stable_since = now
        due = now if candidate.ready else candidate.stable_since + self.settle
        heapq.heappush(self._due, (due, relpath))

    def _mono_of_mtime(self, mtime_ns: int, now: float) -> float:
        """A file's mtime on our monotonic clock (never later than now)."""
        return now - max(0.0, self.wall() - mtime_ns / 1e9)

    def _next_due(self) -> float:
        return self._due[0][0] if self._due else float("inf")

    def _record_settled(self) -> int:
        """Stat the candidates whose time has come; record those that are complete."""
        now = self.monotonic()
        rows: list[tuple] = []
        looked_up: dict[bytes, bool] = {}  # folder prefix -> holds a crawlproc ledger, for this round
        while self._due and self._due[0][0] <= now:
            _, relpath = heapq.heappop(self._due)
            candidate = self._candidates.get(relpath)
            if candidate is None:
                continue
            entry = self._settled_entry(relpath, candidate, now)
            if entry is not None:
                del self._candidates[relpath]
                if not self._inside_crawlproc_out(relpath, looked_up):
                    rows.extend(task_rows(entry, self.scan_options.chunk_size))
        if rows:
            with self.ledger.transaction() as conn:
                self.ledger.upsert_scanned(conn, rows, chunked=bool(self.scan_options.chunk_size))
        return len(rows)

    def _inside_crawlproc_out(self, relpath: bytes, looked_up: dict[bytes, bool]) -> bool:
        """Is the path inside a folder that holds a crawlproc ledger (as a scan would skip it)?

        Each folder above it (DATA_DIR's own too) costs one open of `ledger.db`
        (most fail at once), remembered in `looked_up` for the rest of the round.
        """
        folders = [b""] + [relpath[:i + 1] for i, byte in enumerate(relpath) if byte == ord("/")]
        for prefix in folders:  # b'' (DATA_DIR), b'a/', b'a/b/', ...
            if prefix not in looked_up:
                looked_up[prefix] = holds_crawlproc_ledger(os.path.join(self.data_dir, prefix))
            if looked_up[prefix]:
                if prefix not in self._out_folders_told:
                    self._out_folders_told.add(prefix)
                    self.on_skip(prefix.rstrip(b"/") or b".", "holds a crawlproc ledger (an OUT folder, never "
                                                               "input); its files are skipped")
                return True
        return False

    def _settled_entry(self, relpath: bytes, candidate: _Candidate, now: float) -> FileEntry | None:
        # The scan's rules, not a bare stat: a symlink made while we watch is followed only with
        # --follow-symlinks and never out of DATA_DIR, and a FIFO is never handed to a worker.
        verdict = judge_entry(os.path.join(self.data_dir, relpath), self._real_root,
                              self.scan_options.follow_symlinks)
        if verdict.kind != FILE:  # not a file to take in (a deleted one: its delete event marks it gone)
            del self._candidates[relpath]
            if verdict.kind == DIR and self._folder_wanted(relpath):  # a followed link to a folder: its scan
                self._start_scan(relpath + b"/")                        # skips it if it loops back
            elif verdict.reason is not None:
                self.on_skip(relpath, verdict.reason)
            return None
        st = verdict.st
        entry = FileEntry(relpath, st.st_size, st.st_mtime_ns)
        if candidate.ready:
            return entry
        if (st.st_size, st.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
            # First look, or it changed since the last one: unchanged since its mtime.
            candidate.size, candidate.mtime_ns = st.st_size, st.st_mtime_ns
            candidate.stable_since = self._mono_of_mtime(st.st_mtime_ns, now)
        if now - candidate.stable_since >= self.settle:
            return entry
        heapq.heappush(self._due, (candidate.stable_since + self.settle, relpath))
        return None

    # -- scans ------------------------------------------------------------------------
    def _start_scan(self, start: bytes, *, after_one_under_way: bool = False) -> None:
        """A scan of the folder `start` (b"": the whole tree). A full scan already under way is
        enough, unless what it lists is out of date (`after_one_under_way`): then another
        follows it."""
        if not start:
            self._next_rescan = self.monotonic() + self.rescan_interval
            if any(scan.full for scan, _ in self._scans):
                self._full_scan_again |= after_one_under_way
                return
            self.stats["rescans"] += 1
        scan = Scan(self.ledger, self.data_dir, self.scan_options, self.on_skip,
                    start=start, hold_back=self._hold_back, on_problem=self.on_problem)
        self._scans.append((scan, self.monotonic()))

    def _hold_back(self, entry: FileEntry) -> bool:
        """A scan in watch mode must not hand out a file that may still be written."""
        if self.wall() - entry.mtime_ns / 1e9 >= self.settle:
            return False
        self._note_change(entry.relpath, ready=False, entry=entry)
        if not self._catch_up.finished:
            self._catch_up_held.add(entry.relpath)
            due = self._candidates[entry.relpath].stable_since + self.settle
            self._catch_up_settled_by = max(self._catch_up_settled_by, due)
        return True

    def _step_scans(self, max_files: int) -> tuple[int, bool]:
        """Files the current scan went through in this step, and whether it is a rescan of the
        whole tree after the catch-up (whose files were recorded before)."""
        if not self._scans:
            return 0, False
        scan, started = self._scans[0]
        before = scan.files
        scan.step(max_files)
        if scan.finished:
            self._scans.pop(0)
            logger.debug("{} of {} done in {:.3f}s: {} files", "rescan" if scan.full else "partial scan",
                         os.fsdecode(self.data_dir), self.monotonic() - started, scan.files)
            skipped = scan.findings.skipped_counts()
            news = scan.full and skipped != self.skipped  # a rescan that skipped the same says nothing
            for line in scan.outcome_lines(skipped=news):
                logger.info(line)
            if warning := scan.emptied_warning():
                logger.warning(warning)
            if scan.full:
                self.skipped = skipped
                if self._full_scan_again:
                    self._full_scan_again = False
                    self._start_scan(b"")
        return scan.files - before, scan.full and scan is not self._catch_up


def _folder_identity(path: bytes, known: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """(device, inode) of the folder at `path`; None when there is none. Another error (a
    network file system's ESTALE or EIO, a timeout) tells nothing: `known` is kept."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return known
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None
