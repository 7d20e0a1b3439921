"""Benchmark crawlproc against a bare multiprocessing pool and GNU parallel.

Usage: scripts/bench [WORKLOAD ...] [--workers 2] [--quick] [--repeat N] [--dask]   (default: tiny typical)

Workloads (inputs are generated once, seeded, outside the repo under
$CRAWLPROC_BENCH_DIR or <tmp>/crawlproc-bench, and reused while a marker file
says they are complete with the same parameters):

  tiny     100,000 text files of 1-4 KB (random words, newline-terminated
           lines) in 1,000 nested folders (10 x 10 x 10); processor: built-in
           ``linecount``.
  typical  5,000 files of 200 KB; processor ``scripts/bench_work.py:typical``,
           about 2 ms of CPU per file (sha256 over the data, 17 rounds).
  scale    1,000,000 files of a few bytes in 10,000 folders; processor
           ``linecount``. Only the crawlproc first run and the bare baseline;
           the figure of interest is crawlproc's coordinator peak RSS
           (target < 150 MB). Run only when named.

  watch-scale  (a) ``crawlproc watch`` on a tree of 100,000 folders (100 x 1,000, one small
           file each): the time from the command's start to systemd's READY=1 (the
           catch-up processed and merged; the bench plays the NOTIFY_SOCKET) and the
           coordinator's RSS then, with inotify watching every folder; (b) ``watch --poll
           5`` on tiny's 100,000 files once caught up: the coordinator's CPU seconds per
           poll of the unchanged tree (over 30 s) and each poll's wall time (its debug
           log). Run only when named.

  serve    tiny's data, crawlproc's first run without and with ``--serve 127.0.0.1:PORT`` while a
           client fetches /, /status.json and /metrics every second, interleaved (rounds
           alternate which runs first), 5 runs of each (N with --repeat N); medians (target:
           with at most 1.03x without), and each round's ratio. Run only when named.

  dask-scale  scale's 1,000,000 files through ``crawlproc run --executor dask`` on a scheduler
           and W worker processes (1 thread each) started apart: the coordinator's peak RSS
           (target < 200 MB), the time from the command's start to the first task done
           (target <= 5 s), and the most tasks the scheduler held at once, sampled every
           0.1 s by a client of its own (target: a few hundred at most). Run only when named.

  watch    ``crawlproc watch`` on an empty folder (-w W, default --settle and
           --merge-interval, --no-progress -q), fed by writer processes:
           (a) latency: 1,000 files of ~1 KB at 50 files/s for 20 s, each
               written and closed at once; per file, close time (time.time()
               in the writer) to its task's ``finished_at`` in the ledger (the
               coordinator's time.time() when it marks the task done):
               p50 and p95 (targets < 100 ms, < 500 ms);
           (b) sustained: 60,000 files of ~100 bytes at 2,000 files/s for
               30 s, 1,000 per folder (new folders appear during the run),
               from 2 paced writer processes; the achieved rate is reported.
               Checks that every file is done exactly once, and measures the
               drain: last close of the burst to the last task done (target
               < 10 s).
           Then SIGINT: exit code 0 and a merged.jsonl with every file once.
           Run only when named.

  csv      200 generated CSV files of 50,000 rows (10 million rows, ~0.7 GB),
           columns id,user,amount,category,timestamp (id an int, user one of
           1,000 names, amount a decimal like 123.45, category one of 12,
           an ISO timestamp). (a) a single-process ``csv.reader`` loop
           (scripts/bench_work.py csv-loop) grouping by category with a count
           and sum/min/max of ``amount`` only, and of every numeric column
           (id and amount: what csv-stats computes); (b) ``crawlproc run DATA
           -o NEW -w W -p csv-stats --param group_by=category --no-progress
           -q``, and the same with ``--param columns=id,amount`` (the columns
           polars and DuckDB are asked for; the others are then not
           converted); (c) the same groups by polars (``scan_csv().group_by()``,
           POLARS_MAX_THREADS=W) and DuckDB (``read_csv() GROUP BY``, W
           threads), both from the ``bench`` extra. (b) and (c) run 5 times
           each, taking turns (1 with --quick, N with --repeat N); medians.
           Reports rows/s and crawlproc's rows/s over each loop's (target >=
           1.8x), and crawlproc's wall over polars' (target <= 1.5x) and over
           DuckDB's (target <= 1.0x). Checks: every crawlproc run's
           summary.json ``reduced`` equals the exact per-category totals kept
           by the generator (amount sums compared exactly: csv-stats gives the
           correctly rounded exact sum), and the loops', polars' and DuckDB's
           totals equal crawlproc's (their float sums within a relative 1e-9).
           Run only when named.
  bigfile  one generated CSV file of 13 million rows (~0.93 GB), same columns;
           the same loops, polars and DuckDB against crawlproc csv-stats with
           ``--chunk-size 32MB`` (targets: >= 1.7x the loops' rows/s, <= 1.5x
           polars' wall); side rows: ``wc -l`` against ``crawlproc -p
           linecount --chunk-size 32MB``. Run only when named.
  faults   on tiny's and typical's data: crawlproc's first run with default
           options against ``--timeout 60 --max-memory-per-child 1GB``
           (limits that never trigger; target within 5%), and the cost of a
           worker death: typical with ``bench_work.py:typical_killer
           --retries 0``, where every 100th file (sorted paths, listed in
           $BENCH_KILL_FILES) ends its worker with os._exit(1) after its work,
           against the same run with an empty list: (wall - clean wall) /
           deaths (target < 200 ms). Each variant runs 3 times, interleaved
           (1 with --quick, N with --repeat N); medians. Run only when named.

--dask adds, to tiny and typical, crawlproc's first run with ``--executor dask --scheduler
local:W`` (a LocalCluster that crawlproc starts and stops: both in the time), compared with the
local first run (targets: typical <= 1.10x, tiny <= 1.5x).

--quick shrinks every workload 10x (a smoke check, not a measurement).
--repeat N runs the bare baseline and crawlproc's first run (and, with --dask, its
first run on Dask) N times each, taking turns (bare, crawlproc, crawlproc, bare, ...),
new outputs every time, and reports the medians: use it on a busy machine.

What is measured, per workload, as wall-clock time of a subprocess
(time.perf_counter around it, with a timeout), after every input file has been
read once (page-cache warm-up) and after os.sync():

  bare        python scripts/bench_work.py: multiprocessing.Pool(W)
              .imap_unordered(fn, os.walk paths, chunksize=256), records sorted
              by path and written once as JSONL. No ledger, no durability.
  crawlproc   ``crawlproc run DATA -o NEWOUT -w W -p PROC --no-progress -q``,
              then the same command again on the finished OUT (no-op rerun).
  parallel    GNU parallel, if installed: ``wc -lw`` one job per file (on a
              subset of tiny: all 100k files would take minutes) and batched
              with ``-X``. On typical the work differs (wc, not sha256).

Checks: crawlproc's merged.jsonl holds exactly one record per input file and
its records (for tiny: lines/words/bytes totals) equal the bare baseline's;
otherwise a loud MISMATCH line and exit status 1.

Every output goes to a new folder <bench dir>/runs/<run id>/; folders of
earlier runs are removed at the very end, after all timing. The report is
printed and written to <bench dir>/last-results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import NamedTuple

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
import bench_work  # noqa: E402

SEED = 20241124
GEN_VERSION = 1
BLOCK_BYTES = 4 * 1024 * 1024  # shared random-words text that files are cut from
DEFAULT_TIMEOUT_S = 3600


# --- workloads ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    fanout: tuple[int, ...]  # nested folder fan-out, e.g. (10, 10, 10)
    files_per_dir: int
    size: tuple[int, int]  # file size range in bytes, inclusive
    processor: str  # crawlproc -p value
    full: bool  # also GNU parallel and the crawlproc rerun
    parallel_subset: int | None  # one-job-per-file GNU parallel on this many files
    ratio_target: float | None  # crawlproc first run / bare
    rss_target_mb: float | None
    dask_target: float | None = None  # crawlproc --executor dask / crawlproc local, first runs

    @property
    def n_dirs(self) -> int:
        return math.prod(self.fanout)

    @property
    def n_files(self) -> int:
        return self.n_dirs * self.files_per_dir

    def shrink(self, factor: int) -> "Workload":
        subset = self.parallel_subset // factor if self.parallel_subset else None
        return dataclasses.replace(
            self, files_per_dir=max(1, self.files_per_dir // factor), parallel_subset=subset
        )

    def gen_params(self) -> dict:
        return {
            "name": self.name,
            "fanout": list(self.fanout),
            "files_per_dir": self.files_per_dir,
            "size": list(self.size),
            "seed": SEED,
            "gen_version": GEN_VERSION,
        }


TYPICAL_PROCESSOR = f"{SCRIPTS / 'bench_work.py'}:typical"

WORKLOADS = {
    "tiny": Workload("tiny", (10, 10, 10), 100, (1024, 4096), "linecount",
                     full=True, parallel_subset=5000, ratio_target=1.3, rss_target_mb=None, dask_target=1.5),
    "typical": Workload("typical", (10, 10), 50, (204800, 204800), TYPICAL_PROCESSOR,
                        full=True, parallel_subset=None, ratio_target=1.05, rss_target_mb=None,
                        dask_target=1.10),
    "scale": Workload("scale", (10, 10, 100), 100, (2, 16), "linecount",
                      full=False, parallel_subset=None, ratio_target=1.3, rss_target_mb=150),
}
DEFAULT_WORKLOADS = ["tiny", "typical"]
# see bench_watch(), bench_csv(), bench_faults(), bench_dask_scale()
SPECIAL_WORKLOADS = ["watch", "watch-scale", "csv", "bigfile", "faults", "serve", "dask-scale"]
RERUN_TARGET = 0.10  # a no-op rerun, as a share of the first run


# --- input generation ---------------------------------------------------------

_BLOCK: bytes | None = None


def text_block() -> bytes:
    """Seeded random-words text of newline-terminated lines; files are cut from it."""
    global _BLOCK
    if _BLOCK is None:
        rng = random.Random(f"{SEED}-block")
        letters = "abcdefghijklmnopqrstuvwxyz"
        vocab = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(5000)]
        lines, size = [], 0
        while size < BLOCK_BYTES:
            line = " ".join(rng.choices(vocab, k=rng.randint(3, 14))) + "\n"
            lines.append(line)
            size += len(line)
        _BLOCK = "".join(lines).encode()
    return _BLOCK


def leaf_dir(fanout: tuple[int, ...], index: int) -> str:
    """Relative folder of leaf ``index``, e.g. d03/d07/d01."""
    parts = []
    for base in reversed(fanout):
        index, digit = divmod(index, base)
        parts.append(f"d{digit:02d}")
    return "/".join(reversed(parts))


def file_content(rng: random.Random, size_range: tuple[int, int]) -> bytes:
    """``size`` bytes of whole-word lines, starting at a line and ending in a newline."""
    block = text_block()
    size = rng.randint(*size_range)
    start = rng.randrange(len(block) - size_range[1] - 1024)
    start = block.index(b"\n", start) + 1
    return block[start:start + size - 1] + b"\n"


def generate_leaf(job: tuple[str, dict, int]) -> int:
    root, params, index = job
    rng = random.Random(f"{params['seed']}-{params['name']}-{index}")
    folder = Path(root, leaf_dir(tuple(params["fanout"]), index))
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(params["files_per_dir"]):
        (folder / f"f{n:04d}.txt").write_bytes(file_content(rng, tuple(params["size"])))
    return params["files_per_dir"]


def data_dir_for(bench_dir: Path, wl: Workload) -> Path:
    digest = hashlib.sha256(json.dumps(wl.gen_params(), sort_keys=True).encode()).hexdigest()
    return bench_dir / f"data-{wl.name}-{wl.n_files}-{digest[:10]}"


def ensure_data(bench_dir: Path, wl: Workload) -> tuple[Path, float | None]:
    """Generate the workload's tree unless a complete one exists; return (dir, gen seconds)."""
    root = data_dir_for(bench_dir, wl)
    marker = root.with_name(root.name + ".complete.json")
    params = wl.gen_params()
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root, None
    # An incomplete tree is overwritten in place (same names, same bytes).
    t0 = time.perf_counter()
    jobs = [(str(root), params, i) for i in range(wl.n_dirs)]
    text_block()  # built once here, inherited by the forked workers
    with multiprocessing.Pool(os.cpu_count() or 2) as pool:
        written = sum(pool.imap_unordered(generate_leaf, jobs, chunksize=4))
    os.sync()
    assert written == wl.n_files, (written, wl.n_files)
    marker.write_text(json.dumps(params, sort_keys=True))
    return root, time.perf_counter() - t0


