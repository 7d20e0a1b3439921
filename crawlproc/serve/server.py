"""The HTTP side of the status page: routes, safety headers, and threads that never hold up a run.

    accept thread (select on the socket and a wake-up pipe; close() wakes it at once)
        └─> one daemon thread per request, at most MAX_CLIENTS at a time (more are closed
            at once), each socket with a REQUEST_TIMEOUT_SECONDS timeout, each thread at
            nice PAGE_NICENESS (on busy cores the page waits for the run, not the reverse)
              GET|HEAD  /             page.html (Content-Security-Policy: its own inline code only)
                        /status.json  StatusView.document()
                        /metrics      metrics.RunCollector
                        /healthz      "ok"
              anything else: 404; any other method: 405

A stuck or slow client ties up one of those threads until its timeout, never
the coordinator, which only swaps snapshots (board.py). These threads take no
lock a forked child of the coordinator needs (children.fork_safe_thread), so the
reducer still runs in its own child while the page is served.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import selectors
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from loguru import logger

from crawlproc.children import fork_safe_thread, forget_kept, keep_from_children
from crawlproc.errors import AddressInUse, UsageError, WayOut
from crawlproc.serve import DEFAULT_HOST, Address
from crawlproc.serve.view import StatusView

MAX_CLIENTS = 16
REQUEST_TIMEOUT_SECONDS = 10.0
PAGE_NICENESS = 10  # a request's thread runs at this nice value: ~10% of a core the run wants
PAGE_FILE = Path(__file__).with_name("page.html")
ALLOWED = "GET, HEAD"


def _page_and_policy() -> tuple[bytes, str]:
    """The page, and a Content-Security-Policy that lets run only its own inline script and style
    (by hash) and fetch only from this server: nothing from the internet, no injected code."""
    page = PAGE_FILE.read_bytes()
    hashes = {}
    for tag in ("script", "style"):
        body = re.search(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), page, re.S).group(1)
        hashes[tag] = "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
    policy = (f"default-src 'none'; script-src {hashes['script']}; style-src {hashes['style']}; "
              "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return page, policy


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "crawlproc"
    sys_version = ""  # the Server header names no Python version
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive threads
    timeout = REQUEST_TIMEOUT_SECONDS

    def do_GET(self) -> None:
        self._respond(head=False)

    def do_HEAD(self) -> None:
        self._respond(head=True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # POST, PUT, DELETE, ...: read-only, whatever the method
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(405, "text/plain; charset=utf-8", b"read-only: only GET and HEAD\n", head=False,
                   extra={"Allow": ALLOWED})

    def _respond(self, *, head: bool) -> None:
        route = self.server.routes.get(urlsplit(self.path).path)
        if route is None:
            self._send(404, "text/plain; charset=utf-8", b"not found: try / /status.json /metrics /healthz\n",
                       head=head)
            return
        try:
            content_type, body, extra = route()
        except Exception as exc:  # one line, no traceback, and the server goes on
            logger.debug("status page: {} failed: {!r}", self.path, exc)
            self._send(500, "text/plain; charset=utf-8", f"error: {exc}\n".encode(), head=head)
            return
        self._send(200, content_type, body, head=head, extra=extra)

    def _send(self, code: int, content_type: str, body: bytes, *, head: bool,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", **(extra or {})}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a request is not news; the run's log stays about the run


class _HTTPServer(HTTPServer):
    """One thread per request, at most MAX_CLIENTS of them: beyond that a client is turned away."""

    def __init__(self, address: Address, routes: dict[str, Callable[[], tuple]]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        self.routes = routes
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__((address.host, address.port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        fork_safe_thread(self._serve_one, (request, client_address), "crawlproc-serve-request").start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        _yield_to_the_run()
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # the client went away or timed out: nothing to tell anyone
        except Exception as exc:
            logger.debug("status page: a request failed: {!r}", exc)
        finally:
            self.shutdown_request(request)
            self.slots.release()


class StatusServer:
    """Bound at construction (a port in use is an error before anything runs); `start`, `close`."""

    def __init__(self, address: Address, view: StatusView, *, option: str = "--serve") -> None:
        page, policy = _page_and_policy()
        self.view = view
        self._metrics: Any = None
        routes = {
            "/": lambda: ("text/html; charset=utf-8", page, {"Content-Security-Policy": policy,
                                                             "X-Frame-Options": "DENY"}),
            "/status.json": lambda: ("application/json", json.dumps(view.document()).encode(), None),
            "/metrics": self._metrics_response,
            "/healthz": lambda: ("text/plain; charset=utf-8", b"ok\n", None),
        }
        try:
            self._http = _HTTPServer(address, routes)
        except OSError as exc:
            raise _bind_error(address, exc, option) from None
        keep_from_children(self._http.fileno())  # a forked child must not keep the port
        self.address = Address(address.host, self._http.server_address[1])
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = "localhost" if self.address.host in ("127.0.0.1", "::1") else self.address.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.address.port}/"

    def start(self) -> None:
        self._thread = fork_safe_thread(self._accept_loop, (), "crawlproc-serve")
        self._thread.start()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._http.socket, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj == self._wake_r:
                        return
                    self._http.handle_request()

    def close(self) -> None:
        """Stop accepting at once; requests being answered finish on their own (daemon threads)."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
        forget_kept(self._http.fileno())
        self._http.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _metrics_response(self) -> tuple[str, bytes, None]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from crawlproc.serve.metrics import RunCollector

        if self._metrics is None:
            self._metrics = CollectorRegistry(auto_describe=False)
            self._metrics.register(RunCollector(self.view))
        return CONTENT_TYPE_LATEST, generate_latest(self._metrics), None


def _yield_to_the_run() -> None:
    """Lower this thread's priority (Linux schedules threads one by one: the nice value is the
    thread's). On cores the run keeps busy, an answer then waits for the CPU the run leaves,
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
