"""`--serve`: the status page in a process of its own, so that no request, ledger read or
import of the page ever takes the run's GIL (with the page's threads in the
coordinator, a watched tiny run took 2-4% longer; with this process, no longer).

    coordinator process                            page process
    PageProcess(address): binds the port ──fd──>   serve_page: StatusServer on that socket
    LiveBoard.publish ──send: one JSON message ──> RelayedBoard.receive, swapped whole
      (a SOCK_SEQPACKET pair: a message goes whole or not at all; a page behind skips one)
    PageProcess.close(), or the coordinator's death ──end of the pair──> the page process stops

The page process is forked before the job starts, while the coordinator has no
other thread (children.forking_is_safe): it starts in a few milliseconds with
crawlproc already imported. A process that has other threads (a notebook using
the Python API) starts it as a new interpreter instead
(`python -m crawlproc.serve.page_process`). It ignores SIGINT: Ctrl-C in the
terminal is for the run, which closes the page when it ends. No child forked by
the coordinator later keeps the coordinator's end of the pair
(children.keep_from_children), so a coordinator killed with -9 ends its page too.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from crawlproc.children import (close_all_but, ended_or_killed, flush_std_streams, forget_kept, forking_is_safe,
                                keep_from_children, wait_for_exit)
from crawlproc.serve import Address

if TYPE_CHECKING:
    from crawlproc.serve.board import RelayedBoard

MAX_MESSAGE = 1 << 20  # a snapshot is a few KB; a cluster of a thousand workers, a few hundred
CLOSE_TIMEOUT_SECONDS = 10.0


class PageProcess:
    """The coordinator's handle on the page process: `url`, `send(snapshot)`, `close()`."""

    def __init__(self, address: Address, out: Path) -> None:
        from crawlproc.serve.server import listening_socket

        listening, self.address = listening_socket(address, "--serve")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._pid: int | None = None
        self._process: subprocess.Popen | None = None
        try:
            if forking_is_safe():
                self._pid = _fork_page(out, listening, theirs, ours)
            else:
                self._process = subprocess.Popen(
                    [sys.executable, "-m", "crawlproc.serve.page_process", str(out), str(listening.fileno()),
                     str(theirs.fileno())],
                    pass_fds=(listening.fileno(), theirs.fileno()), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            listening.close()  # the page process holds the port now
            theirs.close()
        ours.setblocking(False)
        keep_from_children(ours.fileno())
        self._channel = ours

    @property
    def url(self) -> str:
        from crawlproc.serve.server import page_url

        return page_url(self.address)

    def send(self, snapshot: dict) -> None:
        """Hand a snapshot to the page; never waits (a page that is behind gets the next one)."""
        try:
            self._channel.send(json.dumps(snapshot).encode())
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:  # the page process is gone: the run goes on without it
            pass

    def close(self) -> None:
        """End the page: the page process sees the end of the pair and stops."""
        forget_kept(self._channel.fileno())
        self._channel.close()
        if self._process is not None:
            ended_or_killed(self._process, CLOSE_TIMEOUT_SECONDS)
        elif self._pid is not None:
            _reap(self._pid, CLOSE_TIMEOUT_SECONDS)


def _fork_page(out: Path, listening: socket.socket, theirs: socket.socket, ours: socket.socket) -> int:
    flush_std_streams()  # or the child would write our buffered output again
    pid = os.fork()
    if pid == 0:
        try:
            close_all_but(0, 1, 2, listening.fileno(), theirs.fileno())
            serve_page(out, listening, theirs)
        finally:
            os._exit(0)
    return pid


def _reap(pid: int, timeout: float) -> None:
    """Wait for the page process to end (it does once the pair is closed); kill it past `timeout`.

    The wait is on a pidfd, which wakes us the moment it ends: the run's own end waits for
    this, and a poll every 10 ms cost a watched 100k-file run ~10 ms (a third of a percent)."""
    if not wait_for_exit(pid, timeout):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def serve_page(out: Path, listening: socket.socket, channel: socket.socket) -> None:
    """The page process: serve OUT's page on `listening`, from the snapshots received on `channel`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Not niced: measured, a watched tiny run took ~8% longer with this process at nice 10,
    # and no longer at the run's priority (likely: its reads of the ledger, held open longer
    # on busy cores, hold back the run's WAL checkpoints).
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{time:HH:mm:ss} {level: <7} {message}")

    from crawlproc.serve.board import RelayedBoard
    from crawlproc.serve.server import StatusServer
    from crawlproc.serve.view import StatusView

    board = RelayedBoard()
    server = StatusServer(listening, StatusView(out, board))
    server.start()
    try:
        relay(channel, board)
    except Exception as exc:  # the page is a bystander: one line, and it ends
        logger.warning("the status page stopped: {!r}", exc)
    finally:
        server.close()
        channel.close()


def main(argv: list[str]) -> None:
    """`python -m crawlproc.serve.page_process OUT LISTENING_FD CHANNEL_FD` (see PageProcess)."""
    serve_page(Path(argv[0]), socket.socket(fileno=int(argv[1])), socket.socket(fileno=int(argv[2])))


def relay(channel: socket.socket, board: RelayedBoard) -> None:
    """Hand each snapshot received to the board, until the run closes its end."""
    while True:
        message = channel.recv(MAX_MESSAGE)
        if not message:
            return
        board.receive(json.loads(message))


if __name__ == "__main__":
    main(sys.argv[1:])