def _read_size(item: tuple[str, str]) -> int:
    size = 0
    with open(item[0], "rb") as f:
        while block := f.read(16 * 1024 * 1024):  # big files (bigfile) in pieces
            size += len(block)
    return size


def prepared_inputs(bench_dir: Path, wl: Workload, args) -> tuple[Path, int, str]:
    """A workload's inputs (generated if missing), read once into the page cache: (folder,
    files, a note saying whether they were reused and how long the warm-up took)."""
    data, gen_s = ensure_data(bench_dir, wl)
    n, warm_s = warm_up(data, args.workers)
    made = "reused" if gen_s is None else f"generated in {gen_s:.1f} s"
    return data, n, f"{wl.name} inputs {data}: {made}; page-cache warm-up: {n:,} files in {warm_s:.1f} s"


def warm_up(data: Path, workers: int) -> tuple[int, float]:
    """Read every input file once (page cache); return (file count, seconds)."""
    t0 = time.perf_counter()
    with multiprocessing.Pool(workers) as pool:
        n = sum(1 for _ in pool.imap_unordered(_read_size, bench_work.walk_files(str(data)), chunksize=256))
    return n, time.perf_counter() - t0


# --- running timed steps ------------------------------------------------------


@dataclasses.dataclass
class Row:
    run: str
    wall: float | None = None  # None: did not run or failed
    files: int = 0
    note: str = ""
    failed: bool = False


