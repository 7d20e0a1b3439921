"""The HTTP side of the status page: routes, safety headers, one thread per request.

Imported by the server's own thread (server.py), in the page process for
--serve: the run never imports `http.server` (and the email and HTML modules it
brings).

    GET|HEAD  /             page.html (Content-Security-Policy: its own inline code only)
              /status.json  StatusView.document()
              /metrics      metrics.RunCollector, in a registry of its own
              /healthz      "ok"
    anything else: 404; any other method: 405
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from loguru import logger

from crawlproc.serve.server import MAX_CLIENTS, REQUEST_TIMEOUT_SECONDS
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
    server: "PageHTTPServer"
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


class PageHTTPServer(HTTPServer):
    """Answers on a socket already bound and listening (server.StatusServer), one thread per
    request, at most MAX_CLIENTS of them: beyond that a client is turned away."""

    def __init__(self, sock: socket.socket, view: StatusView) -> None:
        self.address_family = sock.family
        self.routes = _routes(view)
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()  # the one TCPServer made: the bound socket is used instead
        self.socket = sock
        self.server_name, self.server_port = "crawlproc", sock.getsockname()[1]

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        threading.Thread(target=self._serve_one, args=(request, client_address), name="crawlproc-serve-request",
                         daemon=True).start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # the client went away or timed out: nothing to tell anyone
        except Exception as exc:
            logger.debug("status page: a request failed: {!r}", exc)
        finally:
            self.shutdown_request(request)
            self.slots.release()


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
