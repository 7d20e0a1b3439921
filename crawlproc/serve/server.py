"""The status page's socket and threads.

    listening_socket(address)   bound and listening at once: a port in use is exit 2 before
                                the job writes anything (for --serve, in the coordinator,
                                which then hands the socket to the page process)
    StatusServer(socket, view)  start(): one thread imports handler.py and accepts (select on
                                the socket and a wake-up pipe; close() wakes it at once)
        └─> one daemon thread per request (handler.PageHTTPServer), at most MAX_CLIENTS at a
            time (more are closed at once), each socket with a REQUEST_TIMEOUT_SECONDS timeout

Connections that come before the thread is ready wait in the listen queue. A
stuck or slow client ties up one of those threads until its timeout, never the
run: with --serve all of this runs in the page process (page_process.py).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import threading

from loguru import logger

from crawlproc.errors import AddressInUse, UsageError, WayOut
from crawlproc.serve import DEFAULT_HOST, Address
from crawlproc.serve.view import StatusView

MAX_CLIENTS = 16
REQUEST_TIMEOUT_SECONDS = 10.0


class StatusServer:
    """Serves `view` on a listening socket: `start`, `close` (which closes the socket too)."""

    def __init__(self, sock: socket.socket, view: StatusView) -> None:
        self.view = view
        self._socket = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="crawlproc-serve", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
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
        self._socket.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def page_url(address: Address) -> str:
    host = "localhost" if address.host in ("127.0.0.1", "::1") else address.host
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{address.port}/"


def listening_socket(address: Address, option: str) -> tuple[socket.socket, Address]:
    """The socket, bound and listening, and its address (port 0: the one the system gave)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        sock.bind((address.host, address.port))
        sock.listen(MAX_CLIENTS)
    except OSError as exc:
        sock.close()
        raise _bind_error(address, exc, option) from None
    return sock, Address(address.host, sock.getsockname()[1])


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
