"""Kill crawlproc at random moments, many times, then check that nothing was lost or doubled.

    build a seeded tree ─> clean reference run (own OUT, no kills)
      ─> loop: `crawlproc run` on OUT, SIGKILL single workers at random moments, then SIGKILL
         the coordinator (sometimes its whole process group, sometimes as soon as the merge's
         temp file appears); when a run finishes by itself before the quotas are met,
         `crawlproc retry --all` and go on (the same OUT, redone)
      ─> one final uninterrupted `run`
      ─> checks: merged.jsonl byte-identical to the clean run's, every file exactly once,
         every task done, PRAGMA integrity_check, no temp files, no result file that no done
         task refers to, no orphaned processes,
         no unexpected exit code (3 = the lock outlived its holder, 2 = the run gave up),
         no hang (a run that goes on HANG_SLACK seconds past its expected time)

With `--executor dask` every run uses a Dask LocalCluster (`--scheduler local:2` unless
given), and the worker kills hit Dask worker processes instead of crawlproc's own.
`--hypothesis --examples N` runs the generated histories of tests/test_histories.py instead.

Exit 0 only if every check passes. `scripts/torture` wraps this with the project's venv;
tests/test_crash.py runs a short version (300 files, a few kills).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PROCESSOR = f"{REPO / 'tests' / 'crash_processors.py'}:torture"
ORPHAN_GRACE = 5.0  # seconds a dead coordinator's processes get to exit by themselves
RUN_TIMEOUT = 600
HANG_SLACK = 30.0  # a tortured run still going this long after four times the clean run's time has hung
MERGE_TEMP_PREFIX = ".merged."  # the finalizer's temp file in OUT (see finalize.merge_results)
MAX_RUNS_PER_KILL = 20  # a torture that needs more runs than this per coordinator kill is stuck


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000, help="files in the generated tree (default 5000)")
    parser.add_argument("--coordinator-kills", type=int, default=50, help="SIGKILLs of the coordinator (default 50)")
    parser.add_argument("--worker-kills", type=int, default=200, help="SIGKILLs of single workers (default 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the tree and of the kill moments")
    parser.add_argument("--workers", type=int, default=2, help="-w of every run (default 2)")
    parser.add_argument("--max-tasks-per-child", type=int, default=50)
    parser.add_argument("--group-kill-share", type=float, default=1 / 3,
                        help="share of coordinator kills that kill its whole process group")
    parser.add_argument("--merge-kill-share", type=float, default=0.2,
                        help="share of coordinator kills that wait for the merge's temp file")
    parser.add_argument("--executor", choices=("local", "dask"), default="local")
    parser.add_argument("--scheduler", default=None, help="with --executor dask (default local:2)")
    parser.add_argument("--hypothesis", action="store_true",
                        help="run the generated histories (tests/test_histories.py) instead")
    parser.add_argument("--examples", type=int, default=200, help="with --hypothesis: examples to generate")
    parser.add_argument("--workdir", type=Path, help="where the tree and OUTs go (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per run")
    return parser.parse_args(argv)


# -- the tree --------------------------------------------------------------------------

def build_tree(root: Path, n: int, rng: random.Random) -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "eta", "θ", "iota", "kappa"]
    relpaths = []
    for i in range(n):
        depth = rng.randint(0, 3)
        parts = [f"d{rng.randint(0, 20):02d}" for _ in range(depth)] + [f"f{i:05d}.txt"]
        relpath = "/".join(parts)
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        kind = rng.random()
        if kind < 0.03:
            data = b""
        elif kind < 0.06:
            data = rng.randbytes(rng.randint(1, 3000))
        else:
            lines = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(rng.randint(1, 60))]
            data = ("\n".join(lines) + ("\n" if rng.random() < 0.8 else "")).encode()
        path.write_bytes(data)
        relpaths.append(relpath)
    return sorted(relpaths)


# -- processes ---------------------------------------------------------------------------

def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def family(pid: int) -> list[psutil.Process]:
    """Everything a coordinator started: forkserver, listing helpers, workers."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if _alive(p)]
    except psutil.NoSuchProcess:
        return []


