"""A processor for the status-page tests: tasks wait at gates the test opens, so a run can be
looked at while it goes, at moments the test chooses (never after a guessed sleep).

`-p tests/gated_processor.py:gated --param gate=PATH --param last_gate=PATH`: every task
waits until the file `gate` exists; a file named `last*` then waits for `last_gate` too;
a path holding `<script>` fails (an error the page must show as text).
"""

from __future__ import annotations

import os
import time

GATE_TIMEOUT_SECONDS = 120  # a gate never opened fails the task instead of hanging the test


def _wait_for(path: str) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_SECONDS
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {path} was never opened")
        time.sleep(0.01)


def gated(task) -> dict:
    _wait_for(task.params["gate"])
    if os.path.basename(task.relpath).startswith("last"):
        _wait_for(task.params["last_gate"])
    if "<script>" in task.relpath:
        raise ValueError(f"refused {task.relpath}")
    return {"path": task.relpath}
