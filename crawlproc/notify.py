"""systemd's notify protocol, for `crawlproc watch` run as a service (Type=notify).

    watch_job ──on every coordinator turn──> ServiceNotifier.tick(caught_up, stats)
        READY=1         once, when the catch-up is processed (and merged)
        STATUS=...      counts, when they changed, at most once a second
        WATCHDOG=1      every half of WATCHDOG_USEC, from the coordinator's loop (which
                        sleeps 0.5 s at most): a stuck loop stops pinging, and systemd
                        restarts the service
    watch_job, once the loop is over ──> STOPPING=1

Each message is one datagram on the AF_UNIX socket named by NOTIFY_SOCKET (a
leading '@' is an abstract address). Without NOTIFY_SOCKET every call does
nothing. A socket that went away (systemd restarted) or that nobody reads (its
queue full) never stops the watch: sends never block, and a failed or dropped
send is logged once at DEBUG and forgotten.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from loguru import logger

STATUS_EVERY = 1.0  # seconds between STATUS= updates at most


class ServiceNotifier:
    """Sends notify messages to systemd; inert when NOTIFY_SOCKET is not set."""

    def __init__(self, environ: Mapping[str, str] = os.environ, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self.watchdog_every = _watchdog_interval(environ)
        self.monotonic = monotonic
        self.ready_sent = False
        self._socket: socket.socket | None = None
        self._next_ping = monotonic()
        self._next_status = monotonic()
        self._last_status: str | None = None
        self._failed = False

    @property
    def active(self) -> bool:
        return self.address is not None

    def tick(self, caught_up: Callable[[], bool], status: Callable[[], str]) -> None:
        """One coordinator turn: READY once caught up, STATUS when it changed, WATCHDOG when due.

        `caught_up` and `status` are called only when a message may be sent.
        """
        if not self.active:
            return
        now = self.monotonic()
        if not self.ready_sent and caught_up():
            self.ready_sent = True
            self._last_status, self._next_status = status(), now + STATUS_EVERY
            self.send("READY=1", f"STATUS={self._last_status}")
        elif now >= self._next_status:
            self._next_status = now + STATUS_EVERY
            text = status()
            if text != self._last_status:
                self._last_status = text
                self.send(f"STATUS={text}")
        if self.watchdog_every is not None and now >= self._next_ping:
            self._next_ping = now + self.watchdog_every
            self.send("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        if self.active:
            self.send("STOPPING=1", f"STATUS={status}")

    def send(self, *lines: str) -> None:
        if self.address is None:
            return
        try:
            if self._socket is None:
                # Non-blocking: a datagram to a full queue would otherwise wait for the reader,
                # holding up the coordinator's loop (and the shutdown) for as long as it does not read.
                self._socket = socket.socket(socket.AF_UNIX,
                                             socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._socket.sendto("\n".join(lines).encode("utf-8", "backslashreplace"), self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                logger.debug("systemd notify socket {}: {}", self.address, exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):  # an abstract socket: the name after a NUL byte
        return b"\0" + value[1:].encode()
    return value


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, as systemd advises; None when no watchdog is asked of us.

    WATCHDOG_PID, when set, names the process that must ping: not us, no pings.
    """
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None
