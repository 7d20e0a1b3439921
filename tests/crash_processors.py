"""Processors that misbehave on purpose, for tests/test_crash.py and scripts/torture.py.

Load with `-p tests/crash_processors.py:crashy` (or `:slow`, `:torture`). Each
one acts only on files whose *name* (the last path component) says so, and
otherwise returns an ordinary record, so one tree can hold both kinds:

    segfault*       the worker dies of SIGSEGV (reads address 0)
    exit*           the worker calls os._exit(3)
    hang*           sleeps forever (for --timeout)
    spawn*          starts a child process whose argv carries the file's content
                    as a marker, then hangs (the child must die with the worker)
    leak*           keeps 300 MB of touched memory in a module global
    grab*           touches $CRASHY_GRAB_MB (400) MB, holds it for $CRASHY_GRAB_SECONDS (60) s, then returns normally
                    (for --max-memory-per-task: only a kill stops it early)
    raise*          raises ValueError (unless CRASHY_NO_RAISE=1 in the environment)
    sysexit*        raises SystemExit(5)
    unserialisable* returns a record that is not JSON
    deleter*        deletes the file of the same folder named by its content
    slow*           sleeps 0.2 s ($CRASHY_SLOW_SECONDS)
    late-*          sleeps like slow, then acts on the rest of the name (late-raise.bin)
"""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
import time

LEAK_BYTES = 300 << 20
# How long `slow` takes per file; from the environment, which is not part of a run's
# identity, so a test can make the clean reference run (or a resume) fast.
SLOW_SECONDS = float(os.environ.get("CRASHY_SLOW_SECONDS", "0.2"))

_leaked: list[bytearray] = []  # what `leak*` files keep alive: the worker's RSS only grows


def _record(task) -> dict:
    return {"path": task.relpath, "bytes": len(task.read_bytes())}


def crashy(task) -> dict:
    name = os.path.basename(task.relpath)
    if name.startswith("late-"):
        time.sleep(SLOW_SECONDS)
        name = name[len("late-"):]
    if name.startswith("segfault"):
        ctypes.string_at(0)
    elif name.startswith("exit"):
        os._exit(3)
    elif name.startswith("hang"):
        while True:
            time.sleep(3600)
    elif name.startswith("spawn"):
        marker = task.read_bytes().decode().strip()
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)", marker])
        while True:
            time.sleep(3600)
    elif name.startswith("leak"):
        block = bytearray(LEAK_BYTES)
        block[::4096] = b"\x01" * len(range(0, LEAK_BYTES, 4096))  # touch every page: real RSS
        _leaked.append(block)
    elif name.startswith("grab"):
        _grab_and_hold(int(os.environ.get("CRASHY_GRAB_MB", "400")) << 20)
    elif name.startswith("raise"):
        if os.environ.get("CRASHY_NO_RAISE") != "1":
            raise ValueError(f"crashy refuses {task.relpath}")
    elif name.startswith("sysexit"):
        raise SystemExit(5)
    elif name.startswith("unserialisable"):
        return {"path": task.relpath, "x": object()}
    elif name.startswith("deleter"):
        victim = os.path.join(os.path.dirname(task.path), task.read_bytes().decode().strip())
        os.unlink(victim)
    elif name.startswith("slow"):
        time.sleep(SLOW_SECONDS)
    return _record(task)


def _grab_and_hold(size: int) -> None:
    block = bytearray(size)
    block[::4096] = b"\x01" * len(range(0, size, 4096))  # touch every page: real RSS
    deadline = time.monotonic() + float(os.environ.get("CRASHY_GRAB_SECONDS", "60"))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    del block


def always_fails(task) -> dict:
    """A processor bug: every file fails with the same NameError."""
    return {"path": task.relpath, "n": undefined_name}  # noqa: F821


def slow(task) -> dict:
    """Every file takes 0.2 s ($CRASHY_SLOW_SECONDS): runs last long enough to be interrupted."""
    time.sleep(SLOW_SECONDS)
    return _record(task)


def torture(task) -> dict:
    """1-5 ms per file (deterministic per path) and a record that depends only on the content."""
    data = task.read_bytes()
    delay = random.Random(task.relpath).uniform(0.001, 0.005)
    time.sleep(delay)
    return {"path": task.relpath, "bytes": len(data), "lines": data.count(b"\n"), "head": data[:16].hex()}
