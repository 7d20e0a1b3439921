"""The status page's socket and threads: bound before the run, served at a low priority.

    StatusServer(address)   binds and listens at once (a port in use is exit 2 before the
                            job writes anything); nothing of HTTP is imported yet
    start()                 one thread, at nice PAGE_NICENESS, imports handler.py and accepts
                            (select on the socket and a wake-up pipe; close() wakes it at once)
        └─> one daemon thread per request (handler.PageHTTPServer), at most MAX_CLIENTS at a
            time (more are closed at once), each socket with a REQUEST_TIMEOUT_SECONDS
            timeout, each thread at nice PAGE_NICENESS too

Connections that come before the thread is ready wait in the listen queue. A
stuck or slow client ties up one of those threads until its timeout, never the
coordinator, which only swaps snapshots (board.py); on cores the run keeps busy
the page waits for the run, not the reverse. These threads take no lock a forked
child of the coordinator needs (children.fork_safe_thread), so the reducer still
runs in its own child while the page is served.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading

from loguru import logger

from crawlproc.children import fork_safe_thread, forget_kept, keep_from_children
from crawlproc.errors import AddressInUse, UsageError, WayOut
from crawlproc.serve import DEFAULT_HOST, Address
from crawlproc.serve.view import StatusView

MAX_CLIENTS = 16
REQUEST_TIMEOUT_SECONDS = 10.0
PAGE_NICENESS = 10  # the page's threads run at this nice value: ~10% of a core the run wants


class StatusServer:
    """Bound at construction (a port in use is an error before anything runs); `start`, `close`."""

    def __init__(self, address: Address, view: StatusView, *, option: str = "--serve") -> None:
        self.view = view
        self._socket = _listening_socket(address, option)
        keep_from_children(self._socket.fileno())  # a forked child must not keep the port
        self.address = Address(address.host, self._socket.getsockname()[1])
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "localhost" if self.address.host in ("127.0.0.1", "::1") else self.address.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.address.port}/"

    def start(self) -> None:
        self._thread = fork_safe_thread(self._serve, (), "crawlproc-serve")
        self._thread.start()

    def _serve(self) -> None:
        yield_to_the_run()
        try:
            from crawlproc.serve.handler import PageHTTPServer

            http = PageHTTPServer(self._socket, self.view)
        except Exception as exc:  # the page is a bystander: the run goes on without it
            logger.warning("the status page could not start: {!r}", exc)
            return
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    http.handle_request()

    def close(self) -> None:
        """Stop accepting at once; requests being answered finish on their own (daemon threads)."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        forget_kept(self._socket.fileno())
        self._socket.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _listening_socket(address: Address, option: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        sock.bind((address.host, address.port))
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise _bind_error(address, exc, option) from None
    return sock


def yield_to_the_run() -> None:
    """Lower this thread's priority (Linux schedules threads one by one: the nice value is the
    thread's). On cores the run keeps busy, the page then waits for the CPU the run leaves,
    rather than the run waiting for the page; on idle cores nothing changes."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, max(PAGE_NICENESS, os.getpriority(os.PRIO_PROCESS, thread)))
    except (AttributeError, OSError):  # not Linux, or not allowed: the answer comes as it would
        pass


def _bind_error(address: Address, exc: OSError, option: str) -> UsageError:
    """One line naming the address; for a port in use, the same command on any free port."""
    if exc.errno == errno.EADDRINUSE:
        if option == "--serve":
            free = f"--serve={address.host}:0" if address.host != DEFAULT_HOST else "--serve=0"
            drop = ("--serve", str(address.port), str(address), f"--serve={address.port}", f"--serve={address}")
        else:
            free, drop = f"{option}=0", (option, str(address.port), f"{option}={address.port}")
        return AddressInUse(f"cannot serve the status page on {address}: the address is in use by another program",
                            [WayOut("to take any free port (the log says which)", free, drop)])
    if exc.errno == errno.EACCES:
        return UsageError(f"cannot serve on {address}: port {address.port} needs privileges; pick one above 1023")
    return UsageError(f"cannot serve on {address}: {exc.strerror or exc}")