def workers_of(pid: int) -> list[psutil.Process]:
    """Live workers of a run: the children of its forkserver (a child of the coordinator)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    for child in children:
        try:
            if "forkserver" in " ".join(child.cmdline()):
                return [w for w in child.children() if _alive(w)]
        except psutil.Error:
            continue
    return []


def dask_workers_of(pid: int) -> list[psutil.Process]:
    """Live Dask worker processes of a run's LocalCluster that run batches: children of the
    coordinator forked by its nannies, with a crawlproc forkserver of their own (listing helpers
    and the reducer's child have none). A kill while the cluster starts is another matter: the
    run then stops with "Nanny failed to start" (reported, not tortured here)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    found = []
    for child in children:
        try:
            if ("forkserver" not in " ".join(child.cmdline()) and child.num_threads() >= 3 and child.children()
                    and _alive(child)):
                found.append(child)
        except psutil.Error:
            continue
    return found


class Torture:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed + 1)
        self.work = work
        self.data = work / "data"
        self.out = work / "out"
        self.log = open(work / "runs.log", "a", encoding="utf-8")
        self.kills = Counter()  # coordinator, group, merge, worker
        self.hangs: list[str] = []
        self.runs = 0
        self.passes = 0  # runs that finished by themselves before the kill quotas were met
        self.failed_by_kills = 0  # tasks found failed after such runs (every attempt's worker killed)
        self.anomalies: list[str] = []
        self.orphans: list[str] = []
        self._watch: list[tuple[psutil.Process, float, str]] = []  # (process, deadline, what)

    # -- running crawlproc --------------------------------------------------------------
    def command(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "crawlproc", "run", str(self.data), "-o", str(out), "--no-progress",
                "-p", PROCESSOR, "-w", str(self.args.workers),
                "--max-tasks-per-child", str(self.args.max_tasks_per_child), *self.executor_args()]

    def executor_args(self) -> list[str]:
        if self.args.executor == "local":
            return []
        return ["--executor", "dask", "--scheduler", self.args.scheduler or "local:2"]

    def start(self, out: Path) -> subprocess.Popen:
        self.runs += 1
        self.started_at = time.monotonic()
        self.log.write(f"\n=== run {self.runs}\n")
        self.log.flush()
        return subprocess.Popen(self.command(out), stdout=self.log, stderr=self.log,
                                start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def run_clean(self, out: Path) -> tuple[int, float]:
        started = time.monotonic()
        proc = self.start(out)
        code = proc.wait(timeout=RUN_TIMEOUT)
        return code, time.monotonic() - started

    def crawl_cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "crawlproc", *args], capture_output=True, text=True,
                              timeout=120)

    # -- one run of the kill loop ---------------------------------------------------------
    def tortured_run(self, typical: float) -> None:
        left_c = max(0, self.args.coordinator_kills - self.kills["coordinator"])
        left_w = max(0, self.args.worker_kills - self.kills["worker"])
        kill_at = self.rng.uniform(0.0, typical * 1.15)  # from start-up to the merge
        n_worker_kills = math.ceil(left_w / max(1, left_c)) if left_w else 0
        worker_times = sorted(self.rng.uniform(0.0, kill_at) for _ in range(n_worker_kills))
        at_merge = left_c > 0 and self.rng.random() < self.args.merge_kill_share
        proc = self.start(self.out)
        started = time.monotonic()
        deadline = started + 4 * typical + HANG_SLACK
        for at in worker_times:
            if not self._sleep_until(proc, started + at):
                break
            self._kill_a_worker(proc)
        if at_merge:
            if self._wait_for_merge(proc, deadline):
                self._kill_coordinator(proc, at_merge=True)
                return
        elif left_c and self._sleep_until(proc, started + kill_at):
            self._kill_coordinator(proc)
            return
        code = self._wait_or_hang(proc, deadline)
        if code is None:
            return
        if code == 0 or (code == 1 and self._failed_only_by_kills()):
            # Finished before it was killed: redo everything and keep torturing the same OUT.
            # Exit 1 is fine when every failed task had its worker killed on each attempt: that
            # is the retry policy at work (a retried task is first in line, and the first batch
            # of a run is small, so an early kill often lands on it again).
            self.passes += 1
            retry = self.crawl_cli("retry", "--all", "-o", str(self.out))
            if retry.returncode != 0:
                self.anomalies.append(f"run {self.runs}: retry --all exited {retry.returncode}: {retry.stderr}")
        else:
            self.anomalies.append(f"run {self.runs}: exited {code} without being killed (see runs.log)")
        self._note(f"run {self.runs}: ended by itself with {code}")

    def _wait_for_merge(self, proc: subprocess.Popen, deadline: float) -> bool:
        """Poll OUT for the finalizer's temp file; True once it is there (the run still going)."""
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if any(name.startswith(MERGE_TEMP_PREFIX) for name in os.listdir(self.out)):
                    return True
            except FileNotFoundError:
                pass
            time.sleep(0.0005)
        return False

    def _wait_or_hang(self, proc: subprocess.Popen, deadline: float) -> int | None:
        """The run's exit code, or None when it went past `deadline` (a hang: killed, recorded)."""
        while proc.poll() is None:
            if time.monotonic() > deadline:
                self.hangs.append(f"run {self.runs}: still running {deadline - self.started_at:.0f}s after "
                                  "its start (see runs.log)")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return None
            self._check_orphans()
            time.sleep(0.01)
        return proc.returncode

    def _failed_only_by_kills(self) -> bool:
        conn = sqlite3.connect(f"file:{self.out / 'ledger.db'}?mode=ro", uri=True)
        try:
            errors = [row[0] or "" for row in conn.execute("SELECT error FROM tasks WHERE state = 'failed'")]
        finally:
            conn.close()
        self.failed_by_kills += len(errors)
        return bool(errors) and all(error.startswith("worker killed by SIGKILL") for error in errors)

    def _sleep_until(self, proc: subprocess.Popen, when: float) -> bool:
        """Wait until `when`; False if the run ended first. Watches orphans meanwhile."""
        while True:
            self._check_orphans()
            if proc.poll() is not None:
                return False
            left = when - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.01))

    def _kill_a_worker(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 1.0
        victims_of = dask_workers_of if self.args.executor == "dask" else workers_of
        while time.monotonic() < deadline and proc.poll() is None:
            candidates = victims_of(proc.pid)
            if candidates:
                victim = self.rng.choice(candidates)
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    continue
                self.kills["worker"] += 1
                self._note(f"run {self.runs}: killed worker {victim.pid}")
                return
            time.sleep(0.005)

    def _kill_coordinator(self, proc: subprocess.Popen, *, at_merge: bool = False) -> None:
        started = family(proc.pid)
        group = self.rng.random() < self.args.group_kill_share
        try:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        code = proc.wait(timeout=30)
        if code != -signal.SIGKILL:
            # It ended by itself just before the kill landed.
            self._note(f"run {self.runs}: ended with {code} as it was killed")
            if code not in (0, 1):
                self.anomalies.append(f"run {self.runs}: exited {code} (see runs.log)")
            return
        self.kills["coordinator"] += 1
        if group:
            self.kills["group"] += 1
        if at_merge:
            self.kills["merge"] += 1
        deadline = time.monotonic() + ORPHAN_GRACE
        self._watch += [(p, deadline, f"run {self.runs}") for p in started]
        self._note(f"run {self.runs}: killed the coordinator{' and its process group' if group else ''}"
                   f"{' during the merge' if at_merge else ''}"
                   f" ({len(started)} processes left to exit by themselves)")

    def _check_orphans(self, wait: bool = False) -> None:
        """A dead coordinator's processes must exit by themselves within ORPHAN_GRACE seconds."""
        still = []
        for proc, deadline, run in self._watch:
            if not _alive(proc):
                continue
            if time.monotonic() < deadline:
                still.append((proc, deadline, run))
                continue
            self.orphans.append(f"{run}: pid {proc.pid} ({' '.join(proc.cmdline())[:80]}) outlived its coordinator")
            try:
                proc.kill()
            except psutil.Error:
                pass
        self._watch = still
        if wait and self._watch:
            time.sleep(0.05)
            self._check_orphans(wait=True)

    def _note(self, text: str) -> None:
        self.log.write(f"--- {text}\n")
        self.log.flush()
        if self.args.verbose:
            print(text, flush=True)

    def quotas_met(self) -> bool:
        return (self.kills["coordinator"] >= self.args.coordinator_kills
                and self.kills["worker"] >= self.args.worker_kills)


# -- checks ------------------------------------------------------------------------------

def check(out: Path, relpaths: list[str], clean: bytes) -> tuple[dict, list[str]]:
    merged = (out / "merged.jsonl").read_bytes() if (out / "merged.jsonl").exists() else b""
    paths = Counter(json.loads(line)["path"] for line in merged.splitlines())
    expected = set(relpaths)
    conn = sqlite3.connect(f"file:{out / 'ledger.db'}?mode=ro", uri=True)
    try:
        states = Counter(dict(conn.execute("SELECT state, count(*) FROM tasks GROUP BY state")))
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        ledger_paths = Counter(r for (r,) in conn.execute("SELECT relpath FROM tasks WHERE state = 'done'"))
    finally:
        conn.close()
    temps = [str(p.relative_to(out)) for p in out.rglob(".*") if p.name.endswith(".tmp")]
    conn = sqlite3.connect(f"file:{out / 'ledger.db'}?mode=ro", uri=True)
    try:
        referenced = {b for (b,) in conn.execute("SELECT DISTINCT batch_id FROM tasks WHERE state = 'done'")}
    finally:
        conn.close()
    orphaned = sorted(str(p.relative_to(out)) for p in (out / "results").rglob("*.jsonl")
                      if not p.name.startswith(".") and int(p.stem) not in referenced)
    facts = {
        "identical": merged == clean,
        "records": sum(paths.values()),
        "lost": sorted(expected - set(paths)),
        "duplicated": sorted(p for p, n in paths.items() if n > 1),
        "unexpected": sorted(set(paths) - expected),
        "states": dict(states),
        "ledger_not_done": sorted(expected - set(ledger_paths)),
        "integrity": integrity,
        "temp_files": temps,
        "orphaned_results": orphaned,
    }
    problems = []
    if not facts["identical"]:
        problems.append("merged.jsonl differs from the clean run's")
    for key in ("lost", "duplicated", "unexpected", "ledger_not_done", "temp_files", "orphaned_results"):
        if facts[key]:
            problems.append(f"{key}: {len(facts[key])} (first: {facts[key][:5]})")
    if states.get("done", 0) != len(expected) or sum(states.values()) != len(expected):
        problems.append(f"ledger states are {dict(states)}, expected {len(expected)} done")
    if integrity != "ok":
        problems.append(f"PRAGMA integrity_check: {integrity}")
    return facts, problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hypothesis:
        return run_histories(args)
    began = time.monotonic()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="torture-", dir=args.workdir))
    else:
        work = Path(tempfile.mkdtemp(prefix="crawlproc-torture-"))
    torture = Torture(args, work)
    passed = False
    print(f"crawlproc torture: {args.files} files, seed {args.seed}, -w {args.workers}, "
          f"--max-tasks-per-child {args.max_tasks_per_child}, work folder {work}", flush=True)
    try:
        relpaths = build_tree(torture.data, args.files, random.Random(args.seed))
        code, typical = torture.run_clean(work / "clean")
        if code != 0:
            print(f"the clean reference run failed with exit code {code}; see {work / 'runs.log'}")
            return 1
        clean = (work / "clean" / "merged.jsonl").read_bytes()
        print(f"clean reference run: {typical:.2f}s", flush=True)
        while not torture.quotas_met():
            if torture.runs > MAX_RUNS_PER_KILL * (args.coordinator_kills + 1):
                torture.anomalies.append(f"{torture.runs} runs and the kill quotas are still not met")
                break
            torture.tortured_run(typical)
        torture._check_orphans(wait=True)
        final_started = time.monotonic()
        final_code, _ = torture.run_clean(torture.out)
        final_seconds = time.monotonic() - final_started
        facts, problems = check(torture.out, relpaths, clean)
        if final_code != 0:
            problems.insert(0, f"the final uninterrupted run exited {final_code}")
        problems += torture.anomalies + torture.orphans + torture.hangs
        kills = torture.kills
        print(f"runs: {torture.runs} ({torture.passes} finished by themselves and were redone with retry --all;"
              f" tasks failed by kills on every attempt, then retried: {torture.failed_by_kills})")
        print(f"coordinator kills: {kills['coordinator']} (whole process group: {kills['group']}, "
              f"during the merge: {kills['merge']})")
        print(f"{'Dask ' if args.executor == 'dask' else ''}worker kills: {kills['worker']}")
        print(f"unexpected exit codes: {len(torture.anomalies)}; orphaned processes: {len(torture.orphans)}; "
              f"hangs: {len(torture.hangs)}")
        print(f"final uninterrupted run: exit {final_code} in {final_seconds:.2f}s")
        print(f"merged.jsonl byte-identical to the clean run: {'yes' if facts['identical'] else 'no'}")
        print(f"files: {len(relpaths)}, records: {facts['records']}, lost: {len(facts['lost'])}, "
              f"duplicated: {len(facts['duplicated'])}")
        print(f"ledger: {facts['states']}; PRAGMA integrity_check: {facts['integrity']}")
        print(f"temp files left: {len(facts['temp_files'])}; orphaned result files: "
              f"{len(facts['orphaned_results'])}")
        print(f"duration: {time.monotonic() - began:.1f}s")
        if problems:
            print("FAILED:")
            for problem in problems:
                print(f"  - {problem}")
            print(f"logs: {work / 'runs.log'}")
            return 1
        print("all checks passed")
        passed = True
        return 0
    finally:
        torture.log.close()
        if passed and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_histories(args: argparse.Namespace) -> int:
    """--hypothesis: the state machine of tests/test_histories.py with `--examples` examples."""
    env = {**os.environ, "CRAWLPROC_HISTORY_EXAMPLES": str(args.examples)}
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
               str(REPO / "tests" / "test_histories.py"), "-k", "generated", f"--hypothesis-seed={args.seed}"]
    if args.verbose:
        command.append("--hypothesis-verbosity=verbose")
    return subprocess.call(command, env=env, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
