"""Shared fixtures: a generated data tree and a helper to run the crawlproc CLI in a subprocess."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SUBPROCESS_TIMEOUT = 120


def run_cli(*args: str, timeout: float = SUBPROCESS_TIMEOUT, env: dict | None = None,
            cwd: Path | None = None, unprivileged: bool = False) -> subprocess.CompletedProcess:
    """`python -m crawlproc ARGS` in a real subprocess, with a timeout.

    `unprivileged`: under root, without the power to read any file whatever its
    mode (so a chmod 000 folder is unreadable to it, as to any user).
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    preexec = drop_dac_capabilities if unprivileged and os.geteuid() == 0 else None
    return subprocess.run(
        [sys.executable, "-m", "crawlproc", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd, preexec_fn=preexec,
    )


def crawlproc_patched(module: str, **constants: float) -> list[str]:
    """The command line of crawlproc with constants of `module` set first (a wait a user has,
    cut short for a test); its arguments follow."""
    sets = "".join(f"module.{name} = {value!r}\n" for name, value in constants.items())
    code = (f"import importlib\nmodule = importlib.import_module({module!r})\n{sets}"
            "from crawlproc.cli import main\nmain()\n")
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def out_held(out: Path) -> Iterator[None]:
    """OUT's lock held by this test process, as a run going holds it (its pid written in it)."""
    fd = os.open(out / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def drop_dac_capabilities() -> None:
    """In a child of root: lose the power to read any file regardless of its mode."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def query_ledger(out: Path, sql: str, params: tuple = ()) -> list[tuple]:
    """Read OUT's ledger like the sqlite3 shell would, even while a run writes it."""
    path = out / "ledger.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    finally:
        conn.close()


@pytest.fixture(params=["here", "helpers"])
def lister(request, monkeypatch):
    """Run a test twice: folders listed in this process, and in helper processes from the
    first folder on (what a big tree gets). Use it with pytest.mark.usefixtures."""
    if request.param == "helpers":
        import crawlproc.scanner
        import crawlproc.walk
        from crawlproc.listing import HelperLister

        monkeypatch.setattr(HelperLister, "LOCAL_FOLDERS", 0)
        for module in (crawlproc.scanner, crawlproc.walk):  # Scan's lister, and a plain walk's
            monkeypatch.setattr(module, "LocalLister", lambda known=None: HelperLister(2, known))
    return request.param


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for relpath, content in files.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {
        "a.txt": "one two\nthree\n",
        "b/c.txt": "x\n",
        "b/d/e.log": "hello world\nbye",
        "empty.txt": "",
    })


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something true (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
