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

For the ``csv`` and ``bigfile`` workloads it is the single-process baseline:

    python scripts/bench_work.py csv-loop {amount|all} DATA OUT_JSON

a plain ``csv.reader`` loop over every CSV file under DATA (or the file DATA)
that groups rows by ``category`` and keeps count/sum/min/max of ``amount``
(``amount``) or of both numeric columns ``id`` and ``amount`` (``all``, the
work csv-stats does), written as JSON in the shape of csv-stats' reduced
``groups``. Sums are running float sums, as a person would write them.

The same groups from the engines a data engineer already has (the ``bench``
extra installs them):

    python scripts/bench_work.py polars DATA OUT_JSON     (threads: $POLARS_MAX_THREADS)
    python scripts/bench_work.py duckdb DATA OUT_JSON THREADS

``polars.scan_csv(...).group_by("category")`` and DuckDB's ``read_csv(...)
GROUP BY category``, over the same files.
"""

from __future__ import annotations

import csv
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


_NOT_SPACE = bytes(0 if byte in b" \t\n\r\x0b\x0c" else 1 for byte in range(256))  # bytes.split()'s spaces


def linecount_record(relpath: str, data: bytes) -> dict:
    """Same record as crawlproc's built-in ``linecount`` processor, counted the same way
    (words: whitespace followed by anything else, found with translate and count), so that
    the baseline does the same work and the comparison measures crawlproc's machinery."""
    lines = data.count(b"\n")
    if data and not data.endswith(b"\n"):
        lines += 1
    flags = data.translate(_NOT_SPACE)
    words = flags.count(b"\x00\x01") + (flags[:1] == b"\x01")
    return {"path": relpath, "lines": lines, "words": words, "bytes": len(data)}


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


KILL_ENV = "BENCH_KILL_FILES"  # newline-separated relpaths that typical_killer dies on
_kill: frozenset | None = None


def typical_killer(task) -> dict:
    """``typical``, but a file listed in $BENCH_KILL_FILES kills its worker with os._exit(1).

    The work is done first, so a run with deaths does the same work as one
    without: the difference in wall time is what the deaths cost. The list is
    read from the environment so that the processor's identity never changes.
    """
    global _kill
    if _kill is None:
        _kill = frozenset(filter(None, os.environ.get(KILL_ENV, "").split("\n")))
    record = typical_record(task.relpath, task.read_bytes())
    if task.relpath in _kill:
        os._exit(1)
    return record


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


# --- single-process csv loops (csv and bigfile workloads) -----------------------


def csv_paths(data: str) -> list[str]:
    if os.path.isfile(data):
        return [data]
    return sorted(path for path, _ in walk_files(data) if path.endswith(".csv"))


def csv_loop_amount(paths: list[str]) -> dict:
    """Per category: rows, and count/sum/min/max of amount."""
    stats: dict[str, list] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            i_amount, i_cat = header.index("amount"), header.index("category")
            for row in reader:
                amount = float(row[i_amount])
                s = stats.get(row[i_cat])
                if s is None:
                    stats[row[i_cat]] = [1, amount, amount, amount]
                    continue
                s[0] += 1
                s[1] += amount
                if amount < s[2]:
                    s[2] = amount
                if amount > s[3]:
                    s[3] = amount
    return {cat: {"rows": n, "columns": {"amount": {"count": n, "sum": t, "min": lo, "max": hi}}}
            for cat, (n, t, lo, hi) in sorted(stats.items())}


def csv_loop_all(paths: list[str]) -> dict:
    """Per category: rows, and count/sum/min/max of both numeric columns, id and amount."""
    stats: dict[str, list] = {}
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            i_id, i_amount, i_cat = header.index("id"), header.index("amount"), header.index("category")
            for row in reader:
                ident = int(row[i_id])
                amount = float(row[i_amount])
                s = stats.get(row[i_cat])
                if s is None:
                    stats[row[i_cat]] = [1, ident, ident, ident, amount, amount, amount]
                    continue
                s[0] += 1
                s[1] += ident
                if ident < s[2]:
                    s[2] = ident
                if ident > s[3]:
                    s[3] = ident
                s[4] += amount
                if amount < s[5]:
                    s[5] = amount
                if amount > s[6]:
                    s[6] = amount
    return {cat: {"rows": n, "columns": {"id": {"count": n, "sum": isum, "min": ilo, "max": ihi},
                                         "amount": {"count": n, "sum": t, "min": lo, "max": hi}}}
            for cat, (n, isum, ilo, ihi, t, lo, hi) in sorted(stats.items())}


CSV_LOOPS = {"amount": csv_loop_amount, "all": csv_loop_all}


def csv_source(data: str) -> str:
    """The file DATA, or a glob of the CSV files under the folder DATA (the bench's are flat)."""
    return data if os.path.isfile(data) else os.path.join(data, "*.csv")


def engine_groups(rows: list[tuple]) -> dict:
    """(category, rows, id count/sum/min/max, amount count/sum/min/max) rows in csv-stats' shape."""
    names = ("count", "sum", "min", "max")
    return {cat: {"rows": n, "columns": {"id": dict(zip(names, ident)), "amount": dict(zip(names, amount))}}
            for cat, n, *stats in sorted(rows) for ident, amount in [(stats[:4], stats[4:])]}


def polars_groups(data: str) -> dict:
    import polars as pl

    frame = pl.scan_csv(csv_source(data)).group_by("category").agg(
        pl.len(), *(getattr(pl.col(c), f)().alias(f"{c}_{f}") for c in ("id", "amount")
                    for f in ("count", "sum", "min", "max"))).collect()
    return engine_groups([tuple(row) for row in frame.iter_rows()])


def duckdb_groups(data: str, threads: int) -> dict:
    import duckdb

    con = duckdb.connect(config={"threads": threads})
    stats = ", ".join(f"{f}({c})" for c in ("id", "amount") for f in ("count", "sum", "min", "max"))
    rows = con.execute(f"SELECT category, count(*), {stats} FROM read_csv(?) GROUP BY category",
                       [csv_source(data)]).fetchall()
    return engine_groups([(r[0], r[1], *map(_plain_number, r[2:])) for r in rows])


def _plain_number(value):
    """DuckDB sums integers as HUGEINT and may read amounts as DECIMAL: back to int or float."""
    return value if isinstance(value, (int, float)) else float(value)


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
    if argv[:1] in (["polars"], ["duckdb"]) and len(argv) == (3 if argv[0] == "polars" else 4):
        groups = polars_groups(argv[1]) if argv[0] == "polars" else duckdb_groups(argv[1], int(argv[3]))
        with open(argv[2], "w", encoding="utf-8") as out:
            json.dump(groups, out)
        return 0
    if len(argv) == 4 and argv[0] == "csv-loop" and argv[1] in CSV_LOOPS:
        _, mode, data, out_json = argv
        groups = CSV_LOOPS[mode](csv_paths(data))
        with open(out_json, "w", encoding="utf-8") as out:
            json.dump(groups, out)
        print(f"csv loop ({mode}): {sum(g['rows'] for g in groups.values())} rows", file=sys.stderr)
        return 0
    if len(argv) != 4 or argv[0] not in BARE_FUNCTIONS:
        print(__doc__, file=sys.stderr)
        return 2
    workload, data_dir, out_jsonl, workers = argv
    n = run_bare(workload, data_dir, out_jsonl, int(workers))
    print(f"bare baseline: {n} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
