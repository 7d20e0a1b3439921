"""The live status page, /status.json, /healthz and Prometheus /metrics of a run or an OUT.

    coordinator turn ──on_progress──> LiveBoard (at most every ~0.5 s: Coordinator.live_view)
                                          │ snapshot: one message, never waited for
                                          v
    page process (page_process.py)          RelayedBoard: the snapshot, swapped whole
    HTTP client ──> server thread: reads each request (deadline) ──> a thread answers it (capped)
                        │  /             page.html (inline CSS and JS, polls /status.json)
                        │  /status.json  StatusView: `status --json` + the snapshot + latest failures
                        │  /metrics      metrics.RunCollector, reading the same view at scrape time
                        │  /healthz      "ok"
                        └─ ledger reads: read-only, a connection of their own, cached a while

`--serve` on `run`/`watch` binds the port in the coordinator and serves from a
process of its own, fed by the coordinator (board.LiveBoard -> board.RelayedBoard):
no request, ledger read or import of the page takes the run's CPU or its GIL.
`crawlproc serve` serves any OUT, finished or running, from the ledger alone
(board.LedgerBoard), in its own process. A slow or stuck client can never stall
the run. Nothing here serves file contents, and nothing answers anything but GET
and HEAD.

This module stays light (the CLI parses --serve with it): the server, the
views and prometheus_client are imported only when serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8700  # `crawlproc serve`; --serve always names its port
INSTALL_HINT = "pip install 'crawlproc[serve]'"


class Address(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def listen_host(host: str) -> str:
    """The host as a socket takes it ('[::1]' -> '::1', blanks around it dropped); UsageError for an
    empty or all-blank one, which the system would take for every interface: an empty $HOST in a
    script must not put the page on the network."""
    bare = host.strip().strip("[]").strip()
    if not bare:
        raise UsageError(f"the host to serve on is empty ({host!r}): give one, e.g. {DEFAULT_HOST} (the default), "
                         "or 0.0.0.0 for every interface")
    return bare


def parse_address(text: str) -> Address:
    """'8080' -> 127.0.0.1:8080; 'HOST:PORT', '[::1]:8080' as given. Port 0 picks a free one."""
    host, sep, port = text.strip().rpartition(":")
    if port.isdigit() and int(port) <= 65535:
        try:
            return Address(listen_host(host) if sep else DEFAULT_HOST, int(port))
        except UsageError:
            pass  # ':8080', an empty host: said as any value not [HOST:]PORT
    raise UsageError(f"--serve {text!r} is not [HOST:]PORT, e.g. 8080 or 0.0.0.0:8080 (port 0: any free port)")


def check_available() -> None:
    """UsageError (exit 2) naming the extra when prometheus_client is not installed.

    Found, not imported: it is imported by the first scrape of /metrics, so a run whose
    metrics nobody reads does not pay for it."""
    from importlib.util import find_spec

    try:
        found = find_spec("prometheus_client") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UsageError(f"the status page and /metrics need prometheus_client: {INSTALL_HINT}")


@contextmanager
def serving_run(address: str, out: Path, command: str) -> Iterator[Any]:
    """`--serve` on `run`/`watch`: bound before the job starts (a port in use stops it before
    anything is written), served by the page process until the job ends. Yields the board
    the job's coordinators publish to (board.LiveBoard)."""
    check_available()
    from loguru import logger

    from crawlproc.serve.board import LiveBoard
    from crawlproc.serve.page_process import PageProcess

    page = PageProcess(parse_address(address), out)
    logger.info("status page: {} (also /status.json, /metrics, /healthz)", page.url)
    try:
        yield LiveBoard(command, page.send)
    finally:
        page.close()


def serve_out(out: Path, address: Address, *, ready: Callable[[str], None]) -> None:
    """`crawlproc serve`: the page of OUT, finished or running, read from its ledger alone, until
    SIGINT or SIGTERM. `ready(url)` is called once it listens."""
    check_available()
    import signal
    import threading

    from crawlproc.report import status_data
    from crawlproc.serve.board import LedgerBoard
    from crawlproc.serve.server import StatusServer, listening_socket, page_url
    from crawlproc.serve.view import StatusView

    status_data(out)  # no OUT, no ledger: the same one line as `crawlproc status`
    sock, bound = listening_socket(address, "--port")
    server = StatusServer(sock, StatusView(out, LedgerBoard()))
    stop = threading.Event()
    previous = {signum: signal.signal(signum, lambda *_: stop.set()) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        ready(page_url(bound))
        while not stop.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.close()
