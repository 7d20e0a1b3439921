"""What a folder holds, listed in the walk's order, in this process or ahead of the walk in helpers.

    walk ──take(folder)──> FolderLister ──(after a few folders)──> helper processes
          <── entries ───        │ nearest folders first                 │ scandir + stat
                                  └── expect(child folders) ─────────────┘

A scan's cost is one stat per file, and a stat is a system call the walk
cannot avoid (a changed file shows only in its own size and mtime). On a
no-op rerun nothing else is left, so the lister spreads the stats of the
folders the walk will enter next over helper processes, while the walk
reconciles what it already has. Listing is idempotent: if a helper fails,
its folders are listed here.

A folder that holds only regular files can also be fingerprinted (names,
sizes and mtimes, see `fingerprint`): when the scanner says which fingerprint
the ledger last recorded for it and nothing changed, the listing is just
UNCHANGED, and the walk skips that folder's files as a whole.

A folder that holds a crawlproc ledger (another OUT, or a copy of one) is
never input: its listing is OUT_FOLDER, and the walk skips it whole. Only
folders holding a file named `ledger.db` pay for reading that file's header.

A helper is a fork of the coordinator (see children.py): it has all it needs
imported, so it serves within a millisecond.
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import marshal
import os
import signal
import time
from array import array
from stat import S_ISDIR, S_ISLNK, S_ISREG

from crawlproc.children import fork_child
from crawlproc.ledger import APPLICATION_ID, LEDGER_NAME

# An entry: (sort key, name, kind, size, mtime_ns, inode). Kinds:
FILE = 0  # a regular file (not a symlink), with its size and mtime
DIR = 1  # a folder (not a symlink), with its inode
OTHER = 2  # a symlink, a special file, or one that could not be stat'ed: the walk decides
# A listing: (status, payload). Statuses:
LISTED = 0  # payload: the entries, sorted by key
VANISHED = 1  # the folder was deleted under us: nothing in it
UNREADABLE = 2  # payload: the error text
LEAF = 3  # asked to fingerprint; only regular files in it. payload: (entries, fingerprint)
UNCHANGED = 4  # a LEAF with the fingerprint the caller expected. payload: none (a lister: file count)
OUT_FOLDER = 5  # it holds a crawlproc ledger: an OUT, never input. payload: none

_HEADER = 4  # bytes of a frame's length


def list_folder(path: bytes, fingerprints: bool = False, expected: bytes | None = None) -> tuple[int, object]:
    """The folder's entries in walk order: by name, a folder's name with '/' appended.

    That order is the byte order of the relpaths the walk yields, the ledger's
    order (a folder's files come after 'x.txt' but before 'x0'). Each entry
    costs one lstat relative to the open folder (no path to resolve again).
    With `fingerprints`, a folder of regular files only is a LEAF, or
    UNCHANGED when its fingerprint is `expected`.
    """
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return VANISHED, None
    except OSError as exc:
        return UNREADABLE, exc.strerror or str(exc)
    try:
        names = os.listdir(path)
        if _LEDGER_FILE in names and holds_crawlproc_ledger(folder):
            return OUT_FOLDER, None
    except FileNotFoundError:
        return VANISHED, None
    except OSError as exc:
        return UNREADABLE, exc.strerror or str(exc)
    else:
        entries = [entry for name in names if (entry := _entry(folder, name)) is not None]
    finally:
        os.close(folder)
    entries.sort()
    if not fingerprints or any(entry[2] != FILE for entry in entries):
        return LISTED, entries
    folder_print = fingerprint(entries)
    if folder_print == expected:
        return UNCHANGED, None
    return LEAF, (entries, folder_print)


_LEDGER_FILE = os.fsencode(LEDGER_NAME)
_SQLITE_MAGIC = b"SQLite format 3\0"
_APPLICATION_ID_AT = 68  # where SQLite's header keeps PRAGMA application_id, big-endian


def holds_crawlproc_ledger(folder: int | bytes) -> bool:
    """Does the folder (an open descriptor, or a path) hold a crawlproc ledger?

    Its `ledger.db` must be a regular file (not a link) whose SQLite header
    carries our application_id. One open, one read.
    """
    try:
        fd = os.open(_LEDGER_FILE if isinstance(folder, int) else os.path.join(folder, _LEDGER_FILE),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=folder if isinstance(folder, int) else None)
    except OSError:
        return False
    try:
        header = os.pread(fd, _APPLICATION_ID_AT + 4, 0) if S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError:
        return False
    finally:
        os.close(fd)
    return (header.startswith(_SQLITE_MAGIC) and len(header) == _APPLICATION_ID_AT + 4
            and int.from_bytes(header[_APPLICATION_ID_AT:], "big") == APPLICATION_ID)


def fingerprint(entries: list[tuple]) -> bytes:
    """What the walk plans from a folder of regular files: their names, sizes and mtimes.

    Any change a scan acts on (a file added, removed, grown, touched) changes it.
    Names cannot hold NUL, so joining them on NUL is unambiguous.
    """
    digest = hashlib.blake2b(b"\0".join([entry[1] for entry in entries]), digest_size=16)
    digest.update(array("q", [entry[3] for entry in entries]).tobytes())
    digest.update(array("q", [entry[4] for entry in entries]).tobytes())
    return digest.digest()


def _entry(folder: int, name: bytes) -> tuple | None:
    try:
        st = os.lstat(name, dir_fd=folder)
    except FileNotFoundError:
        return None  # deleted while we listed
    except OSError:
        return (name, name, OTHER, 0, 0, 0)
    mode = st.st_mode
    if S_ISREG(mode):
        return (name, name, FILE, st.st_size, st.st_mtime_ns, 0)
    if S_ISDIR(mode):
        return (name + b"/", name, DIR, 0, 0, st.st_ino)
    # A symlink to a folder sorts as a folder: followed, it is entered there.
    key = name + b"/" if S_ISLNK(mode) and _is_folder(folder, name) else name
    return (key, name, OTHER, 0, 0, 0)


def _is_folder(folder: int, name: bytes) -> bool:
    try:
        return S_ISDIR(os.stat(name, dir_fd=folder).st_mode)
    except OSError:
        return False


class LocalLister:
    """Lists each folder in this process when the walk reaches it.

    `known` ({folder key: (fingerprint, files)}, as the ledger recorded them)
    turns fingerprints on: a folder found as recorded is UNCHANGED, with its
    recorded file count as payload.
    """

    def __init__(self, known: dict[bytes, tuple[bytes, int]] | None = None) -> None:
        self.known = known

    def expect(self, path: bytes, key: bytes) -> None:
        pass

    def take(self, path: bytes, key: bytes) -> tuple[int, object]:
        return _with_count(list_folder(*self._request(path, key)), self.known, key)

    def _request(self, path: bytes, key: bytes) -> tuple[bytes, bool, bytes | None]:
        """list_folder's arguments for one folder."""
        if self.known is None:
            return path, False, None
        recorded = self.known.get(key)
        return path, True, recorded[0] if recorded else None

    def close(self) -> None:
        pass


def _with_count(listing: tuple[int, object], known: dict | None, key: bytes) -> tuple[int, object]:
    return (UNCHANGED, known[key][1]) if listing[0] == UNCHANGED else listing


class HelperLister(LocalLister):
    """Lists the folders the walk will enter next in helper processes.

    The walk announces each folder it will enter (`expect`, keyed by its relpath
    plus '/', which is the walk's order) and later asks for it (`take`). Helpers
    always get the nearest folders not yet asked for. Memory stays bounded: the
    folders sent or listed ahead of the walk hold about MAX_HELD_ENTRIES
    entries at most (going by the folders listed so far), and no more are sent
    while the listings waiting here hold that many. Announced folders are only
    keys and paths, dropped as the walk passes them. The first LOCAL_FOLDERS
    folders are listed here: a small tree is done before a helper would have
    started.
    """

    LOCAL_FOLDERS = 32
    MAX_HELD_ENTRIES = 50_000

    def __init__(self, helpers: int, known: dict[bytes, tuple[bytes, int]] | None = None) -> None:
        super().__init__(known)
        self._wanted_helpers = helpers
        self._helpers: list[_Helper] | None = None  # started after LOCAL_FOLDERS
        self._taken = 0
        self._expected: list[tuple[bytes, bytes]] = []  # heap of (key, path) not sent yet
        self._sent: dict[bytes, _Helper] = {}
        self._requests: dict[bytes, tuple] = {}  # key -> list_folder's arguments, while sent
        self._listed: dict[bytes, tuple[int, object]] = {}
        self._held = 0
        self._listings = self._entries = 0  # seen so far: the average folder size
        self._last_taken = b""  # the walk takes folders in key order: smaller keys are done

    def expect(self, path: bytes, key: bytes) -> None:
        if self._helpers != []:  # none could start: the walk lists everything itself
            heapq.heappush(self._expected, (key, path))

    def take(self, path: bytes, key: bytes) -> tuple[int, object]:
        self._taken += 1
        self._last_taken = key
        self._drop_passed()
        if self._helpers is None and self._taken > self.LOCAL_FOLDERS:
            self._helpers = _start_helpers(self._wanted_helpers)
        if not self._helpers:
            return super().take(path, key)
        if key in self._sent or key in self._listed:
            while key not in self._listed:
                self._receive(self._sent[key])
            listing = _with_count(self._listed.pop(key), self.known, key)
            self._held -= _size(listing)
        else:  # the helpers are full up with the folders after it: this one is quicker here
            listing = super().take(path, key)
        self._send_more()
        return listing

    def close(self) -> None:
        for helper in self._helpers or ():
            helper.stop()
        self._helpers = []

    # -- internals --------------------------------------------------------------
    def _drop_passed(self) -> None:
        """Forget announced folders the walk has reached (it takes them in key order)."""
        while self._expected and self._expected[0][0] <= self._last_taken:
            heapq.heappop(self._expected)

    def _send_more(self) -> None:
        average = self._entries / self._listings if self._listings else 100
        max_ahead = max(8, int(self.MAX_HELD_ENTRIES / max(average, 1)))
        while self._expected and self._held < self.MAX_HELD_ENTRIES:
            if len(self._sent) + len(self._listed) >= max_ahead:
                break
            key, path = self._expected[0]
            request = self._request(path, key)
            frame = _frame(marshal.dumps(request))
            idle = [h for h in self._helpers if h.can_take(len(frame))]
            if not idle:
                break
            heapq.heappop(self._expected)
            self._send(key, request, frame, min(idle, key=lambda h: len(h.pending)))
        for helper in self._helpers:  # before the walk waits for any answer
            if helper.alive:
                helper.flush()

    def _send(self, key: bytes, request: tuple, frame: bytes, helper: _Helper) -> None:
        if helper.send(key, frame):
            self._sent[key] = helper
            self._requests[key] = request

    def _receive(self, helper: _Helper) -> None:
        """The oldest answer of `helper`; if it died, list its folders here instead."""
        key = helper.pending[0]
        listing = helper.receive()
        for done_key, result in ([(key, listing)] if listing is not None else
                                 [(k, list_folder(*self._requests[k])) for k in helper.take_pending()]):
            del self._sent[done_key]
            del self._requests[done_key]
            self._listed[done_key] = result
            self._held += _size(result)
            self._listings += 1
            self._entries += _size(result)


def _size(listing: tuple[int, object]) -> int:
    """Entries a listing holds."""
    status, payload = listing
    return len(payload) if status == LISTED else len(payload[0]) if status == LEAF else 0


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_HEADER, "little") + data


