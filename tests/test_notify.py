"""systemd's notify protocol: a test plays systemd's side on an AF_UNIX datagram socket.

The end-to-end test runs a real `crawlproc watch` with NOTIFY_SOCKET and
WATCHDOG_USEC set, the way systemd starts a Type=notify service; the unit
tests drive ServiceNotifier with a clock of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from conftest import make_tree
from test_watch import DEADLINE, Watch, proc_spec  # noqa: F401

from crawlproc.notify import ServiceNotifier


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: every datagram, as the list of its lines."""

    def __init__(self, path: Path | None = None, abstract: str | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + abstract.encode() if abstract else str(path))
        self.address = f"@{abstract}" if abstract else str(path)
        self.messages: list[list[str]] = []

    def receive(self, until, what: str, timeout: float = DEADLINE, watch: Watch | None = None) -> list[str]:
        """Read datagrams until one satisfies `until(lines)`; fail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                tail = f"\nwatch stderr:\n{watch.stderr[-3000:]}" if watch else ""
                pytest.fail(f"timed out after {timeout}s waiting for {what}; got {self.messages[-10:]}{tail}")
            self.sock.settimeout(min(left, 0.5))
            try:
                lines = self.sock.recv(4096).decode().split("\n")
            except socket.timeout:
                if watch is not None and not watch.alive():
                    pytest.fail(f"watch exited while waiting for {what}:\n{watch.stderr[-3000:]}")
                continue
            self.messages.append(lines)
            if until(lines):
                return lines

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def status_of(lines: list[str]) -> str | None:
    return next((line[len("STATUS="):] for line in lines if line.startswith("STATUS=")), None)


def test_watch_tells_systemd_ready_status_watchdog_and_stopping(tmp_path, proc_spec, systemd, monkeypatch):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b/c.txt": "c\n"})
    out = tmp_path / "out"
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.address)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a WATCHDOG=1 every 0.2 s
    with Watch(data, out, proc_spec) as watch:
        ready = systemd.receive(lambda lines: "READY=1" in lines, "READY=1", watch=watch)
        # READY comes after the catch-up is processed and merged.
        assert (out / "merged.jsonl").read_text().count("\n") == 2
        assert "2 done" in status_of(ready), ready
        assert not any("READY=1" in m for m in systemd.messages[:-1])
        pings = len([m for m in systemd.messages if m == ["WATCHDOG=1"]])
        systemd.receive(lambda lines: lines == ["WATCHDOG=1"] and pings + 3 <= len(
            [m for m in systemd.messages if m == ["WATCHDOG=1"]]), "three more WATCHDOG=1", watch=watch)
        make_tree(data, {"new.txt": "new\n"})
        systemd.receive(lambda lines: "3 done" in (status_of(lines) or ""), "STATUS= with the new count",
                        watch=watch)
        os.kill(watch.pid, signal.SIGTERM)
        stopping = systemd.receive(lambda lines: "STOPPING=1" in lines, "STOPPING=1", watch=watch)
        assert watch.proc.wait(timeout=30) == 0
    assert status_of(stopping).startswith("stopping: watching: 3 done, 0 failed")
    assert sum("READY=1" in m for m in systemd.messages) == 1


def test_watch_without_notify_socket_sends_nothing(tmp_path, proc_spec, systemd, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    with Watch(data, tmp_path / "out", proc_spec) as watch:
        deadline = time.monotonic() + DEADLINE
        while not (tmp_path / "out" / "merged.jsonl").exists():
            assert time.monotonic() < deadline, watch.stderr
            time.sleep(0.05)
        assert watch.stop() == 0
    systemd.sock.settimeout(0)
    with pytest.raises(BlockingIOError):
        systemd.sock.recv(4096)


# -- ServiceNotifier ------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def drain(fake: FakeSystemd) -> list[list[str]]:
    fake.sock.settimeout(0)
    got = []
    while True:
        try:
            got.append(fake.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            return got


def test_notifier_sends_ready_once_status_on_change_and_pings_at_half_the_watchdog(systemd):
    clock = Clock()
    notifier = ServiceNotifier({"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "10000000"},
                               monotonic=clock)
    assert notifier.watchdog_every == 5.0
    status = ["1 done"]
    caught_up = [False]
    notifier.tick(lambda: caught_up[0], lambda: status[0])
    assert drain(systemd) == [["STATUS=1 done"], ["WATCHDOG=1"]]
    clock.now += 0.5
    notifier.tick(lambda: caught_up[0], lambda: status[0])
    assert drain(systemd) == []  # nothing changed, and no ping is due
    caught_up[0] = True
    notifier.tick(lambda: caught_up[0], lambda: status[0])
    assert drain(systemd) == [["READY=1", "STATUS=1 done"]]
    clock.now += 1.0
    status[0] = "2 done"
    notifier.tick(lambda: True, lambda: status[0])
    assert drain(systemd) == [["STATUS=2 done"]]
    clock.now += 4.0
    notifier.tick(lambda: pytest.fail("asked again after READY"), lambda: status[0])
    assert drain(systemd) == [["WATCHDOG=1"]]
    notifier.stopping("stopping")
    assert drain(systemd) == [["STOPPING=1", "STATUS=stopping"]]
    notifier.close()


def test_notifier_abstract_socket_and_watchdog_for_another_pid(tmp_path):
    fake = FakeSystemd(abstract=f"crawlproc-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        notifier = ServiceNotifier({"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "1000000",
                                    "WATCHDOG_PID": str(os.getpid() + 1)})
        assert notifier.watchdog_every is None  # the watchdog is another process's to ping
        notifier.tick(lambda: True, lambda: "ok")
        assert drain(fake) == [["READY=1", "STATUS=ok"]]
    finally:
        fake.close()


def test_notifier_is_inert_without_a_socket_and_survives_one_that_went_away(tmp_path):
    inert = ServiceNotifier({"WATCHDOG_USEC": "1000000"})
    assert not inert.active
    inert.tick(lambda: pytest.fail("asked without a socket"), lambda: pytest.fail("asked without a socket"))
    inert.stopping("x")
    gone = ServiceNotifier({"NOTIFY_SOCKET": str(tmp_path / "no-such.sock"), "WATCHDOG_USEC": "1000000"})
    gone.tick(lambda: True, lambda: "ok")  # a failed send is not an error for the watch
    gone.stopping("x")
    gone.close()


def test_a_socket_nobody_reads_never_holds_up_the_watch(systemd):
    """A datagram to a full queue would wait for a reader: the notifier's sends must not."""
    import threading

    notifier = ServiceNotifier({"NOTIFY_SOCKET": systemd.address})
    sent = threading.Event()

    def flood() -> None:
        for i in range(5000):  # far more than a socket's queue holds (systemd reads; this one never does)
            notifier.send(f"STATUS=message {i}")
        notifier.stopping("done")
        sent.set()

    threading.Thread(target=flood, daemon=True).start()
    assert sent.wait(DEADLINE), "a send blocked on the unread socket"
    notifier.close()
    assert systemd.sock.recv(4096).decode() == "STATUS=message 0"  # the first ones did arrive
