"""Per-file work shared by the crawlproc benchmark and its baselines.

Two kinds of functions live here:

* crawlproc processors (``def f(task) -> dict``), passed to crawlproc as
  ``scripts/bench_work.py:typical``;
* the same work on a ``(abs_path, rel_path)`` pair, used by the bare
  ``multiprocessing.Pool`` baseline.

Run as a script, this module *is* the bare baseline:

    python scripts/bench_work.py {tiny|typical|scale} DATA_DIR OUT_JSONL WORKERS

It walks DATA_DIR with ``os.walk``, runs the workload's function through
``multiprocessing.Pool(WORKERS).imap_unordered(fn, paths, chunksize=256)``,
sorts the records by path and writes them once as JSONL. No ledger, no
durability: the lower bound crawlproc is measured against.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys

# Rounds of sha256 over a 200 KB file for about 2 ms of CPU per file. Calibrated
# once on the project's 2-core machine (17 rounds over 200 KB ~= 1.97 ms there);
# `scripts/bench` prints the measured figure so a drift is visible.
TYPICAL_ROUNDS = 17


# --- the work ---------------------------------------------------------------


def linecount_record(relpath: str, data: bytes) -> dict:
    """Same record as crawlproc's built-in ``linecount`` processor."""
    lines = data.count(b"\n")
    if data and not data.endswith(b"\n"):
        lines += 1
    return {"path": relpath, "lines": lines, "words": len(data.split()), "bytes": len(data)}


def typical_record(relpath: str, data: bytes, rounds: int = TYPICAL_ROUNDS) -> dict:
    """About 2 ms of CPU on 200 KB: sha256 over the data ``rounds`` times."""
    h = hashlib.sha256()
    for _ in range(rounds):
        h.update(data)
    return {"path": relpath, "sha256": h.hexdigest(), "bytes": len(data)}


# --- crawlproc processors -----------------------------------------------------


def typical(task) -> dict:
    """crawlproc processor for the ``typical`` workload."""
    return typical_record(task.relpath, task.read_bytes())


def linecount(task) -> dict:
    """crawlproc processor equal to the built-in ``linecount`` (for comparisons)."""
    return linecount_record(task.relpath, task.read_bytes())


# --- bare-baseline workers ----------------------------------------------------


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def linecount_path(item: tuple[str, str]) -> dict:
    path, rel = item
    return linecount_record(rel, _read(path))


def typical_path(item: tuple[str, str]) -> dict:
    path, rel = item
    return typical_record(rel, _read(path))


BARE_FUNCTIONS = {"tiny": linecount_path, "typical": typical_path, "scale": linecount_path}


def walk_files(root: str):
    """Yield ``(abs_path, posix_rel_path)`` for every file under ``root``."""
    root = root.rstrip(os.sep)
    cut = len(root) + 1
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = dirpath[cut:].replace(os.sep, "/")
        for name in filenames:
            yield os.path.join(dirpath, name), (f"{rel_dir}/{name}" if rel_dir else name)


def run_bare(workload: str, data_dir: str, out_jsonl: str, workers: int) -> int:
    """The bare baseline: Pool.imap_unordered over os.walk, sorted JSONL out."""
    fn = BARE_FUNCTIONS[workload]
    with multiprocessing.Pool(workers) as pool:
        records = list(pool.imap_unordered(fn, walk_files(data_dir), chunksize=256))
    records.sort(key=lambda r: r["path"])
    with open(out_jsonl, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    return len(records)


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in BARE_FUNCTIONS:
        print(__doc__, file=sys.stderr)
        return 2
    workload, data_dir, out_jsonl, workers = argv
    n = run_bare(workload, data_dir, out_jsonl, int(workers))
    print(f"bare baseline: {n} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