class _Helper:
    """One helper process and the keys it has been sent, oldest first."""

    # Unanswered requests stay under one pipe buffer's floor, so writing one never blocks
    # while the helper waits for us to read its answers (that would deadlock).
    MAX_REQUEST_BYTES = 4096

    def __init__(self, process) -> None:
        self.process = process
        self.pending: list[bytes] = []
        self._request_sizes: list[int] = []
        self.alive = True

    def can_take(self, frame_size: int) -> bool:
        if not self.alive:
            return False
        return not self.pending or sum(self._request_sizes) + frame_size <= self.MAX_REQUEST_BYTES

    def send(self, key: bytes, frame: bytes) -> bool:
        """Queue one request; with nothing pending it is sent whatever its size (the helper is reading)."""
        try:
            self.process.stdin.write(frame)  # flushed by flush(), once per round of sends
        except OSError:
            self._died()
            return False
        self.pending.append(key)
        self._request_sizes.append(len(frame))
        return True

    def receive(self) -> tuple[int, object] | None:
        """The answer to the oldest request, or None if the helper is gone."""
        try:
            data = _read_frame(self.process.stdout)
            listing = marshal.loads(data) if data is not None else None
        except (OSError, ValueError, EOFError, TypeError):
            listing = None
        if listing is None:
            self._died()
            return None
        self.pending.pop(0)
        self._request_sizes.pop(0)
        return listing

    def take_pending(self) -> list[bytes]:
        pending, self.pending, self._request_sizes = self.pending, [], []
        return pending

    def _died(self) -> None:
        if self.alive:
            self.alive = False
            from loguru import logger

            logger.debug("folder-listing helper {} stopped; listing its folders here", self.process.pid)

    def flush(self) -> None:
        try:
            self.process.stdin.flush()
        except OSError:
            self._died()

    def stop(self) -> None:
        """End the helper now: it keeps no state, and waiting for it to see EOF costs time."""
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.process.kill()
        self.process.wait()  # killed: it ends at once


