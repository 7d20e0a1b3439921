"""The HTTP side of the status page: routes, safety headers, a thread to answer each request.

Imported by the server's own thread (server.py), in the page process for
--serve: the run never imports `http.server` (and the email and HTML modules it
brings).

    GET|HEAD  /             page.html (Content-Security-Policy: its own inline code only)
              /status.json  StatusView.document()
              /metrics      metrics.RunCollector, in a registry of its own
              /healthz      "ok"
    anything else: 404; any other method: 405

The server's thread has read the request line and headers already (server.Arrivals): a
thread here only parses them and writes the answer, within Limits.answer_seconds.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from loguru import logger

from crawlproc.serve.server import Limits
from crawlproc.serve.view import StatusView

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
    server: "PageAnswers"
    server_version = "crawlproc"
    sys_version = ""  # the Server header names no Python version
    protocol_version = "HTTP/1.0"  # one request per connection: no idle keep-alive connections

    def __init__(self, connection: socket.socket, client_address: Any, server: "PageAnswers",
                 received: bytes) -> None:
        self._received = received
        super().__init__(connection, client_address, server)

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self._received)  # the request line and headers, all there already
        self.wfile = DeadlineWriter(self.connection, self.server.limits.answer_seconds)

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


class DeadlineWriter(io.BufferedIOBase):
    """A connection as a handler's wfile: all it is given is written within `seconds` of the first
    write, however slowly the client reads (sendall's timeout bounds one call; an answer takes a
    few: the headers, then the body)."""

    def __init__(self, connection: socket.socket, seconds: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._connection, self._seconds, self._clock = connection, seconds, clock
        self._deadline: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self._deadline is None:
            self._deadline = self._clock() + self._seconds
        left = self._deadline - self._clock()
        if left <= 0:
            raise TimeoutError(f"the answer was not written within {self._seconds:g} s")
        self._connection.settimeout(left)
        self._connection.sendall(data)
        with memoryview(data) as view:
            return view.nbytes


class PageAnswers:
    """Answers each request that is all there (server.StatusServer hands it over) in a daemon
    thread of its own, at most `limits.answering` at a time: beyond that a client is turned away,
    as each of those threads is done within `limits.answer_seconds` of its first write."""

    def __init__(self, view: StatusView, limits: Limits) -> None:
        self.routes = _routes(view)
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.answering)

    def answer(self, connection: socket.socket, client_address: Any, received: bytes) -> None:
        if not self._slots.acquire(blocking=False):
            _close(connection)
            return
        threading.Thread(target=self._answer_one, args=(connection, client_address, received),
                         name="crawlproc-serve-request", daemon=True).start()

    def _answer_one(self, connection: socket.socket, client_address: Any, received: bytes) -> None:
        try:
            _Handler(connection, client_address, self, received)
        except OSError:
            pass  # the client went away or read too slowly: nothing to tell anyone
        except Exception as exc:
            logger.debug("status page: a request failed: {!r}", exc)
        finally:
            _close(connection)
            self._slots.release()


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_WR)  # the client reads the answer to its end
    except OSError:
        pass
    connection.close()


def _routes(view: StatusView) -> dict[str, Callable[[], tuple[str, bytes, dict[str, str] | None]]]:
    page, policy = _page_and_policy()
    metrics: list[Any] = []  # the registry, made by the first scrape (prometheus_client is imported then)

    def metrics_response() -> tuple[str, bytes, None]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        from crawlproc.serve.metrics import RunCollector

        if not metrics:
            metrics.append(CollectorRegistry(auto_describe=False))
            metrics[0].register(RunCollector(view))
        return CONTENT_TYPE_LATEST, generate_latest(metrics[0]), None

    return {
        "/": lambda: ("text/html; charset=utf-8", page, {"Content-Security-Policy": policy, "X-Frame-Options": "DENY"}),
        "/status.json": lambda: ("application/json", json.dumps(view.document()).encode(), None),
        "/metrics": metrics_response,
        "/healthz": lambda: ("text/plain; charset=utf-8", b"ok\n", None),
    }
