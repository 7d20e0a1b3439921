"""A processor that keeps a log of its calls, for tests/test_rebuild.py: proof of what ran.

`-p tests/call_log_processor.py:logged --param log=PATH` appends one line per call
(the task's relpath and offset) to PATH, a file outside DATA_DIR, and returns a
record that depends only on the task's bytes. Files named `none*` give no record.
"""

from __future__ import annotations

import os


def logged(task) -> dict | None:
    line = f"{task.relpath}\t{task.offset or 0}\n".encode("utf-8", "surrogateescape")
    fd = os.open(task.params["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write of a short line with O_APPEND: workers never interleave
    finally:
        os.close(fd)
    if os.path.basename(task.relpath).startswith("none"):
        return None
    data = task.read_bytes()
    return {"path": task.relpath, "offset": task.offset, "bytes": len(data), "lines": data.count(b"\n")}