def _start_helpers(count: int) -> list[_Helper]:
    """Helper processes, or none when they cannot start (the walk then lists here)."""
    helpers = []
    for _ in range(count):
        child = _fork_helper()
        if child is None:
            break
        helpers.append(_Helper(child))
    return helpers


def _fork_helper() -> _Child | None:
    """A helper forked from this process: it has everything it needs imported already, so it
    is serving within a millisecond (a new interpreter took ~20 ms of CPU to start)."""
    child = fork_child(_serve_forked, close_others=True)
    if child is None:
        return None
    pid, requests, answers = child
    return _Child(pid, open(requests, "wb"), open(answers, "rb"))


def _serve_forked(requests_fd: int, answers_fd: int) -> None:
    # Stopping is the coordinator's job: it closes our requests (or dies, which closes them too).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()  # a collection would touch, and so copy, every page inherited from the parent
    with open(requests_fd, "rb") as requests, open(answers_fd, "wb") as answers:
        serve(requests, answers)


class _Child:
    """A forked helper, seen through the part of subprocess.Popen's interface the lister uses."""

    def __init__(self, pid: int, stdin, stdout) -> None:
        self.pid = pid
        self.stdin = stdin  # our requests
        self.stdout = stdout  # its answers
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, waiting up to `timeout` seconds (TimeoutError) or for good."""
        if timeout is None:
            if self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
            return self.returncode
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"listing helper {self.pid} did not end within {timeout} s")
            time.sleep(0.001)  # a killed child ends within a few ms
        return self.returncode


def _read_frame(stream) -> bytes | None:
    header = stream.read(_HEADER)
    if len(header) < _HEADER:
        return None
    size = int.from_bytes(header, "little")
    data = stream.read(size)
    return data if len(data) == size else None


def serve(requests, answers) -> None:
    """The helper's loop: list_folder's arguments in, its listing out, until the coordinator hangs up."""
    while (request := _read_frame(requests)) is not None:
        answers.write(_frame(marshal.dumps(list_folder(*marshal.loads(request)))))
        answers.flush()


