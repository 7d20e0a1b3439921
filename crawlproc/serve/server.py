"""The status page's socket and threads.

    listening_socket(address)   bound and listening at once: a port in use is exit 2 before
                                the job writes anything (for --serve, in the coordinator,
                                which then hands the socket to the page process)
    StatusServer(socket, view)  start(): one thread imports handler.py, accepts, and reads
                                each request itself without blocking (a selector on the
                                socket, the connections still sending and a wake-up pipe;
                                close() wakes it at once)
        ├─ Arrivals: each connection until its request line and headers are all there, cut
        │  off `request_seconds` after it was accepted; beyond `waiting` of them, a new one
        │  drops the oldest
        └─> a request all there: a daemon thread answers it (handler.PageAnswers), at most
            `answering` at a time (more are closed at once), writing it within `answer_seconds`

Why the requests are read here and not by those threads: with a thread per connection
from its accept on, 16 clients that sent nothing (a browser opens idle speculative
connections) or a byte now and then ("slowloris") held every thread, for as long as they
kept trickling, and everyone else was turned away. Waiting for a request now costs a file
descriptor, not a thread, and a thread is taken only by a request that is all there, and
only until its answer is written. The oldest waiting connection is the one dropped: it has
had the longest to send its request, and a real client sends its own at once.

Connections that come before the thread is ready wait in the listen queue. None of this
can stall the run: with --serve all of it runs in the page process (page_process.py).
"""

from __future__ import annotations

import errno
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from crawlproc.errors import AddressInUse, UsageError, WayOut
from crawlproc.serve import DEFAULT_HOST, Address, listen_host
from crawlproc.serve.view import StatusView

LISTEN_BACKLOG = 64  # a burst of connections waits here until the server's thread takes them
RECV_BYTES = 4096
END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")  # the empty line after the headers (http.server takes a bare \n too)


@dataclass(frozen=True)
class Limits:
    """How many clients the page takes on, and for how long."""

    waiting: int = 64  # connections still sending their request: a file descriptor each, no thread
    answering: int = 16  # requests being answered: a thread each
    request_seconds: float = 10.0  # from the accept to the end of the headers, in all
    answer_seconds: float = 10.0  # from the first byte of the answer written to its last, in all
    request_bytes: int = 64 * 1024  # a request line and headers longer than this are dropped


class StatusServer:
    """Serves `view` on a listening socket: `start`, `close` (which closes the socket too)."""

    def __init__(self, sock: socket.socket, view: StatusView, *, limits: Limits = Limits()) -> None:
        self.view = view
        self.limits = limits
        self._socket = sock
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="crawlproc-serve", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            from crawlproc.serve.handler import PageAnswers

            answers = PageAnswers(self.view, self.limits)
        except Exception as exc:  # the page is a bystander: the run goes on without it
            logger.warning("the status page could not start: {!r}", exc)
            return
        self._socket.setblocking(False)  # a client gone between the select and the accept: no wait
        with selectors.DefaultSelector() as selector:
            arrivals = Arrivals(selector, self.limits)
            selector.register(self._socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select(arrivals.seconds_left()):
                        if key.fileobj == self._wake_r:
                            return
                        if key.fileobj is self._socket:
                            self._accept(arrivals)
                        elif (request := arrivals.read(key.data)) is not None:
                            answers.answer(key.data.connection, key.data.address, request)
                    arrivals.drop_late()
            finally:
                arrivals.close()

    def _accept(self, arrivals: Arrivals) -> None:
        try:
            connection, address = self._socket.accept()
        except OSError as exc:  # gone before it was taken, or no file descriptor left for it
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                arrivals.drop_oldest()  # or the socket, still readable, would wake us at once again
            return
        arrivals.add(connection, address)

    def close(self) -> None:
        """Stop accepting at once; requests being answered finish on their own (daemon threads)."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        self._socket.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class Arrival:
    """A connection still sending its request, and what it sent so far."""

    def __init__(self, connection: socket.socket, address: Any, deadline: float) -> None:
        self.connection, self.address, self.deadline = connection, address, deadline
        self.received = bytearray()


class Arrivals:
    """The connections still sending their request, oldest first, read by the server's thread
    without blocking (the selector's data of each is its Arrival)."""

    def __init__(self, selector: selectors.BaseSelector, limits: Limits, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._selector, self._limits, self._clock = selector, limits, clock
        # In the order they came, which is their deadlines' order too (the same time for each).
        self._waiting: dict[Arrival, None] = {}

    def add(self, connection: socket.socket, address: Any) -> None:
        if len(self._waiting) >= self._limits.waiting:
            self.drop_oldest()
        connection.setblocking(False)
        arrival = Arrival(connection, address, self._clock() + self._limits.request_seconds)
        self._waiting[arrival] = None
        self._selector.register(connection, selectors.EVENT_READ, arrival)

    def read(self, arrival: Arrival) -> bytes | None:
        """What the connection sent, once its request line and headers are all there (then it
        waits no more: the caller answers it); None until then."""
        if arrival not in self._waiting:  # dropped for a newer one earlier in the same select
            return None
        try:
            chunk = arrival.connection.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        searched_to = max(0, len(arrival.received) - 3)  # an end of headers split across two reads
        arrival.received += chunk
        if chunk and END_OF_HEADERS.search(arrival.received, searched_to):
            self._forget(arrival)
            return bytes(arrival.received)
        if not chunk or len(arrival.received) > self._limits.request_bytes:
            self._drop(arrival)
        return None

    def drop_late(self) -> None:
        """Close the connections whose request is not all there by their deadline."""
        now = self._clock()
        while self._waiting and (oldest := next(iter(self._waiting))).deadline <= now:
            self._drop(oldest)

    def seconds_left(self) -> float | None:
        """Until the oldest's deadline (None: nobody waits): how long the selector may sleep."""
        if not self._waiting:
            return None
        return max(0.0, next(iter(self._waiting)).deadline - self._clock())

    def drop_oldest(self) -> None:
        """Make room: the oldest has had the longest to send its request (a real client sends
        its own at once)."""
        if self._waiting:
            self._drop(next(iter(self._waiting)))

    def close(self) -> None:
        for arrival in list(self._waiting):
            self._drop(arrival)

    def _forget(self, arrival: Arrival) -> None:
        self._selector.unregister(arrival.connection)
        del self._waiting[arrival]

    def _drop(self, arrival: Arrival) -> None:
        self._forget(arrival)
        arrival.connection.close()


def page_url(address: Address) -> str:
    host = "localhost" if address.host in ("127.0.0.1", "::1") else address.host
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{address.port}/"


def listening_socket(address: Address, option: str) -> tuple[socket.socket, Address]:
    """The socket, bound and listening, and its address (port 0: the one the system gave)."""
    address = Address(listen_host(address.host), address.port)  # never every interface for want of a host
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free
        sock.bind((address.host, address.port))
        sock.listen(LISTEN_BACKLOG)
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
