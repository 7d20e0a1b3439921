"""Imported last by the forkserver (see processes.forkserver_context): make forking cheap.

Every worker forks from the forkserver; whatever the forkserver has not done
already, every new worker does again, and recycling every 1,000 tiny tasks
multiplies that. Measured per worker before this module: 15-20 ms of CPU.

- The main script: each child re-ran it (for `crawlproc`, the console script
  importing the whole CLI), because CPython's forkserver drops the '__main__'
  preload (it looks for a 'main_path' key that it never passes). The
  coordinator passes the path in CRAWLPROC_FORKSERVER_MAIN; it is imported
  here once, the way multiprocessing would, so children find it in place.
- The modules a child needs to unpickle its Process (shared memory, ctypes).
- `gc.freeze()` last: the cyclic GC writes to the header of every object it
  visits, so the first collection in each child would copy nearly all
  inherited pages. Frozen objects are never visited.
"""

import gc
import os

import multiprocessing.heap  # noqa: F401
import multiprocessing.popen_forkserver  # noqa: F401
import multiprocessing.sharedctypes  # noqa: F401
from multiprocessing import process, spawn

_main_path = os.environ.get("CRAWLPROC_FORKSERVER_MAIN")
if _main_path:
    process.current_process()._inheriting = True
    try:
        spawn.import_main_path(_main_path)
    finally:
        del process.current_process()._inheriting

gc.freeze()
