"""The processor of tests/test_histories.py: `-p tests/history_processors.py:history`.

Files named poison-crash* kill their worker with SIGSEGV, poison-hang* hang
(for --timeout); every other file takes $HISTORY_DELAY seconds (so a run lasts
long enough to be killed mid-batch) and gives a record that depends only on
its path and content. The reducer sleeps $HISTORY_REDUCE_DELAY seconds, which
holds the merge's temp file open long enough to kill a run during the merge.
Both delays come from the environment, which is not part of a run's identity.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import time

from crawlproc import processor


@processor(version="1")
def history(task):
    name = os.path.basename(task.relpath)
    if name.startswith("poison-crash"):
        ctypes.string_at(0)
    elif name.startswith("poison-hang"):
        while True:
            time.sleep(3600)
    data = task.read_bytes()
    time.sleep(float(os.environ.get("HISTORY_DELAY", "0")))
    return {"path": task.relpath, "bytes": len(data), "lines": data.count(b"\n"),
            "sha1": hashlib.sha1(data).hexdigest()}


@history.reducer
def files(records):
    time.sleep(float(os.environ.get("HISTORY_REDUCE_DELAY", "0")))
    return {"files": sum(1 for _ in records)}