def run_timed(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group; return (exit code or None on timeout, wall s).

    (subprocess.run semantics with the timeout applied to the whole process group,
    so a pipeline's children do not outlive it.)
    """
    os.sync()  # earlier steps' writeback must not land in this step's time
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            rc = wait_exactly(proc, timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        return rc, time.perf_counter() - t0


def wait_exactly(proc: subprocess.Popen, timeout: float) -> int:
    """proc.wait(timeout), but returning the moment the process ends.

    Popen.wait with a timeout polls, sleeping up to 50 ms between looks: that
    added 0-50 ms to every timing (a tenth of a no-op rerun). A pidfd becomes
    readable exactly when the process exits.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: the polling wait
        return proc.wait(timeout=timeout)
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            raise subprocess.TimeoutExpired(proc.args, timeout)
    finally:
        os.close(pidfd)
    return proc.wait()


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def step(label: str, cmd: list[str], log: Path, files: int, timeout: float) -> Row:
    print(f"  {label} ...", end="", flush=True)
    rc, wall = run_timed(cmd, log, timeout)
    if rc == 0:
        print(f" {wall:.2f} s ({files / wall:,.0f} files/s)", flush=True)
        return Row(label, wall, files)
    why = "timeout" if rc is None else f"exit {rc}"
    print(f" FAILED ({why}) after {wall:.1f} s\n    $ {shlex.join(cmd)}", flush=True)
    tail = log_tail(log)
    if tail:
        print("    " + tail.replace("\n", "\n    "), flush=True)
    return Row(label, None, files, f"FAILED ({why}), log {log}", failed=True)


def precompile_crawlproc() -> None:
    """Compile crawlproc's modules to bytecode before timing anything, as installing a wheel does.

    The project is installed editable, so its modules are compiled on first
    import and cached in __pycache__, unless PYTHONDONTWRITEBYTECODE is set
    (it is on some machines): then every timed start would compile them
    again, about 50 ms that no installed crawlproc pays.
    """
    import compileall

    compileall.compile_dir(str(REPO / "crawlproc"), quiet=1)


def crawlproc_exe() -> str | None:
    beside = Path(sys.executable).parent / "crawlproc"
    return str(beside) if beside.exists() else shutil.which("crawlproc")


# --- result checks ------------------------------------------------------------


def in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child and return its result.

    Used for every check that loads a whole JSONL file: this process must stay
    small because a program started from it inherits its RSS into its own
    ru_maxrss (kept across exec), which is how crawlproc measures its peak.
    """
    with multiprocessing.Pool(1) as pool:
        return pool.apply(fn, args)


def own_peak_rss_mb() -> float | None:
    """This process's peak RSS (VmHWM, Linux /proc), shown beside crawlproc's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1e3 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def field(record: dict, key: str):
    """A processor field, top level or under a nested "result" dict."""
    if key in record:
        return record[key]
    nested = record.get("result")
    return nested.get(key) if isinstance(nested, dict) else None


def totals(records: list[dict], keys=("lines", "words", "bytes")) -> dict:
    return {k: sum(field(r, k) or 0 for r in records) for k in keys}


def check_merged(out: Path, bare_jsonl: Path | None, wl: Workload, n_files: int) -> list[str]:
    """Compare crawlproc's merged.jsonl with the bare baseline; MISMATCH lines on error."""
    merged = out / "merged.jsonl"
    if not merged.exists():
        return [f"MISMATCH {wl.name}: {merged} does not exist"]
    got = read_jsonl(merged)
    problems = []
    paths = [field(r, "path") for r in got]
    if len(got) != n_files or len(set(paths)) != n_files:
        problems.append(f"MISMATCH {wl.name}: merged.jsonl has {len(got)} records, "
                        f"{len(set(paths))} distinct paths, for {n_files} input files")
    if paths != sorted(paths):
        problems.append(f"MISMATCH {wl.name}: merged.jsonl is not sorted by path")
    if bare_jsonl is None or not bare_jsonl.exists():
        return problems
    bare = {r["path"]: r for r in read_jsonl(bare_jsonl)}
    by_path = {field(r, "path"): r for r in got}
    missing = [p for p in bare if p not in by_path]
    differing = [p for p, r in bare.items() if p in by_path
                 and any(field(by_path[p], k) != v for k, v in r.items())]
    if missing:
        problems.append(f"MISMATCH {wl.name}: {len(missing)} input files missing from "
                        f"merged.jsonl, e.g. {missing[:3]}")
    if differing:
        p = differing[0]
        problems.append(f"MISMATCH {wl.name}: {len(differing)} records differ from the bare "
                        f"baseline, e.g. {by_path[p]} vs {bare[p]}")
    if "lines" in next(iter(bare.values()), {}):
        want, have = totals(list(bare.values())), totals(got)
        if want != have:
            problems.append(f"MISMATCH {wl.name}: totals {have} != bare baseline {want}")
    return problems


def bare_totals(bare_jsonl: Path) -> dict:
    return totals(read_jsonl(bare_jsonl))


def wc_totals(output: Path) -> tuple[int, int, int]:
    """(files, lines, words) from ``wc -lw`` output, leaving out its "total" lines."""
    files = lines = words = 0
    with open(output, encoding="utf-8", errors="replace") as f:
        for row in f:
            parts = row.split(None, 2)
            if len(parts) == 3 and parts[2].strip() != "total":
                files += 1
                lines += int(parts[0])
                words += int(parts[1])
    return files, lines, words


def fmt_counts(summary: dict) -> str:
    counts = summary.get("counts")
    if not isinstance(counts, dict):
        return "counts ?"
    return "counts " + (", ".join(f"{k} {v}" for k, v in counts.items() if v) or "all 0")


def read_summary(out: Path) -> dict:
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


# --- one workload ---------------------------------------------------------------


@dataclasses.dataclass
class Report:
    wl: Workload
    n_files: int = 0
    rows: list[Row] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    first_wall: float | None = None
    rerun_wall: float | None = None
    bare_wall: float | None = None
    bare_jsonl: Path | None = None
    peak_rss: int | None = None
    parent_rss_mb: float | None = None  # this script's peak RSS when it started crawlproc
    dask_wall: float | None = None  # crawlproc --executor dask, first run (LocalCluster started by it)


class Step(NamedTuple):
    label: str
    make_cmd: Callable[[str], list[str]]  # the command, given the suffix of the round's outputs
    tag: str  # names its log files


def repeated_steps(steps: list[Step], run_dir: Path, files: int, args) -> list[tuple[Row, str]]:
    """Run every step --repeat times, taking turns (see taking_turns), each run into new outputs
    named with its round's suffix; a step that fails runs no more rounds.

    Taking turns is what keeps their ratios fair: the machine drifts within minutes. Run one
    after the other, five bare runs of the scale workload once went from 22.7 s to 10.6 s as
    the kernel's caches of its million files warmed, and the five crawlproc runs after them
    from 20.3 s to 23.2 s as their outputs piled up.
    Returns, per step, its row (median wall time) and the suffix of its last run's outputs.
    """
    walls: list[list[float]] = [[] for _ in steps]
    failed: dict[int, tuple[Row, str]] = {}
    suffix = ""
    for i, k in taking_turns(len(steps), args.repeat):
        suffix = f"-{i + 1}" if args.repeat > 1 else ""
        label, make_cmd, tag = steps[k]
        if k in failed:
            continue
        row = step(label + suffix.replace("-", " #"), make_cmd(suffix),
                   run_dir / f"{tag}{suffix}.log", files, args.timeout)
        if row.failed:
            row.run = label
            failed[k] = (row, suffix)
        else:
            walls[k].append(row.wall)
    results = []
    for k, (label, _, _) in enumerate(steps):
        if k in failed:
            results.append(failed[k])
            continue
        note = "" if len(walls[k]) == 1 else "median of " + ", ".join(f"{w:.2f}" for w in walls[k])
        results.append((Row(label, statistics.median(walls[k]), files, note), suffix))
    return results


def taking_turns(variants: int, rounds: int) -> Iterator[tuple[int, int]]:
    """(round, variant) in the order to run them: each variant once per round, the rounds
    alternating their order (A B, B A, A B, ...) so that no variant always runs right after
    another: what a run leaves behind (dirty pages written back, a warmer cache) falls on all."""
    for i in range(rounds):
        order = range(variants) if i % 2 == 0 else reversed(range(variants))
        yield from ((i, k) for k in order)


def repeated_step(label: str, make_cmd, tag: str, run_dir: Path, files: int, args) -> tuple[Row, str]:
    """One step --repeat times (see repeated_steps)."""
    return repeated_steps([Step(label, make_cmd, tag)], run_dir, files, args)[0]


def run_first_runs(wl: Workload, data: Path, run_dir: Path, n: int, args, rep: Report) -> None:
    """The bare baseline, crawlproc's first run and (--dask) its first run on Dask, taking
    turns; then crawlproc's no-op reruns. Each output is checked against the bare one."""
    exe = crawlproc_exe()

    def bare_cmd(suffix: str) -> list[str]:
        return [sys.executable, str(SCRIPTS / "bench_work.py"), wl.name, str(data),
                str(run_dir / f"bare{suffix}.jsonl"), str(args.workers)]

    def crawlproc_cmd(suffix: str, *executor: str) -> list[str]:
        out = "crawlproc-dask-out" if executor else "crawlproc-out"
        return [exe, "run", str(data), "-o", str(run_dir / f"{out}{suffix}"),
                *(executor or ("-w", str(args.workers))), "-p", wl.processor, "--no-progress", "-q"]

    def dask_cmd(suffix: str) -> list[str]:
        # A LocalCluster of W processes that crawlproc starts and stops itself: both in the time.
        return crawlproc_cmd(suffix, "--executor", "dask", "--scheduler", f"local:{args.workers}")

    steps = [Step("bare Pool.imap_unordered", bare_cmd, "bare")]
    if exe is not None:
        rep.parent_rss_mb = own_peak_rss_mb()
        steps.append(Step("crawlproc first run", crawlproc_cmd, "crawlproc-first"))
        if args.dask and wl.dask_target:
            steps.append(Step("crawlproc --executor dask (local cluster)", dask_cmd, "crawlproc-dask"))
    (bare, bare_suffix), *ours = repeated_steps(steps, run_dir, n, args)
    rep.rows.append(bare)
    rep.bare_wall = bare.wall
    rep.bare_jsonl = run_dir / f"bare{bare_suffix}.jsonl"
    if bare.failed:
        rep.problems.append(f"FAILED: bare baseline on {wl.name}: $ {shlex.join(bare_cmd(bare_suffix))}")
    if exe is None:
        rep.rows.append(Row("crawlproc first run", note="crawlproc not installed", failed=True))
        rep.problems.append("FAILED: crawlproc executable not found")
        return
    first, suffix = ours[0]
    rep.rows.append(first)
    if first.failed:
        rep.problems.append(f"FAILED: crawlproc first run on {wl.name}: $ {shlex.join(crawlproc_cmd(suffix))}")
    else:
        record_first_run(wl, run_dir / f"crawlproc-out{suffix}", first, n, rep)
        if wl.full:
            run_rerun(wl, run_dir, crawlproc_cmd(suffix), n, args, rep)
    if len(ours) > 1:
        record_dask_run(wl, run_dir, ours[1], dask_cmd, n, rep)


def record_first_run(wl: Workload, out: Path, first: Row, n: int, rep: Report) -> None:
    rep.first_wall = first.wall
    summary = read_summary(out)
    timings = summary.get("timings", {})
    rep.peak_rss = timings.get("coordinator_peak_rss_bytes")
    elapsed = timings.get("elapsed_s")
    elapsed = f"{elapsed:.2f}" if isinstance(elapsed, (int, float)) else "?"
    first.note = "; ".join(filter(None, [first.note, f"summary elapsed_s {elapsed}",
                                         fmt_counts(summary)]))
    rep.problems += in_child(check_merged, out, rep.bare_jsonl, wl, n)


def run_rerun(wl: Workload, run_dir: Path, cmd: list[str], n: int, args, rep: Report) -> None:
    """The same command again on the finished OUT, as many times as first runs (a steady median)."""
    out = Path(cmd[cmd.index("-o") + 1])
    rerun, _ = repeated_step("crawlproc no-op rerun", lambda _: cmd, "crawlproc-rerun", run_dir, n, args)
    rep.rows.append(rerun)
    if rerun.failed:
        rep.problems.append(f"FAILED: crawlproc rerun on {wl.name}: $ {shlex.join(cmd)}")
        return
    rep.rerun_wall = rerun.wall
    rerun.note = "; ".join(filter(None, [rerun.note, fmt_counts(read_summary(out))]))
    rep.problems += [p + " (after rerun)" for p in in_child(check_merged, out, rep.bare_jsonl, wl, n)]


def record_dask_run(wl: Workload, run_dir: Path, result: tuple[Row, str], cmd, n: int, rep: Report) -> None:
    row, suffix = result
    rep.rows.append(row)
    if row.failed:
        rep.problems.append(f"FAILED: crawlproc on Dask, {wl.name}: $ {shlex.join(cmd(suffix))}")
        return
    rep.dask_wall = row.wall
    out = run_dir / f"crawlproc-dask-out{suffix}"
    row.note = "; ".join(filter(None, [row.note, fmt_counts(read_summary(out))]))
    rep.problems += [p + " (Dask)" for p in in_child(check_merged, out, rep.bare_jsonl, wl, n)]


def run_parallel(wl: Workload, data: Path, run_dir: Path, n: int, args, rep: Report) -> None:
    work_differs = "" if wl.processor == "linecount" else "; work differs: wc -lw, not sha256"
    if shutil.which("parallel") is None:
        rep.rows.append(Row("GNU parallel", note="not installed"))
        return
    w, d = str(args.workers), shlex.quote(str(data))
    subset = wl.parallel_subset
    feed = f"find {d} -type f" + (f" | head -n {subset}" if subset else "")
    log1, out1 = run_dir / "parallel-per-file.joblog", run_dir / "parallel-per-file.out"
    per_file = (f"{feed} | parallel --joblog {shlex.quote(str(log1))} -j {w} wc -lw {{}} "
                f"> {shlex.quote(str(out1))}")
    label = "GNU parallel wc -lw, one job per file" + (f" (subset {subset:,} files)" if subset else "")
    row = step(label, ["bash", "-c", per_file], run_dir / "parallel-per-file.log",
               subset or n, args.timeout)
    if not row.failed:
        files, _, _ = wc_totals(out1)
        row.note = f"{files:,} files in output{work_differs}"
    rep.rows.append(row)

    log2, out2 = run_dir / "parallel-X.joblog", run_dir / "parallel-X.out"
    batched = (f"find {d} -type f | parallel -X --joblog {shlex.quote(str(log2))} -j {w} wc -lw "
               f"> {shlex.quote(str(out2))}")
    row = step("GNU parallel -X wc -lw (batched)", ["bash", "-c", batched],
               run_dir / "parallel-X.log", n, args.timeout)
    if not row.failed:
        files, lines, words = wc_totals(out2)
        row.note = f"{files:,} files in output{work_differs}"
        if files != n:
            rep.problems.append(f"MISMATCH {wl.name}: GNU parallel -X output lists {files} of {n} files")
        if wl.processor == "linecount" and rep.bare_jsonl and rep.bare_jsonl.exists():
            want = in_child(bare_totals, rep.bare_jsonl)
            if (lines, words) != (want["lines"], want["words"]):
                rep.problems.append(f"MISMATCH {wl.name}: GNU parallel -X totals lines={lines} "
                                    f"words={words} != bare {want}")
    rep.rows.append(row)


def bench_workload(wl: Workload, bench_dir: Path, run_root: Path, args) -> Report:
    rep = Report(wl)
    print(f"\n[{wl.name}] {wl.n_files:,} files", flush=True)
    data, n, note = prepared_inputs(bench_dir, wl, args)
    rep.n_files = n
    rep.notes.append(note)
    print(f"  {note}", flush=True)
    if n != wl.n_files:
        rep.problems.append(f"MISMATCH {wl.name}: data tree has {n} files, expected {wl.n_files}")

    run_dir = run_root / wl.name
    run_dir.mkdir(parents=True)
    run_first_runs(wl, data, run_dir, n, args, rep)
    if wl.full:
        run_parallel(wl, data, run_dir, n, args, rep)
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


# --- watch workload ----------------------------------------------------------------

WATCH_LATENCY = (50, 20.0)  # (files/s, seconds): files arriving one by one
WATCH_SUSTAINED = (2000, 30.0)  # (files/s, seconds): a sustained arrival
WATCH_WRITERS = 2  # paced writer processes for the sustained phase
WATCH_FILES_PER_DIR = 1000
WATCH_DRAIN_TIMEOUT_S = 120.0  # after the last arrival; past it, missing files count as lost
WATCH_TARGETS = {"p50_ms": 100.0, "p95_ms": 500.0, "drain_s": 10.0}


@dataclasses.dataclass
class WatchPhase:
    name: str
    files: int  # files written
    arrival_s: float  # first to last close
    latencies: list[float]  # seconds, close -> done, one per done file
    done: int = 0  # tasks of this phase done (each file once: checked separately)
    not_once: int = 0  # files whose task is not done with attempts == 1
    drain_s: float | None = None  # last close -> last done; None when some file never got done

    @property
    def rate(self) -> float:
        return self.files / self.arrival_s if self.arrival_s > 0 else float("nan")

    @property
    def lost(self) -> int:
        return self.files - self.done


@dataclasses.dataclass
class WatchReport:
    phases: list[WatchPhase] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    exit_code: int | None = None
    options: str = ""

    def markdown(self, workers: int) -> list[str]:
        md = [f"## watch: files arriving under `crawlproc watch`, processor `linecount`, workers {workers}", "",
              f"`{self.options}`", "",
              "| phase | files | arrival s | files/s achieved | p50 ms | p95 ms | max ms | drain s | lost | not once |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for ph in self.phases:
            p50, p95, top = (percentile(ph.latencies, q) for q in (50, 95, 100))
            drain = f"{ph.drain_s:.2f}" if ph.drain_s is not None else "-"
            md.append(f"| {ph.name} | {ph.files:,} | {ph.arrival_s:.1f} | {ph.rate:,.0f} | {ms(p50)} | {ms(p95)} "
                      f"| {ms(top)} | {drain} | {ph.lost} | {ph.not_once} |")
        md.append("")
        by_name = {ph.name: ph for ph in self.phases}
        lat = by_name.get("latency")
        if lat and lat.latencies:
            p50, p95 = percentile(lat.latencies, 50), percentile(lat.latencies, 95)
            md.append(f"- latency p50 {ms(p50)} ms (target < {WATCH_TARGETS['p50_ms']:.0f}): "
                      f"{verdict(p50 * 1000 < WATCH_TARGETS['p50_ms'])}; p95 {ms(p95)} ms (target < "
                      f"{WATCH_TARGETS['p95_ms']:.0f}): {verdict(p95 * 1000 < WATCH_TARGETS['p95_ms'])}")
        sus = by_name.get("sustained")
        if sus:
            ok = sus.drain_s is not None and sus.drain_s < WATCH_TARGETS["drain_s"]
            drain = f"{sus.drain_s:.2f} s" if sus.drain_s is not None else "never (files lost)"
            md.append(f"- sustained: backlog drained {drain} after the last arrival (target < "
                      f"{WATCH_TARGETS['drain_s']:.0f} s): {verdict(ok)}; no file lost, each once: "
                      f"{verdict(sus.lost == 0 and sus.not_once == 0)}")
        md.append(f"- SIGINT: exit code {self.exit_code} (want 0): {verdict(self.exit_code == 0)}")
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def write_paced(job: tuple[str, str, int, int, int, float, float, int]) -> list[tuple[str, float]]:
    """One writer: files ``writer, writer + writers, ...`` below ``count``, file i due at ``t0 + i / rate``.

    Each file is written and closed at once; returns (relpath, close time.time()) per file.
    Runs in a forked writer process for the sustained phase.
    """
    root, prefix, writer, writers, count, t0, rate, size = job
    body = (b"x" * 63 + b"\n") * max(1, size // 64)
    made: set[int] = set()
    closed = []
    for i in range(writer, count, writers):
        due = t0 + i / rate
        ahead = due - time.time()
        if ahead > 0.002:
            time.sleep(ahead)
        folder = i // WATCH_FILES_PER_DIR
        if folder not in made:
            os.makedirs(os.path.join(root, prefix, f"d{folder:03d}"), exist_ok=True)
            made.add(folder)
        relpath = f"{prefix}/d{folder:03d}/f{i:06d}.txt"
        with open(os.path.join(root, relpath), "wb") as f:
            f.write(body)
        closed.append((relpath, time.time()))
    return closed


def ledger_rows(out: Path, sql: str, params: tuple = ()) -> list[tuple]:
    path = out / "ledger.db"
    if not path.exists():
        return []
    import sqlite3

    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def done_under(out: Path, prefix: str) -> int:
    rows = ledger_rows(out, "SELECT count(*) FROM tasks WHERE state = 'done' AND substr(relpath, 1, ?) = ?",
                       (len(prefix) + 1, prefix + "/"))
    return rows[0][0] if rows else 0


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            return False
        time.sleep(interval)
    return True


def measure_phase(name: str, out: Path, closed: list[tuple[str, float]], proc: subprocess.Popen) -> WatchPhase:
    """Wait until the phase's files are done (or the drain timeout), then read their done times."""
    prefix = name
    n = len(closed)
    times = [t for _, t in closed]
    phase = WatchPhase(name, n, max(times) - min(times) if times else 0.0, [])
    wait_for(lambda: done_under(out, prefix) >= n, WATCH_DRAIN_TIMEOUT_S, proc, interval=0.05)
    rows = ledger_rows(out, "SELECT relpath, state, attempts, finished_at FROM tasks "
                            "WHERE substr(relpath, 1, ?) = ?", (len(prefix) + 1, prefix + "/"))
    by_path = {r[0]: r for r in rows}
    finished = []
    for relpath, close in closed:
        row = by_path.get(relpath)
        if row is None or row[1] != "done":
            continue
        phase.done += 1
        phase.not_once += row[2] != 1
        phase.latencies.append(row[3] - close)
        finished.append(row[3])
    phase.not_once += phase.files - phase.done
    extra = len(by_path) - len({p for p, _ in closed} & set(by_path))
    if extra:
        phase.not_once += extra  # tasks for names nobody wrote: would be a serious bug
    if phase.done == n and finished:
        phase.drain_s = max(finished) - max(times)
    return phase


def check_watch_merged(out: Path, expected: int) -> list[str]:
    merged = out / "merged.jsonl"
    if not merged.exists():
        return [f"MISMATCH watch: {merged} does not exist"]
    paths = [field(r, "path") for r in read_jsonl(merged)]
    if len(paths) != expected or len(set(paths)) != expected:
        return [f"MISMATCH watch: merged.jsonl has {len(paths)} records, {len(set(paths))} distinct "
                f"paths, for {expected} files written"]
    return []


def bench_watch(run_root: Path, args) -> WatchReport:
    rep = WatchReport()
    factor = 10 if args.quick else 1
    print("\n[watch] files arriving under crawlproc watch", flush=True)
    exe = crawlproc_exe()
    if exe is None:
        rep.problems.append("FAILED: crawlproc executable not found")
        return rep
    run_dir = run_root / "watch"
    data, out = run_dir / "data", run_dir / "crawlproc-out"
    data.mkdir(parents=True)
    cmd = [exe, "watch", str(data), "-o", str(out), "-w", str(args.workers), "--no-progress", "-q"]
    rep.options = shlex.join(["crawlproc", *cmd[1:]]).replace(str(run_dir) + "/", "")
    log = run_dir / "watch.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        written = run_watch_phases(rep, proc, data, out, factor)
        print("  SIGINT ...", end="", flush=True)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            rep.exit_code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rep.problems.append("FAILED: watch did not exit within 120 s of SIGINT")
        print(f" exit {rep.exit_code} after {time.perf_counter() - t0:.2f} s", flush=True)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rep.exit_code != 0:
        rep.problems.append(f"FAILED: watch exit code {rep.exit_code} after SIGINT (log {log}):\n"
                            + log_tail(log))
    text = log.read_text(errors="replace")
    overflows = text.count("inotify queue overflow")
    rep.notes.append(f"inotify overflows reported: {overflows} (max_queued_events "
                     f"{Path('/proc/sys/fs/inotify/max_queued_events').read_text().strip()})")
    if "Traceback" in text:
        rep.problems.append(f"FAILED: a traceback in the watch log {log}")
    summary = read_summary(out)
    done_this_run = summary.get("timings", {}).get("tasks_done_this_run")
    rep.notes.append(f"summary: {fmt_counts(summary)}; tasks done this run {done_this_run} for {written} files "
                     "written")
    if done_this_run != written:
        rep.problems.append(f"MISMATCH watch: {done_this_run} tasks done this run for {written} files written "
                            "(a file processed twice, or lost)")
    rep.problems += in_child(check_watch_merged, out, written)
    for ph in rep.phases:
        if ph.lost or ph.not_once:
            rep.problems.append(f"MISMATCH watch: {ph.name}: {ph.lost} files lost, {ph.not_once} not done "
                                "exactly once")
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


def run_watch_phases(rep: WatchReport, proc: subprocess.Popen, data: Path, out: Path, factor: int) -> int:
    """Both phases against a running watch; returns how many files were written in all."""
    (data / "ready.txt").write_bytes(b"ready\n")
    ready = lambda: bool(ledger_rows(out, "SELECT 1 FROM tasks WHERE relpath = 'ready.txt' AND state = 'done'"))
    if not wait_for(ready, 60, proc):
        rep.problems.append("FAILED: watch did not process its first file within 60 s")
        return 1
    written = 1
    import psutil  # in the venv: crawlproc depends on it

    coordinator = psutil.Process(proc.pid)

    rate, seconds = WATCH_LATENCY
    n = int(rate * seconds / factor)
    print(f"  latency: {n} files at {rate}/s ...", end="", flush=True)
    closed = write_paced((str(data), "latency", 0, 1, n, time.time() + 0.2, rate, 1024))
    written += n
    phase = measure_phase("latency", out, closed, proc)
    rep.phases.append(phase)
    print(f" p50 {ms(percentile(phase.latencies, 50))} ms, p95 {ms(percentile(phase.latencies, 95))} ms, "
          f"{phase.lost} lost", flush=True)

    rate, seconds = WATCH_SUSTAINED
    n = int(rate * seconds / factor)
    print(f"  sustained: {n:,} files at {rate:,}/s from {WATCH_WRITERS} writers ...", end="", flush=True)
    cpu0 = sum(coordinator.cpu_times()[:2])
    t_start = time.time() + 0.5
    jobs = [(str(data), "sustained", w, WATCH_WRITERS, n, t_start, float(rate), 100) for w in range(WATCH_WRITERS)]
    with multiprocessing.get_context("fork").Pool(WATCH_WRITERS) as pool:
        closed = [item for part in pool.map(write_paced, jobs) for item in part]
    written += n
    phase = measure_phase("sustained", out, closed, proc)
    wall = time.time() - t_start
    rep.phases.append(phase)
    drain = f"{phase.drain_s:.2f} s" if phase.drain_s is not None else "never"
    print(f" achieved {phase.rate:,.0f}/s, drained {drain} after the last file, {phase.lost} lost", flush=True)
    late = sum(1 for lat in phase.latencies if lat > 1.0)
    rep.notes.append(f"sustained: {late:,} of {phase.done:,} files took over 1 s from close to done")
    try:
        cpu = sum(coordinator.cpu_times()[:2]) - cpu0
        rep.notes.append(f"sustained: coordinator CPU {cpu:.1f} s over {wall:.1f} s of arrival and drain "
                         f"({100 * cpu / wall:.0f}% of one core)")
    except psutil.Error:
        pass
    info = ledger_rows(out, "SELECT info FROM runs ORDER BY id DESC LIMIT 1")
    if info and info[0][0]:
        state = json.loads(info[0][0])
        rep.notes.append(f"watcher (runs.info): {state.get('events')} events, {state.get('rescans')} full scans, "
                         f"queue depth {state.get('queue_depth')}")
    return written


# --- csv workloads: csv-stats against a single-process csv loop ---------------------

CSV_HEADER = "id,user,amount,category,timestamp\n"
CSV_FIRST = ["olivia", "liam", "emma", "noah", "amelia", "oliver", "ava", "elijah", "sophia", "mateo",
             "isabella", "lucas", "mia", "levi", "evelyn", "asher", "harper", "james", "luna", "leo",
             "camila", "grayson", "gianna", "ezra", "elizabeth", "luca", "eleanor", "ethan", "ella",
             "aiden", "abigail", "wyatt", "sofia", "sebastian", "avery", "jack", "scarlett", "benjamin",
             "emily", "henry"]
CSV_LAST = ["smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis", "rodriguez",
            "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson", "thomas", "taylor",
            "moore", "jackson", "martin", "lee", "perez", "thompson", "white", "harris"]
CSV_CATEGORIES = ["electronics", "books", "groceries", "toys", "clothing", "garden", "sports", "beauty",
                  "automotive", "music", "health", "office"]
CSV_MAX_CENTS = 10_000_000  # amounts 0.01 .. 99999.99
CSV_GEN_VERSION = 1
CSV_SUM_RTOL = 1e-9  # a loop's running float sum against the exact sum


@dataclasses.dataclass(frozen=True)
class CsvWorkload:
    name: str
    files: int
    rows_per_file: int
    block_rows: int  # rows per generation job; a file's blocks are written in order
    chunk_size: str | None  # crawlproc --chunk-size
    target: float  # crawlproc rows/s over the single-process loop's, at least
    wc_side: bool  # side rows: crawlproc -p linecount vs wc -l
    polars_target: float = 1.5  # crawlproc wall / polars wall, at most
    duckdb_target: float | None = None  # crawlproc wall / DuckDB wall, at most

    @property
    def rows(self) -> int:
        return self.files * self.rows_per_file

    @property
    def blocks_per_file(self) -> int:
        return -(-self.rows_per_file // self.block_rows)

    def shrink(self, factor: int) -> "CsvWorkload":
        per_file = max(1, self.rows_per_file // factor)
        return dataclasses.replace(self, rows_per_file=per_file, block_rows=min(self.block_rows, per_file))

    def file_name(self, index: int) -> str:
        return "big.csv" if self.files == 1 else f"part-{index:04d}.csv"

    def gen_params(self) -> dict:
        return {"name": self.name, "files": self.files, "rows_per_file": self.rows_per_file,
                "block_rows": self.block_rows, "seed": SEED, "gen_version": CSV_GEN_VERSION}


CSV_WORKLOADS = {
    "csv": CsvWorkload("csv", 200, 50_000, 50_000, None, target=1.8, wc_side=False, duckdb_target=1.0),
    "bigfile": CsvWorkload("bigfile", 1, 13_000_000, 250_000, "32MB", target=1.7, wc_side=True),
}

_CSV_TABLES: tuple | None = None


def csv_tables() -> tuple[list[str], list[str], list[str], list[str]]:
    """(users, dates, times of day, 3-digit fractions): rows are drawn from these."""
    global _CSV_TABLES
    if _CSV_TABLES is None:
        day = datetime.date(2024, 1, 1)
        _CSV_TABLES = ([f"{f}.{l}" for f in CSV_FIRST for l in CSV_LAST],
                       [(day + datetime.timedelta(days=i)).isoformat() for i in range(366)],
                       [f"{h:02d}:{m:02d}:{s:02d}" for h in range(24) for m in range(60) for s in range(60)],
                       [f"{i:03d}" for i in range(1000)])
    return _CSV_TABLES


def exact_parts(values: list[float]) -> list[float]:
    """The exact sum of ``values`` as floats (math.fsum of them is the correctly rounded sum)."""
    parts: list[float] = []
    while total := math.fsum(values):
        parts.append(total)
        values.append(-total)
    return parts


def csv_block(job: tuple[str, dict, int, int]) -> tuple[int, int, bytes, dict]:
    """Rows of block ``block`` of file ``file`` (no header), and their per-category truth.

    Truth per category: rows, id sum/min/max, the exact sum of the amounts
    (as parts) and their min/max in cents.
    """
    _, params, file, block = job
    rng = random.Random(f"{params['seed']}-{params['name']}-{file}-{block}")
    start = block * params["block_rows"]
    n = min(params["block_rows"], params["rows_per_file"] - start)
    first_id = file * params["rows_per_file"] + start + 1
    ids = range(first_id, first_id + n)
    users, dates, times, fractions = csv_tables()
    cats = rng.choices(range(len(CSV_CATEGORIES)), k=n)
    cents = rng.choices(range(1, CSV_MAX_CENTS), k=n)
    amounts = [f"{c // 100}.{c % 100:02d}" for c in cents]
    text = "".join(map("{},{},{},{},{}T{}.{}{}+00:00\n".format, ids, rng.choices(users, k=n), amounts,
                       map(CSV_CATEGORIES.__getitem__, cats), rng.choices(dates, k=n),
                       rng.choices(times, k=n), rng.choices(fractions, k=n), rng.choices(fractions, k=n)))
    by_cat_ids: list[list[int]] = [[] for _ in CSV_CATEGORIES]
    by_cat_cents: list[list[int]] = [[] for _ in CSV_CATEGORIES]
    add_id = [lst.append for lst in by_cat_ids]
    add_cents = [lst.append for lst in by_cat_cents]
    for cat, ident, c in zip(cats, ids, cents):
        add_id[cat](ident)
        add_cents[cat](c)
    truth = {}
    for k, cat in enumerate(CSV_CATEGORIES):
        if by_cat_ids[k]:
            cs = by_cat_cents[k]
            truth[cat] = {"rows": len(cs), "id_sum": sum(by_cat_ids[k]), "id_min": by_cat_ids[k][0],
                          "id_max": by_cat_ids[k][-1], "amount_parts": exact_parts([c / 100 for c in cs]),
                          "cents_min": min(cs), "cents_max": max(cs)}
    return file, block, text.encode(), truth


def generate_csv_file(job: tuple[str, dict, int, int]) -> dict:
    """A whole file of one block, written here; returns its truth."""
    root, params, file, _ = job
    _, _, data, truth = csv_block(job)
    Path(root, params["file_names"][file]).write_bytes(CSV_HEADER.encode() + data)
    return truth


def merge_truth(into: dict, part: dict) -> None:
    for cat, t in part.items():
        acc = into.get(cat)
        if acc is None:
            into[cat] = {**t, "amount_parts": list(t["amount_parts"])}
            continue
        acc["rows"] += t["rows"]
        acc["id_sum"] += t["id_sum"]
        acc["id_min"] = min(acc["id_min"], t["id_min"])
        acc["id_max"] = max(acc["id_max"], t["id_max"])
        acc["amount_parts"] += t["amount_parts"]
        acc["cents_min"] = min(acc["cents_min"], t["cents_min"])
        acc["cents_max"] = max(acc["cents_max"], t["cents_max"])


def finish_truth(acc: dict) -> dict:
    """Per category, in the shape of csv-stats' reduced ``groups``; exact values."""
    return {cat: {"rows": t["rows"], "columns": {
        "id": {"count": t["rows"], "sum": t["id_sum"], "min": t["id_min"], "max": t["id_max"]},
        "amount": {"count": t["rows"], "sum": math.fsum(t["amount_parts"]),
                   "min": t["cents_min"] / 100, "max": t["cents_max"] / 100}}}
        for cat, t in sorted(acc.items())}


def ensure_csv_data(bench_dir: Path, cwl: CsvWorkload) -> tuple[Path, dict, float | None]:
    """Generate the CSV files unless complete ones exist; return (dir, exact truth, gen seconds)."""
    params = cwl.gen_params()
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    root = bench_dir / f"data-{cwl.name}-{cwl.rows}-{digest[:10]}"
    marker = root.with_name(root.name + ".complete.json")
    truth_file = root.with_name(root.name + ".truth.json")
    if marker.exists() and json.loads(marker.read_text()) == params and truth_file.exists():
        return root, json.loads(truth_file.read_text()), None
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    job_params = {**params, "file_names": [cwl.file_name(i) for i in range(cwl.files)]}
    csv_tables()  # built once here, inherited by the forked workers
    acc: dict = {}
    with multiprocessing.Pool(os.cpu_count() or 2) as pool:
        if cwl.blocks_per_file == 1:
            jobs = [(str(root), job_params, i, 0) for i in range(cwl.files)]
            for truth in pool.imap_unordered(generate_csv_file, jobs):
                merge_truth(acc, truth)
        else:
            for i in range(cwl.files):
                jobs = [(str(root), job_params, i, b) for b in range(cwl.blocks_per_file)]
                with open(root / cwl.file_name(i), "wb") as f:
                    f.write(CSV_HEADER.encode())
                    for _, _, data, truth in pool.imap(csv_block, jobs):
                        f.write(data)
                        merge_truth(acc, truth)
    os.sync()
    truth = finish_truth(acc)
    rows = sum(t["rows"] for t in truth.values())
    assert rows == cwl.rows, (rows, cwl.rows)
    truth_file.write_text(json.dumps(truth, sort_keys=True))
    marker.write_text(json.dumps(params, sort_keys=True))
    return root, truth, time.perf_counter() - t0


@dataclasses.dataclass
class RateRow:
    run: str
    wall: float | None = None  # None: did not run or failed
    count: int = 0  # rows, lines or files handled
    note: str = ""
    failed: bool = False
    walls: list[float] = dataclasses.field(default_factory=list)

    def rate(self) -> str:
        return f"{self.count / self.wall:,.0f}" if self.wall else "-"

    def fmt_wall(self) -> str:
        return f"{self.wall:.2f}" if self.wall is not None else "-"


def timed_once(label: str, cmd: list[str], log: Path, count: int, unit: str, timeout: float,
               env: dict | None = None, ok: tuple[int, ...] = (0,)) -> tuple[int | None, float | None]:
    """One timed subprocess; returns (exit code, wall s or None when it failed)."""
    print(f"  {label} ...", end="", flush=True)
    rc, wall = run_timed(cmd, log, timeout, env)
    if rc in ok:
        print(f" {wall:.2f} s ({count / wall:,.0f} {unit}/s)" + (f", exit {rc}" if rc else ""), flush=True)
        return rc, wall
    why = "timeout" if rc is None else f"exit {rc}"
    print(f" FAILED ({why}) after {wall:.1f} s\n    $ {shlex.join(cmd)}", flush=True)
    tail = log_tail(log)
    if tail:
        print("    " + tail.replace("\n", "\n    "), flush=True)
    return rc, None


def finish_row(row: RateRow) -> RateRow:
    if row.walls and not row.failed:
        row.wall = statistics.median(row.walls)
        if len(row.walls) > 1:
            row.note = "; ".join(filter(None, ["median of " + ", ".join(f"{w:.2f}" for w in row.walls),
                                                row.note]))
    return row


def timed_into(row: RateRow, cmd: list[str], log: Path, unit: str, args, problems: list[str],
               label: str | None = None, env: dict | None = None) -> bool:
    """One timed run added to ``row`` (its wall, or the failure); whether it succeeded."""
    _, wall = timed_once(label or row.run, cmd, log, row.count, unit, args.timeout, env=env)
    if wall is None:
        row.failed = True
        row.note = f"FAILED, log {log}"
        problems.append(f"FAILED: {row.run}: $ {shlex.join(cmd)}")
        return False
    row.walls.append(wall)
    return True


def repeat_rate(label: str, make_cmd, tag: str, run_dir: Path, count: int, unit: str, args,
                problems: list[str]) -> tuple[RateRow, str]:
    """``make_cmd(suffix)`` --repeat times into new outputs; the row has the median wall time."""
    row, suffix = RateRow(label, count=count), ""
    for i in range(args.repeat):
        suffix = f"-{i + 1}" if args.repeat > 1 else ""
        if not timed_into(row, make_cmd(suffix), run_dir / f"{tag}{suffix}.log", unit, args, problems,
                          label=label + suffix.replace("-", " #")):
            break
    return finish_row(row), suffix


def compare_groups(got: dict, want: dict, columns: tuple[str, ...], exact_sums: bool) -> tuple[list[str], float]:
    """Differences of per-category stats ``got`` from ``want``; and the largest relative
    difference of an amount sum (exact comparison when ``exact_sums``, else within CSV_SUM_RTOL)."""
    problems: list[str] = []
    worst = 0.0
    if sorted(got) != sorted(want):
        problems.append(f"categories {sorted(got)} != {sorted(want)}")
    for cat in sorted(set(got) & set(want)):
        g, w = got[cat], want[cat]
        if g.get("rows") != w["rows"]:
            problems.append(f"{cat}: rows {g.get('rows')} != {w['rows']}")
        for col in columns:
            gc, wc = g.get("columns", {}).get(col), w["columns"][col]
            if gc is None:
                problems.append(f"{cat}: no column {col}")
                continue
            for key in ("count", "min", "max"):
                if gc.get(key) != wc[key]:
                    problems.append(f"{cat}.{col}.{key}: {gc.get(key)!r} != {wc[key]!r}")
            have, need = gc.get("sum"), wc["sum"]
            if not isinstance(have, (int, float)):
                problems.append(f"{cat}.{col}.sum: {have!r}")
                continue
            if col == "amount":
                rel = abs(have - need) / abs(need) if need else abs(have)
                worst = max(worst, rel)
                if (have != need) if exact_sums else rel > CSV_SUM_RTOL:
                    problems.append(f"{cat}.{col}.sum: {have!r} != {need!r} (relative difference {rel:.1e})")
            elif have != need:
                problems.append(f"{cat}.{col}.sum: {have!r} != {need!r}")
    return problems, worst


@dataclasses.dataclass
class CsvReport:
    cwl: CsvWorkload
    size: int = 0
    command: str = ""
    rows: list[RateRow] = dataclasses.field(default_factory=list)  # loops, then crawlproc
    crawlproc: RateRow | None = None
    crawlproc_columns: RateRow | None = None  # told the columns to aggregate, as polars and DuckDB are
    side: list[RateRow] = dataclasses.field(default_factory=list)
    engines: list[RateRow] = dataclasses.field(default_factory=list)  # polars, DuckDB
    checks: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def speedup(self, loop: RateRow) -> float | None:
        cp = self.crawlproc
        if cp is None or cp.wall is None or loop.wall is None or loop in (cp, self.crawlproc_columns):
            return None
        return loop.wall / cp.wall  # same rows: ratio of rows/s

    def markdown(self, workers: int) -> list[str]:
        cwl = self.cwl
        files = f"{cwl.files:,} CSV files" if cwl.files > 1 else "one CSV file"
        md = [f"## {cwl.name}: {files}, {cwl.rows:,} rows, {self.size / 1e6:,.0f} MB "
              f"(id,user,amount,category,timestamp; {len(CSV_CATEGORIES)} categories), workers {workers}", "",
              f"`{self.command}`", "",
              "| run | wall s | rows/s | crawlproc rows/s over this | note |", "|---|---:|---:|---:|---|"]
        for r in self.rows:
            ratio = self.speedup(r)
            md.append(f"| {r.run} | {r.fmt_wall()} | {r.rate()} | {f'{ratio:.2f}x' if ratio else ''} | {r.note} |")
        md.append("")
        if self.side:
            wc = self.side[0]
            md += ["| side run: counting lines | wall s | lines/s | wall vs wc -l | note |",
                   "|---|---:|---:|---:|---|"]
            for r in self.side:
                ratio = f"{r.wall / wc.wall:.2f}x" if r.wall and wc.wall else ""
                md.append(f"| {r.run} | {r.fmt_wall()} | {r.rate()} | {ratio} | {r.note} |")
            md.append("")
        for r in self.rows:
            ratio = self.speedup(r)
            if ratio is not None and r not in self.engines:
                md.append(f"- crawlproc vs {r.run}: {ratio:.2f}x the rows/s (target >= {cwl.target}x): "
                          f"{verdict(ratio >= cwl.target)}")
        for cp, which in ((self.crawlproc, "crawlproc"), (self.crawlproc_columns, f"crawlproc {CSV_COLUMNS}")):
            for r, target in zip(self.engines, (cwl.polars_target, cwl.duckdb_target)):
                if cp is not None and cp.wall and r.wall:
                    wall_ratio = cp.wall / r.wall
                    goal = f" (target <= {target}x): {verdict(wall_ratio <= target)}" if target else ""
                    md.append(f"- {which} wall / {r.run} wall: {wall_ratio:.2f}x{goal}")
        md += [f"- {c}" for c in self.checks]
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


CSV_COLUMNS = "columns=id,amount"   # the columns polars and DuckDB aggregate, told to csv-stats too
CSV_LOOPS = [("amount", "single-process csv loop: amount only", ("amount",)),
             ("all", "single-process csv loop: all numeric columns (id, amount)", ("id", "amount"))]


def engine_commands(data: Path, run_dir: Path, workers: int) -> list[tuple]:
    """polars and DuckDB over the same files, with as many threads as crawlproc has workers."""
    work = [sys.executable, str(SCRIPTS / "bench_work.py")]
    polars_env = {**os.environ, "POLARS_MAX_THREADS": str(workers)}
    return [
        (f"polars scan_csv().group_by(), {workers} threads",
         lambda suffix: [*work, "polars", str(data), str(run_dir / f"polars{suffix}.json")], "polars", polars_env),
        (f"DuckDB read_csv() GROUP BY, {workers} threads",
         lambda suffix: [*work, "duckdb", str(data), str(run_dir / f"duckdb{suffix}.json"), str(workers)],
         "duckdb", None),
    ]


def interleaved_rates(tools: list[tuple], run_dir: Path, count: int, times: int, args,
                      problems: list[str]) -> list[tuple[RateRow, list[str]]]:
    """Each tool (label, make_cmd(suffix), tag, env) run `times` times, taking turns (see
    taking_turns), so that a busy moment of the machine falls on all of them; rows with median
    walls and the suffixes of each tool's successful runs."""
    rows = [(RateRow(label, count=count), []) for label, *_ in tools]
    for i, k in taking_turns(len(tools), times):
        (label, make_cmd, tag, env), (row, suffixes) = tools[k], rows[k]
        if row.failed:
            continue
        suffix = f"-{i + 1}"
        if timed_into(row, make_cmd(suffix), run_dir / f"{tag}{suffix}.log", "rows", args, problems,
                      label=f"{label} #{i + 1}", env=env):
            suffixes.append(suffix)
    return [(finish_row(row), suffixes) for row, suffixes in rows]


def check_csv_runs(cwl: CsvWorkload, truth: dict, outs: list[Path], row: RateRow, rep: CsvReport) -> dict:
    """Every crawlproc run's reduced totals against the generator's exact ones; the last run's groups."""
    groups: dict = {}
    for n, out in enumerate(outs, 1):
        summary = read_summary(out)
        reduced = summary.get("reduced") or {}
        expect = {"files": cwl.files, "rows": cwl.rows, "malformed": 0, "group_by": "category"}
        wrong = {k: reduced.get(k) for k, v in expect.items() if reduced.get(k) != v}
        if wrong:
            rep.problems.append(f"MISMATCH {cwl.name} run {n}: crawlproc reduced {wrong}, expected "
                                f"{ {k: expect[k] for k in wrong} }")
        groups = reduced.get("groups") or {}
        bad, _ = compare_groups(groups, truth, ("id", "amount"), exact_sums=True)
        if bad:
            rep.problems.append(f"MISMATCH {cwl.name} run {n}: crawlproc reduced totals differ from the "
                                f"generator's exact totals: {'; '.join(bad[:5])}")
    elapsed = summary.get("timings", {}).get("elapsed_s")
    row.note = "; ".join(filter(None, [row.note, f"last summary elapsed_s {elapsed}", fmt_counts(summary),
                                       f"{reduced.get('tasks')} tasks"]))
    if not any(p.startswith(f"MISMATCH {cwl.name} run") for p in rep.problems):
        rep.checks.append(f"`reduced` of {row.run} == the generator's exact totals for all {len(truth)} categories, "
                          f"in each of the {len(outs)} runs (rows; id and amount count/sum/min/max; amount sum "
                          "compared exactly: csv-stats gives the correctly rounded exact sum): OK")
    return groups


def bench_csv(cwl: CsvWorkload, bench_dir: Path, run_root: Path, args) -> CsvReport:
    rep = CsvReport(cwl)
    print(f"\n[{cwl.name}] {cwl.files:,} CSV file(s), {cwl.rows:,} rows", flush=True)
    data, truth, gen_s = ensure_csv_data(bench_dir, cwl)
    rep.size = sum(p.stat().st_size for p in data.iterdir())
    rep.notes.append(f"inputs {data}: " + ("reused" if gen_s is None else f"generated in {gen_s:.1f} s"))
    print(f"  {rep.notes[-1]}", flush=True)
    n, warm_s = warm_up(data, args.workers)
    rep.notes.append(f"page-cache warm-up: read {n:,} files ({rep.size / 1e6:,.0f} MB) in {warm_s:.1f} s")
    print(f"  {rep.notes[-1]}", flush=True)
    if n != cwl.files:
        rep.problems.append(f"MISMATCH {cwl.name}: {n} files in {data}, expected {cwl.files}")
    exe = crawlproc_exe()
    if exe is None:
        rep.problems.append("FAILED: crawlproc executable not found")
        return rep
    run_dir = run_root / cwl.name
    run_dir.mkdir(parents=True)

    loops = {}
    for mode, label, columns in CSV_LOOPS:
        def loop_cmd(suffix: str, mode=mode) -> list[str]:
            return [sys.executable, str(SCRIPTS / "bench_work.py"), "csv-loop", mode, str(data),
                    str(run_dir / f"loop-{mode}{suffix}.json")]

        row, suffix = repeat_rate(label, loop_cmd, f"loop-{mode}", run_dir, cwl.rows, "rows", args, rep.problems)
        rep.rows.append(row)
        if not row.failed:
            loops[mode] = (label, columns, json.loads((run_dir / f"loop-{mode}{suffix}.json").read_text()))

    chunk = ["--chunk-size", cwl.chunk_size] if cwl.chunk_size else []

    def cp_cmd(suffix: str, name: str = "crawlproc-out", extra: tuple[str, ...] = ()) -> list[str]:
        return [exe, "run", str(data), "-o", str(run_dir / f"{name}{suffix}"), "-w", str(args.workers),
                "-p", "csv-stats", "--param", "group_by=category", *extra, *chunk, "--no-progress", "-q"]

    def cp_columns_cmd(suffix: str) -> list[str]:
        return cp_cmd(suffix, "crawlproc-columns-out", ("--param", CSV_COLUMNS))

    rep.command = shlex.join(["crawlproc", *cp_cmd("")[1:]]).replace(str(data), "DATA").replace(
        str(run_dir / "crawlproc-out"), "NEW")
    engines = engine_commands(data, run_dir, args.workers)
    times = args.repeat if args.repeat > 1 else (1 if args.quick else 5)
    rows = interleaved_rates([(f"crawlproc csv-stats, {args.workers} workers", cp_cmd, "crawlproc", None),
                              (f"crawlproc csv-stats --param {CSV_COLUMNS}, {args.workers} workers",
                               cp_columns_cmd, "crawlproc-columns", None),
                              *engines], run_dir, cwl.rows, times, args, rep.problems)
    (cp_row, cp_suffixes), (cols_row, cols_suffixes), *engine_rows = rows
    rep.rows += [cp_row, cols_row]
    groups = {}
    if not cols_row.failed:
        rep.crawlproc_columns = cols_row
        check_csv_runs(cwl, truth, [run_dir / f"crawlproc-columns-out{s}" for s in cols_suffixes], cols_row, rep)
    if not cp_row.failed:
        rep.crawlproc = cp_row
        groups = check_csv_runs(cwl, truth, [run_dir / f"crawlproc-out{s}" for s in cp_suffixes], cp_row, rep)
    for (row, suffixes), (_, _, tag, _) in zip(engine_rows, engines):
        rep.rows.append(row)
        rep.engines.append(row)
        if not row.failed and groups:
            loops[tag] = (row.run, ("id", "amount"), json.loads((run_dir / f"{tag}{suffixes[-1]}.json").read_text()))
    if groups:
        for mode, (label, columns, got) in loops.items():
            bad, worst = compare_groups(got, groups, columns, exact_sums=False)
            if bad:
                rep.problems.append(f"MISMATCH {cwl.name}: {label} vs crawlproc: {'; '.join(bad[:5])}")
            else:
                rep.checks.append(f"{label} == crawlproc per category: rows, count/min/max of "
                                  f"{', '.join(columns)}" + (", id sum" if "id" in columns else "")
                                  + " identical; amount sum (a float sum there) within "
                                  f"{worst:.1e} relative (tolerance {CSV_SUM_RTOL:g}): OK")
    if cwl.wc_side:
        bench_csv_side(cwl, data, run_dir, exe, args, rep)
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


def bench_csv_side(cwl: CsvWorkload, data: Path, run_dir: Path, exe: str, args, rep: CsvReport) -> None:
    """wc -l against crawlproc -p linecount --chunk-size on the same file."""
    path = data / cwl.file_name(0)
    lines = cwl.rows + 1  # with the header

    def wc_cmd(suffix: str) -> list[str]:
        return ["wc", "-l", str(path)]

    row, suffix = repeat_rate("wc -l", wc_cmd, "wc", run_dir, lines, "lines", args, rep.problems)
    rep.side.append(row)
    if not row.failed:
        got = int(log_tail(run_dir / f"wc{suffix}.log", 1).split()[0])
        row.note = f"{got:,} lines"
        if got != lines:
            rep.problems.append(f"MISMATCH {cwl.name}: wc -l says {got} lines, expected {lines}")

    def lc_cmd(suffix: str) -> list[str]:
        return [exe, "run", str(data), "-o", str(run_dir / f"linecount-out{suffix}"), "-w", str(args.workers),
                "-p", "linecount", "--chunk-size", cwl.chunk_size or "32MB", "--no-progress", "-q"]

    row, suffix = repeat_rate(f"crawlproc -p linecount --chunk-size {cwl.chunk_size}, {args.workers} workers",
                              lc_cmd, "linecount", run_dir, lines, "lines", args, rep.problems)
    rep.side.append(row)
    if not row.failed:
        summary = read_summary(run_dir / f"linecount-out{suffix}")
        reduced = summary.get("reduced") or {}
        row.note = "; ".join(filter(None, [row.note, f"{reduced.get('lines', 0):,} lines, "
                                           f"{reduced.get('words', 0):,} words (it splits words too)",
                                           fmt_counts(summary)]))
        if reduced.get("lines") != lines or reduced.get("bytes") != rep.size:
            rep.problems.append(f"MISMATCH {cwl.name}: crawlproc linecount reduced {reduced}, expected "
                                f"{lines} lines, {rep.size} bytes")


# --- faults: the cost of the fault-tolerance options and of a worker death ---------

FAULT_LIMITS = ["--timeout", "60", "--max-memory-per-child", "1GB"]  # limits that never trigger
FAULT_TARGET = 1.05  # wall with the limits / default wall, at most
DEATH_TARGET_MS = 200.0
KILLER_PROCESSOR = f"{SCRIPTS / 'bench_work.py'}:typical_killer"
KILL_EVERY = 100  # every 100th file (sorted relpaths) kills its worker: 50 of typical's 5,000


@dataclasses.dataclass
class FaultsReport:
    times: int = 1
    limit_rows: list[tuple[str, RateRow, RateRow]] = dataclasses.field(default_factory=list)
    death_rows: list[RateRow] = dataclasses.field(default_factory=list)
    deaths: int = 0
    files: int = 0
    death_note: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, workers: int) -> list[str]:
        md = [f"## faults: fault-tolerance options and worker deaths, workers {workers}", "",
              f"Runs interleaved (default, limits; limits, default; ...), {self.times} of each; median wall. "
              f"Limits: `{' '.join(FAULT_LIMITS)}` (never trigger).", "",
              "| data | run | wall s | files/s | vs default | note |", "|---|---|---:|---:|---:|---|"]
        verdicts = []
        for data, default, limits in self.limit_rows:
            md.append(f"| {data} | {default.run} | {default.fmt_wall()} | {default.rate()} | "
                      f"{'1.00x' if default.wall else ''} | {default.note} |")
            ratio = limits.wall / default.wall if limits.wall and default.wall else None
            md.append(f"| {data} | {limits.run} | {limits.fmt_wall()} | {limits.rate()} | "
                      f"{f'{ratio:.3f}x' if ratio else ''} | {limits.note} |")
            if ratio:
                verdicts.append(f"- {data.split(' ')[0]}: with limits {ratio:.3f}x the default wall "
                                f"(target <= {FAULT_TARGET}x): {verdict(ratio <= FAULT_TARGET)}")
        md.append("")
        md += verdicts
        if self.death_rows:
            md += ["", f"Worker deaths: typical data, `-p bench_work.py:typical_killer --retries 0`; "
                   f"{self.deaths} of {self.files:,} files (every {KILL_EVERY}th by sorted path, listed in "
                   "$BENCH_KILL_FILES) call os._exit(1) after doing their work.", "",
                   "| run | wall s | files/s | deaths | note |", "|---|---:|---:|---:|---|"]
            for r, d in zip(self.death_rows, (0, self.deaths)):
                md.append(f"| {r.run} | {r.fmt_wall()} | {r.rate()} | {d} | {r.note} |")
            md.append("")
            clean, killer = self.death_rows
            if clean.wall and killer.wall and self.deaths:
                lost = (killer.wall - clean.wall) / self.deaths * 1000
                md.append(f"- lost time per worker death = (killer wall {killer.wall:.2f} s - clean wall "
                          f"{clean.wall:.2f} s - work of the killed tasks beyond the clean run 0 s) / "
                          f"{self.deaths} deaths = {lost:.1f} ms (target < {DEATH_TARGET_MS:.0f} ms): "
                          f"{verdict(lost < DEATH_TARGET_MS)}")
                md.append("  (each killed task does its full work before os._exit(1), and the clean run does the "
                          "same work on the same files; with --retries 0 nothing is redone)")
            if self.death_note:
                md.append(f"- {self.death_note}")
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


def failures_json(exe: str, out: Path) -> list[dict]:
    proc = subprocess.run([exe, "failures", "-o", str(out), "--json"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return []


def interleaved(variants: list[tuple[str, list[str] | Callable[[], AbstractContextManager], dict | None,
                                     tuple[int, ...]]],
                data: Path, tag: str, run_dir: Path, exe: str, processor: str, n: int, times: int, args,
                problems: list[str]) -> list[tuple[RateRow, Path | None]]:
    """Run each variant ``times`` times, interleaved, each into a new OUT; rows with median walls.

    A variant is (label, extra options, env, accepted exit codes); its extra options may
    instead be a context manager factory that yields them and is held around each run (a
    client of the status page). Rounds take turns as taking_turns says. Returns each row with
    the OUT of its last successful run; ``row.walls[i]`` is round i's wall.
    """
    rows = [(RateRow(label, count=n), None) for label, *_ in variants]
    for i, k in taking_turns(len(variants), times):
        label, extra, env, ok = variants[k]
        row, _ = rows[k]
        if row.failed:
            continue
        out = run_dir / f"{tag}-{k}-{i + 1}"
        with (extra() if callable(extra) else contextlib.nullcontext(extra)) as options:
            cmd = [exe, "run", str(data), "-o", str(out), "-w", str(args.workers), "-p", processor, *options,
                   "--no-progress", "-q"]
            _, wall = timed_once(f"{tag}: {label} #{i + 1}", cmd, run_dir / f"{tag}-{k}-{i + 1}.log", n,
                                 "files", args.timeout, env=env, ok=ok)
        if wall is None:
            row.failed = True
            row.note = f"FAILED, log {run_dir / f'{tag}-{k}-{i + 1}.log'}"
            problems.append(f"FAILED: {tag} {label}: $ {shlex.join(cmd)}")
            continue
        row.walls.append(wall)
        rows[k] = (row, out)
    return [(finish_row(row), out) for row, out in rows]


def bench_faults(bench_dir: Path, run_root: Path, args) -> FaultsReport:
    times = args.repeat if args.repeat > 1 else (1 if args.quick else 3)
    rep = FaultsReport(times=times)
    print("\n[faults] fault-tolerance options and worker deaths", flush=True)
    exe = crawlproc_exe()
    if exe is None:
        rep.problems.append("FAILED: crawlproc executable not found")
        return rep
    run_dir = run_root / "faults"
    run_dir.mkdir(parents=True)
    typical = None
    for name in ("tiny", "typical"):
        wl = WORKLOADS[name].shrink(10) if args.quick else WORKLOADS[name]
        data, n, note = prepared_inputs(bench_dir, wl, args)
        rep.notes.append(note)
        print(f"  {note}", flush=True)
        variants = [("default", [], None, (0,)), (" ".join(FAULT_LIMITS), FAULT_LIMITS, None, (0,))]
        results = interleaved(variants, data, name, run_dir, exe, wl.processor, n, times, args, rep.problems)
        for row, out in results:
            if out is not None:
                summary = read_summary(out)
                row.note = "; ".join(filter(None, [row.note, fmt_counts(summary)]))
                if summary.get("counts", {}).get("done") != n:
                    rep.problems.append(f"MISMATCH faults {name} {row.run}: {fmt_counts(summary)} for {n} files")
        label = f"{name} ({n:,} files, {Path(wl.processor).name})"
        rep.limit_rows.append((label, results[0][0], results[1][0]))
        if name == "typical":
            typical = (data, n)

    data, n = typical
    relpaths = sorted(rel for _, rel in bench_work.walk_files(str(data)))
    kill = relpaths[KILL_EVERY // 2::KILL_EVERY]
    rep.deaths, rep.files = len(kill), n
    clean_env = {**os.environ, bench_work.KILL_ENV: ""}
    kill_env = {**os.environ, bench_work.KILL_ENV: "\n".join(kill)}
    variants = [("clean (kill list empty)", ["--retries", "0"], clean_env, (0,)),
                (f"{len(kill)} files kill their worker", ["--retries", "0"], kill_env, (1,))]
    results = interleaved(variants, data, "deaths", run_dir, exe, KILLER_PROCESSOR, n, times, args, rep.problems)
    rep.death_rows = [row for row, _ in results]
    for (row, out), deaths in zip(results, (0, len(kill))):
        if out is None:
            continue
        summary = read_summary(out)
        counts = summary.get("counts", {})
        row.note = "; ".join(filter(None, [row.note, fmt_counts(summary)]))
        if counts.get("done") != n - deaths or counts.get("failed", 0) != deaths:
            rep.problems.append(f"MISMATCH faults deaths {row.run}: {fmt_counts(summary)}, expected done "
                                f"{n - deaths}, failed {deaths}")
        if deaths:
            failed = failures_json(exe, out)
            if sorted(f.get("relpath") for f in failed) != kill:
                rep.problems.append(f"MISMATCH faults deaths: `crawlproc failures --json` lists "
                                    f"{len(failed)} tasks, not the {len(kill)} killer files")
            if failed:
                rep.death_note = (f"failure recorded for {failed[0].get('relpath')}: "
                                  f"{str(failed[0].get('error')).strip()[:200]!r} "
                                  f"(attempts {failed[0].get('attempts')})")
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


# --- watch-scale: watch on 100,000 folders, and polls of an unchanged tree ---------------

WATCH_FOLDERS = (100, 1000)  # fan-out of watch-scale's tree: 100,000 leaf folders
POLL_SECONDS = 5.0
POLL_SPAN = 30.0  # seconds of polling measured


@dataclasses.dataclass
class WatchScaleReport:
    folders: int = 0
    start_s: float | None = None
    start_rss_mb: float | None = None
    poll_files: int = 0
    poll_cpu_s: float | None = None
    poll_walls: list[float] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, workers: int) -> list[str]:
        def fmt(value, spec=".2f"):
            return "-" if value is None else format(value, spec)

        walls = sorted(self.poll_walls)
        median = statistics.median(walls) if walls else None
        md = [f"## watch-scale: watch on {self.folders:,} folders, and polls of an unchanged tree, "
              f"workers {workers}", "",
              "| measure | value |", "|---|---:|",
              f"| {self.folders:,} folders: command start to READY=1 (catch-up processed and merged), s "
              f"| {fmt(self.start_s)} |",
              f"| {self.folders:,} folders: coordinator RSS at READY=1, MB | {fmt(self.start_rss_mb, '.0f')} |",
              f"| --poll {POLL_SECONDS:g} on {self.poll_files:,} unchanged files: coordinator CPU per poll, s "
              f"| {fmt(self.poll_cpu_s, '.3f')} |",
              f"| the same: wall of one poll (median of {len(walls)}), s | {fmt(median, '.3f')} |", ""]
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


class NotifySocket:
    """A stand-in for systemd: the datagram socket named by NOTIFY_SOCKET, and what came on it."""

    def __init__(self, path: Path) -> None:
        import socket

        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)

    def wait_for(self, message: str, timeout: float, proc: subprocess.Popen) -> float | None:
        """perf_counter time when `message` (e.g. READY=1) came, or None."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline and proc.poll() is None:
            try:
                data = self.sock.recv(65536).decode(errors="replace")
            except OSError:
                continue
            if message in data.splitlines():
                return time.perf_counter()
        return None

    def close(self) -> None:
        self.sock.close()


def ensure_folder_tree(bench_dir: Path) -> tuple[Path, float | None]:
    """100,000 leaf folders with one 10-byte file each (generated once, like the others)."""
    outer, inner = WATCH_FOLDERS
    root = bench_dir / f"data-folders-{outer * inner}"
    marker = root / ".complete"
    if marker.exists():
        return root, None
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    for i in range(outer):
        for j in range(inner):
            folder = root / f"a{i:03d}" / f"b{j:04d}"
            folder.mkdir(parents=True)
            (folder / "f.txt").write_bytes(b"one line\n")
    marker.write_text("done\n")
    return root, time.perf_counter() - t0


def stop_watch(proc: subprocess.Popen, problems: list[str], what: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        problems.append(f"FAILED watch-scale {what}: watch did not stop within 300 s of SIGINT")
        return
    if rc != 0:
        problems.append(f"FAILED watch-scale {what}: watch exited {rc}")


def bench_watch_scale(bench_dir: Path, run_root: Path, args) -> WatchScaleReport:
    import psutil

    rep = WatchScaleReport()
    print("\n[watch-scale] watch on 100,000 folders; polls of an unchanged tree", flush=True)
    exe = crawlproc_exe()
    if exe is None:
        rep.problems.append("FAILED: crawlproc executable not found")
        return rep
    run_dir = run_root / "watch-scale"
    run_dir.mkdir(parents=True)
    data, gen_s = ensure_folder_tree(bench_dir)
    rep.folders = math.prod(WATCH_FOLDERS)
    n, warm_s = warm_up(data, args.workers)
    rep.notes.append(f"folder tree {data}: " + ("reused" if gen_s is None else f"generated in {gen_s:.1f} s")
                     + f"; warm-up: {n:,} files in {warm_s:.1f} s; "
                     f"fs.inotify.max_user_watches {Path('/proc/sys/fs/inotify/max_user_watches').read_text().strip()}")
    print(f"  {rep.notes[-1]}", flush=True)

    # (a) start time and RSS on 100,000 folders
    notify = NotifySocket(run_dir / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    cmd = [exe, "watch", str(data), "-o", str(run_dir / "folders-out"), "-w", str(args.workers),
           "--no-progress", "-q"]
    with open(run_dir / "folders.log", "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        ready = notify.wait_for("READY=1", args.timeout, proc)
        if ready is None:
            rep.problems.append(f"FAILED watch-scale: no READY=1 from $ {shlex.join(cmd)}")
        else:
            rep.start_s = ready - t0
            rep.start_rss_mb = psutil.Process(proc.pid).memory_info().rss / 2**20
            print(f"  READY=1 after {rep.start_s:.2f} s, coordinator RSS {rep.start_rss_mb:.0f} MB", flush=True)
        stop_watch(proc, rep.problems, "folders")
    notify.close()

    # (b) the cost of polling an unchanged 100,000-file tree
    wl = WORKLOADS["tiny"].shrink(10) if args.quick else WORKLOADS["tiny"]
    tiny, _ = ensure_data(bench_dir, wl)
    rep.poll_files, _ = warm_up(tiny, args.workers)
    notify = NotifySocket(run_dir / "poll.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path)}
    out = run_dir / "poll-out"
    log_path = run_dir / "poll.log"
    cmd = [exe, "watch", str(tiny), "-o", str(out), "-w", str(args.workers), "--poll", f"{POLL_SECONDS:g}",
           "--no-progress", "-vv", "--log-json"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if notify.wait_for("READY=1", args.timeout, proc) is None:
            rep.problems.append(f"FAILED watch-scale: no READY=1 from $ {shlex.join(cmd)}")
        else:
            coordinator = psutil.Process(proc.pid)
            time.sleep(POLL_SECONDS)  # the first poll after the catch-up
            before = coordinator.cpu_times()
            t0 = time.perf_counter()
            time.sleep(POLL_SPAN)
            after = coordinator.cpu_times()
            polls = (time.perf_counter() - t0) / POLL_SECONDS
            rep.poll_cpu_s = (after.user + after.system - before.user - before.system) / polls
            print(f"  --poll {POLL_SECONDS:g}: {rep.poll_cpu_s:.3f} CPU s per poll", flush=True)
        stop_watch(proc, rep.problems, "poll")
    notify.close()
    rep.poll_walls = poll_walls(log_path)
    rep.notes.append(f"poll walls from the coordinator's debug log ('rescan ... done in'): "
                     + (", ".join(f"{w:.3f}" for w in rep.poll_walls) or "none found"))
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


def poll_walls(log_path: Path) -> list[float]:
    """The wall time of each poll after the catch-up, as the coordinator logged it."""
    walls = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            message = json.loads(line).get("message", "")
        except ValueError:
            continue
        match = re.search(r"rescan of .* done in ([0-9.]+)s", message)
        if match:
            walls.append(float(match.group(1)))
    return walls[1:]  # the first is the catch-up


# --- serve: the status page's cost to the run it serves ------------------------------

SERVE_TARGET = 1.03  # wall with --serve (watched) / wall without, at most
SERVE_PATHS = ("/", "/status.json", "/metrics")


class PagePoller(threading.Thread):
    """A watcher of the status page: every second, the page, /status.json and /metrics, as a
    browser tab and a Prometheus scrape would; connection errors (the run not listening yet,
    or gone) are skipped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopped = threading.Event()
        self.fetches = 0

    def run(self) -> None:
        import urllib.request

        while not self.stopped.wait(1.0):
            for path in SERVE_PATHS:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as reply:
                        reply.read()
                    self.fetches += 1
                except OSError:
                    pass


@contextlib.contextmanager
def watched_page(rep: ServeReport) -> Iterator[list[str]]:
    """A run's `--serve` options, with a client fetching the page while the run lasts."""
    poller = PagePoller(free_port())
    poller.start()
    try:
        yield ["--serve", f"127.0.0.1:{poller.port}"]
    finally:
        poller.stopped.set()
        poller.join(timeout=10)
        rep.fetches += poller.fetches


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass
class ServeReport:
    times: int = 1
    files: int = 0
    rows: list[RateRow] = dataclasses.field(default_factory=list)
    fetches: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, workers: int) -> list[str]:
        md = [f"## serve: the status page's cost, tiny ({self.files:,} files, linecount), workers {workers}", "",
              f"First runs interleaved (without, with; with, without; ...), {self.times} of each; median wall. With "
              f"`--serve`, a client fetches {', '.join(SERVE_PATHS)} every second throughout "
              f"({self.fetches} fetches answered in all).", "",
              "| run | wall s | files/s | vs without | note |", "|---|---:|---:|---:|---|"]
        base = self.rows[0].wall if self.rows else None
        for row in self.rows:
            ratio = f"{row.wall / base:.3f}x" if row.wall and base else ""
            md.append(f"| {row.run} | {row.fmt_wall()} | {row.rate()} | {ratio} | {row.note} |")
        md.append("")
        if len(self.rows) == 2 and self.rows[1].wall and base:
            ratio = self.rows[1].wall / base
            md.append(f"- with --serve, watched: {ratio:.3f}x the wall without (target <= {SERVE_TARGET}x): "
                      f"{verdict(ratio <= SERVE_TARGET)}")
            paired = paired_ratios(self.rows[0], self.rows[1])
            if paired:
                md.append(f"- the same, round by round (each round's two runs back to back): median "
                          f"{statistics.median(paired):.3f}x, rounds " + ", ".join(f"{r:.3f}" for r in paired))
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


def paired_ratios(base: RateRow, other: RateRow) -> list[float]:
    """Each round's wall of `other` over that round's wall of `base` (rounds both finished)."""
    if base.failed or other.failed:
        return []
    return [b / a for a, b in zip(base.walls, other.walls)]


def bench_serve(bench_dir: Path, run_root: Path, args) -> ServeReport:
    times = args.repeat if args.repeat > 1 else (1 if args.quick else 5)
    rep = ServeReport(times=times)
    print("\n[serve] the status page's cost to the run", flush=True)
    exe = crawlproc_exe()
    if exe is None:
        rep.problems.append("FAILED: crawlproc executable not found")
        return rep
    run_dir = run_root / "serve"
    run_dir.mkdir(parents=True)
    wl = WORKLOADS["tiny"].shrink(10) if args.quick else WORKLOADS["tiny"]
    data, rep.files, note = prepared_inputs(bench_dir, wl, args)
    rep.notes.append(note)
    variants = [("crawlproc first run", [], None, (0,)),
                ("crawlproc first run --serve, watched", lambda: watched_page(rep), None, (0,))]
    results = interleaved(variants, data, "serve", run_dir, exe, wl.processor, rep.files, times, args, rep.problems)
    rep.rows = [row for row, _ in results]
    for row, out in results:
        if out is not None and read_summary(out).get("counts", {}).get("done") != rep.files:
            rep.problems.append(f"MISMATCH serve {row.run}: {fmt_counts(read_summary(out))} for {rep.files} files")
    if rep.fetches == 0:
        rep.problems.append("FAILED serve: the page never answered a fetch")
    for p in rep.problems:
        print(f"  !!! {p}", flush=True)
    return rep


# --- dask-scale: a million files through a Dask cluster ------------------------------

DASK_SCALE_TARGETS = {"rss_mb": 200.0, "first_result_s": 5.0, "scheduler_tasks": 300}

# Samples how many tasks the scheduler holds, every 0.1 s, until killed: one line per sample.
SCHEDULER_POLLER = """
import sys, time
from distributed import Client
with Client(sys.argv[1], timeout=30) as client, open(sys.argv[2], "a") as out:
    while True:
        n = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        out.write(f"{n}\\n")
        out.flush()
        time.sleep(0.1)
"""


@dataclasses.dataclass
class DaskScaleReport:
    n_files: int = 0
    wall: float | None = None
    first_result_s: float | None = None
    peak_rss: int | None = None
    scheduler_tasks_max: int | None = None
    samples: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def markdown(self, workers: int) -> list[str]:
        t = DASK_SCALE_TARGETS
        md = [f"## dask-scale: {self.n_files:,} files through a Dask cluster (a scheduler and "
              f"{workers} worker processes of 1 thread, started apart), processor `linecount`", ""]
        if self.wall is not None:
            md.append(f"- wall {self.wall:.2f} s ({self.n_files / self.wall:,.0f} files/s)")
        if self.peak_rss is not None:
            mb = self.peak_rss / 1e6
            md.append(f"- coordinator peak RSS: {mb:.1f} MB (target < {t['rss_mb']:.0f} MB): "
                      f"{verdict(mb < t['rss_mb'])}")
        if self.first_result_s is not None:
            md.append(f"- first task done {self.first_result_s:.2f} s after the command started "
                      f"(target <= {t['first_result_s']:.0f} s): {verdict(self.first_result_s <= t['first_result_s'])}")
        if self.scheduler_tasks_max is not None:
            md.append(f"- most tasks the scheduler held at once: {self.scheduler_tasks_max} "
                      f"({self.samples} samples, every 0.1 s; target <= {t['scheduler_tasks']}): "
                      f"{verdict(self.scheduler_tasks_max <= t['scheduler_tasks'])}")
        md += [f"- {n}" for n in self.notes]
        md += [f"- **{p}**" for p in self.problems]
        md.append("")
        return md


def bench_dask_scale(bench_dir: Path, run_root: Path, args) -> DaskScaleReport:
    rep = DaskScaleReport()
    wl = WORKLOADS["scale"].shrink(10) if args.quick else WORKLOADS["scale"]
    print(f"\n[dask-scale] {wl.n_files:,} files", flush=True)
    exe = crawlproc_exe()
    try:
        import distributed  # noqa: F401
    except ImportError:
        rep.problems.append("FAILED: Dask is not installed (pip install 'crawlproc[dask]')")
        return rep
    data, rep.n_files, note = prepared_inputs(bench_dir, wl, args)
    rep.notes.append(note)
    run_dir = run_root / "dask-scale"
    run_dir.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        address = start_dask_cluster(run_dir, args.workers, procs)
        samples = run_dir / "scheduler-tasks.txt"
        procs.append(subprocess.Popen([sys.executable, "-c", SCHEDULER_POLLER, address, str(samples)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = run_dir / "crawlproc-out"
        cmd = [exe, "run", str(data), "-o", str(out), "--executor", "dask", "--scheduler", address,
               "--no-progress", "-q"]
        started = time.time()
        print("  crawlproc --executor dask ...", end="", flush=True)
        rc, rep.wall = run_timed(cmd, run_dir / "crawlproc.log", args.timeout)
        print(f" {rep.wall:.2f} s (exit {rc})", flush=True)
        if rc != 0:
            rep.problems.append(f"FAILED: exit {rc}: $ {shlex.join(cmd)}\n{log_tail(run_dir / 'crawlproc.log')}")
            return rep
        first = ledger_rows(out, "SELECT min(finished_at) FROM tasks WHERE state = 'done'")
        rep.first_result_s = first[0][0] - started if first and first[0][0] else None
        rep.peak_rss = read_summary(out).get("timings", {}).get("coordinator_peak_rss_bytes")
        counts = [int(x) for x in samples.read_text().split()] if samples.exists() else []
        rep.samples = len(counts)
        rep.scheduler_tasks_max = max(counts) if counts else None
        done = ledger_rows(out, "SELECT count(*) FROM tasks WHERE state = 'done'")[0][0]
        if done != rep.n_files:
            rep.problems.append(f"MISMATCH dask-scale: {done} of {rep.n_files} tasks done")
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait(30)
    return rep


def start_dask_cluster(run_dir: Path, workers: int, procs: list[subprocess.Popen]) -> str:
    """A scheduler and `workers` worker processes (1 thread each) on this machine; their address."""
    scheduler_file = run_dir / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--port", "0",
                                   "--no-dashboard", "--scheduler-file", str(scheduler_file)], **quiet))
    deadline = time.monotonic() + 120
    while not (scheduler_file.exists() and scheduler_file.stat().st_size):
        if time.monotonic() > deadline:
            raise RuntimeError("the Dask scheduler did not start within 120 s")
        time.sleep(0.1)
    address = json.loads(scheduler_file.read_text())["address"]
    procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nworkers",
                                   str(workers), "--nthreads", "1", "--no-dashboard"], **quiet))
    wait = ("import sys; from distributed import Client\n"
            "with Client(sys.argv[1], timeout=60) as c: c.wait_for_workers(int(sys.argv[2]), timeout=120)")
    subprocess.run([sys.executable, "-c", wait, address, str(workers)], check=True, timeout=180)
    return address


# --- start-up time -------------------------------------------------------------


def startup_time(runs: int = 5) -> tuple[float | None, str]:
    exe = crawlproc_exe()
    if exe is None:
        return None, "crawlproc not installed"
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run([exe, "--help"], capture_output=True, timeout=60)
        walls.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            return None, f"`crawlproc --help` exit {proc.returncode}: {proc.stderr.decode()[-300:]}"
    return statistics.median(walls), ""


# --- report ----------------------------------------------------------------------


def fmt_ratio(row: Row, rep: Report) -> str:
    """Time per file relative to bare: the wall-time ratio when both did all files."""
    if row.wall is None or not rep.bare_wall or not row.files:
        return ""
    ratio = (row.wall / row.files) / (rep.bare_wall / rep.n_files)
    return f"{ratio:.2f}x" + (" (per file)" if row.files != rep.n_files else "")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def workload_markdown(rep: Report, workers: int) -> list[str]:
    wl = rep.wl
    md = [f"## {wl.name}: {rep.n_files:,} files, processor `{Path(wl.processor).name}`, "
          f"workers {workers}", "",
          "| run | wall s | files/s | vs bare | note |", "|---|---:|---:|---:|---|"]
    for r in rep.rows:
        wall = f"{r.wall:.2f}" if r.wall is not None else "-"
        rate = f"{r.files / r.wall:,.0f}" if r.wall else "-"
        md.append(f"| {r.run} | {wall} | {rate} | {fmt_ratio(r, rep)} | {r.note} |")
    md.append("")
    if rep.first_wall and rep.bare_wall and wl.ratio_target:
        ratio = rep.first_wall / rep.bare_wall
        md.append(f"- crawlproc first run vs bare: {ratio:.2f}x (target <= {wl.ratio_target}x): "
                  f"{verdict(ratio <= wl.ratio_target)}")
    if rep.first_wall and rep.rerun_wall:
        share = rep.rerun_wall / rep.first_wall
        md.append(f"- no-op rerun: {rep.rerun_wall:.2f} s = {100 * share:.1f}% of the first run "
                  f"(target <= {100 * RERUN_TARGET:.0f}%): {verdict(share <= RERUN_TARGET)}")
    if rep.first_wall and rep.dask_wall and wl.dask_target:
        ratio = rep.dask_wall / rep.first_wall
        md.append(f"- crawlproc on Dask (its own LocalCluster of {workers}, start and stop included) vs "
                  f"local: {ratio:.2f}x (target <= {wl.dask_target}x): {verdict(ratio <= wl.dask_target)}")
    if rep.peak_rss is not None:
        mb = rep.peak_rss / 1e6
        target = (f" (target < {wl.rss_target_mb:.0f} MB): {verdict(mb < wl.rss_target_mb)}"
                  if wl.rss_target_mb else "")
        md.append(f"- crawlproc coordinator peak RSS: {mb:.1f} MB{target}")
        if rep.parent_rss_mb is not None:
            md.append(f"  (bench.py's own peak RSS when it started crawlproc: {rep.parent_rss_mb:.1f} MB; "
                      "a child's ru_maxrss starts from it, so it is a floor for that figure)")
    elif rep.first_wall:
        md.append("- crawlproc coordinator peak RSS: not in summary.json")
    md += [f"- {n}" for n in rep.notes]
    md += [f"- **{p}**" for p in rep.problems]
    md.append("")
    return md


def git_revision() -> str:
    try:
        proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (proc.stdout.strip() or "no commit") + (" (dirty tree)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def work_calibration() -> str:
    data = os.urandom(204800)
    t0 = time.perf_counter()
    for _ in range(50):
        bench_work.typical_record("x", data)
    ms = (time.perf_counter() - t0) / 50 * 1000
    return f"typical work: {ms:.2f} ms per 200 KB file ({bench_work.TYPICAL_ROUNDS} sha256 rounds; aim ~2 ms)"


def full_markdown(reports: list[Report], args, startup: tuple[float | None, str]) -> str:
    md = ["# crawlproc benchmark", "",
          f"- started {args.started}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, git {git_revision()}",
          f"- workers {args.workers}" + (", QUICK (inputs shrunk 10x: smoke check only)"
                                         if args.quick else ""),
          f"- {work_calibration()}"]
    median, err = startup
    if median is not None:
        md.append(f"- `crawlproc --help` start-up: median {median:.3f} s of 5 (target < 0.3 s): "
                  f"{verdict(median < 0.3)}")
    else:
        md.append(f"- `crawlproc --help` start-up: not measured ({err})")
    md.append("")
    for rep in reports:
        md += rep.markdown(args.workers) if hasattr(rep, "markdown") else workload_markdown(rep, args.workers)
    return "\n".join(md)


# --- main ----------------------------------------------------------------------


def bench_dir() -> Path:
    env = os.environ.get("CRAWLPROC_BENCH_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "crawlproc-bench"


def remove_old_runs(runs: Path, keep: Path) -> int:
    old = [p for p in runs.iterdir() if p.is_dir() and p != keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return len(old)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                        help=f"any of {', '.join([*WORKLOADS, *SPECIAL_WORKLOADS])} "
                             f"(default: {' '.join(DEFAULT_WORKLOADS)})")
    parser.add_argument("--workers", "-w", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="shrink every workload 10x")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds allowed for each timed step")
    parser.add_argument("--dask", action="store_true",
                        help="also time tiny and typical with --executor dask --scheduler local:W")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the bare baseline and crawlproc's first run N times "
                             "(each into new outputs) and report the median")
    args = parser.parse_args(argv)
    known = [*WORKLOADS, *SPECIAL_WORKLOADS]
    unknown = [w for w in args.workloads if w not in known]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    args.workloads = args.workloads or DEFAULT_WORKLOADS
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    args.started = time.strftime("%Y-%m-%d %H:%M:%S")
    root = bench_dir()
    run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    runs = root / "runs"
    run_root = runs / run_id
    run_root.mkdir(parents=True)
    print(f"bench dir {root}, run {run_id}", flush=True)

    precompile_crawlproc()
    startup = startup_time()
    reports = []
    for name in args.workloads:
        if name == "watch":
            reports.append(bench_watch(run_root, args))
            continue
        if name in CSV_WORKLOADS:
            cwl = CSV_WORKLOADS[name].shrink(10) if args.quick else CSV_WORKLOADS[name]
            reports.append(bench_csv(cwl, root, run_root, args))
            continue
        if name == "faults":
            reports.append(bench_faults(root, run_root, args))
            continue
        if name == "watch-scale":
            reports.append(bench_watch_scale(root, run_root, args))
            continue
        if name == "serve":
            reports.append(bench_serve(root, run_root, args))
            continue
        if name == "dask-scale":
            reports.append(bench_dask_scale(root, run_root, args))
            continue
        wl = WORKLOADS[name].shrink(10) if args.quick else WORKLOADS[name]
        reports.append(bench_workload(wl, root, run_root, args))

    text = full_markdown(reports, args, startup)
    print("\n" + text)
    (root / "last-results.md").write_text(text + "\n")
    (run_root / "results.md").write_text(text + "\n")
    print(f"results written to {root / 'last-results.md'}")
    removed = remove_old_runs(runs, keep=run_root)
    print(f"outputs of this run kept in {run_root}; removed {removed} older run folder(s)")
    problems = [p for r in reports for p in r.problems]
    if problems:
        print(f"\n!!! {len(problems)} problem(s), MISMATCH or FAILED: see above", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
