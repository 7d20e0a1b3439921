"""Generated histories: Hypothesis changes the tree and runs, kills and interrupts crawlproc.

    Histories (a RuleBasedStateMachine)
      tree rules:  create, append, rewrite, truncate, delete, rename a file or a folder, delete a
                   folder, add an empty file, a non-UTF-8 name, a poison file (crash or hang)
      run rules:   run to the end · SIGKILL the coordinator (or its process group) during the
                   scan, mid-batch or during the merge · SIGKILL a worker · SIGINT
      after every run that ends by itself, and once more at the end of each history:
        merged.jsonl byte-identical to a clean run of the tree as it is now (poison files
        excluded from it: they must be failed, with the reason), PRAGMA integrity_check ok,
        every file of the tree has its live task and no vanished file a live one,
        no temp file, no result file that no done task refers to, no process left

Every kill moment is chosen by Hypothesis (a phase and a delay), so an example
replays the same history; every wait has a deadline. CI runs a few examples
(CRAWLPROC_HISTORY_EXAMPLES, 8 by default); `scripts/torture --hypothesis
--examples N` runs long searches. Histories a search found are kept as plain
tests at the bottom.
"""

from __future__ import annotations

import os
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
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from conftest import REPO

PROCESSOR = f"{REPO / 'tests' / 'history_processors.py'}:history"
HISTORY_EXAMPLES = int(os.environ.get("CRAWLPROC_HISTORY_EXAMPLES", "8"))
STEPS = 12
RUN_TIMEOUT = 120.0  # no run of a history's tiny tree comes near it
PHASE_TIMEOUT = 30.0  # waiting for a run to reach the phase a kill is meant for
EXIT_TIMEOUT = 20.0  # a dead coordinator's processes must be gone by then
HANG_TIMEOUT = "1.5"  # --timeout: a poison-hang file is killed after it
POISON_REASONS = {"poison-crash": "worker killed by SIGSEGV", "poison-hang": "timed out after 1.5s"}
FOLDERS = (b"", b"a/", b"a/b/", b"c/")
ENV = {"PYTHONUNBUFFERED": "1", "HISTORY_DELAY": "0.02", "HISTORY_REDUCE_DELAY": "0.3"}
OPTIONS = ("-w", "2", "--retries", "1", "--retry-delay", "0.05", "--timeout", HANG_TIMEOUT, "--no-progress",
           "-p", PROCESSOR)

TALLY: Counter = Counter()  # what the histories did, printed at the end (scripts/torture --hypothesis)

lines = st.lists(st.sampled_from(["alpha", "beta gamma", "", "δέλτα", "x" * 40]), max_size=6)
contents = lines.map(lambda ls: "".join(f"{line}\n" for line in ls).encode())


# -- what a run leaves behind ------------------------------------------------------------------

def crawl(data: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """`crawlproc run` in a session of its own, so every process it starts can be found."""
    return subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), *OPTIONS,
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **ENV, **(env or {})}, start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.communicate(timeout=30)
        pytest.fail(f"crawlproc run did not end within {RUN_TIMEOUT}s")
    return proc.returncode, err.decode(errors="replace")


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return found


def kill_session(sid: int) -> None:
    for proc in session_processes(sid):
        try:
            proc.kill()
        except psutil.Error:
            pass


def assert_session_ends(sid: int) -> None:
    """Every process a run started exits by itself (workers of a dead coordinator within a second)."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    while True:
        left = session_processes(sid)
        if not left:
            return
        if time.monotonic() > deadline:
            described = [f"{p.pid} {' '.join(p.cmdline())[:100]}" for p in left]
            kill_session(sid)
            pytest.fail(f"processes of run {sid} outlived it by {EXIT_TIMEOUT}s: {described}")
        time.sleep(0.02)


def ledger_rows(out: Path, sql: str, params: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{out / 'ledger.db'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def reached(proc: subprocess.Popen, test, deadline: float) -> bool:
    """Poll `test()` until true (True) or until the run ends by itself or the deadline (False)."""
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if test():
                return True
        except (sqlite3.Error, OSError):
            pass  # the ledger is not made yet
        time.sleep(0.002)
    return False


def tasks_running(out: Path, pid: int) -> bool:
    """Tasks run for this run. A killed run leaves its tasks 'running' in the ledger until the
    next one starts: only once this run has its row (recorded after it requeued them) do the
    running rows tell of its own work; before that, Python may not even have started."""
    if not ledger_rows(out, "SELECT 1 FROM runs WHERE pid = ? LIMIT 1", (pid,)):
        return False
    return bool(ledger_rows(out, "SELECT 1 FROM tasks WHERE state = 'running' LIMIT 1"))


def merging(out: Path, since: float) -> bool:
    """The merge's temp file, written by this run (a killed run's may be left until it starts)."""
    return any(name.startswith(".merged.") and (out / name).stat().st_mtime >= since for name in os.listdir(out))


def workers_of(pid: int) -> list[psutil.Process]:
    """The run's workers: children of its forkserver, itself a child of the coordinator."""
    try:
        servers = [p for p in psutil.Process(pid).children() if "forkserver" in " ".join(p.cmdline())]
        return [w for server in servers for w in server.children()]
    except psutil.Error:
        return []


# -- the state machine ----------------------------------------------------------------------------

class Histories(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="crawlproc-history-"))
        self.data = self.root / "data"
        self.data.mkdir()
        self.out = self.root / "out"
        self.files: dict[bytes, bytes] = {}  # the tree: relpath -> content
        self.names = 0
        self.mtime_ns = 1_600_000_000 * 10**9  # every write gets a later mtime than any before
        self.references: dict[frozenset, bytes] = {}  # tree -> a clean run's merged.jsonl
        self.runs = 0
        TALLY["histories"] += 1

    def teardown(self) -> None:
        try:
            if self.runs or self.files:
                self._run_to_the_end()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the tree ----------------------------------------------------------------------------
    def _new_name(self, folder: bytes, stem: bytes = b"f") -> bytes:
        self.names += 1
        return folder + stem + b"%d.txt" % self.names

    def _write(self, relpath: bytes, content: bytes, mode: str = "wb") -> None:
        path = self.data / os.fsdecode(relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode) as f:
            f.write(content)
        self.files[relpath] = self.files.get(relpath, b"") + content if mode == "ab" else content
        self._touch(relpath)

    def _touch(self, relpath: bytes) -> None:
        # Change is seen by size or mtime; two writes in one clock tick could share an mtime.
        self.mtime_ns += 10**9
        os.utime(self.data / os.fsdecode(relpath), ns=(self.mtime_ns, self.mtime_ns))

    def _folders(self) -> list[bytes]:
        return sorted({relpath[:relpath.rfind(b"/") + 1] for relpath in self.files} - {b""})

    def _plain_files(self) -> list[bytes]:
        return sorted(r for r in self.files if not os.path.basename(r).startswith(b"poison-"))

    @rule(folder=st.sampled_from(FOLDERS), content=contents)
    def create(self, folder, content):
        self._write(self._new_name(folder), content)

    @rule(folder=st.sampled_from(FOLDERS))
    def add_empty(self, folder):
        self._write(self._new_name(folder, b"empty"), b"")

    @rule(folder=st.sampled_from(FOLDERS), content=contents)
    def add_non_utf8_name(self, folder, content):
        self._write(self._new_name(folder, b"n\xff\xfe"), content)

    @precondition(lambda self: not any(b"poison-" in r for r in self.files))
    @rule(folder=st.sampled_from(FOLDERS), kind=st.sampled_from([b"poison-crash", b"poison-hang"]))
    def add_poison(self, folder, kind):
        self._write(self._new_name(folder, kind + b"-"), b"poison\n")

    @precondition(lambda self: self._plain_files())
    @rule(data=st.data(), content=contents)
    def append(self, data, content):
        self._write(data.draw(st.sampled_from(self._plain_files())), content or b"more\n", "ab")

    @precondition(lambda self: self._plain_files())
    @rule(data=st.data(), content=contents)
    def rewrite(self, data, content):
        self._write(data.draw(st.sampled_from(self._plain_files())), content)

    @precondition(lambda self: self._plain_files())
    @rule(data=st.data())
    def truncate(self, data):
        relpath = data.draw(st.sampled_from(self._plain_files()))
        size = data.draw(st.integers(0, len(self.files[relpath])))
        os.truncate(self.data / os.fsdecode(relpath), size)
        self.files[relpath] = self.files[relpath][:size]
        self._touch(relpath)

    @precondition(lambda self: self.files)
    @rule(data=st.data())
    def delete(self, data):
        relpath = data.draw(st.sampled_from(sorted(self.files)))
        os.unlink(self.data / os.fsdecode(relpath))
        del self.files[relpath]

    @precondition(lambda self: self._plain_files())
    @rule(data=st.data(), folder=st.sampled_from(FOLDERS))
    def rename_file(self, data, folder):
        relpath = data.draw(st.sampled_from(self._plain_files()))
        new = self._new_name(folder, b"moved")
        (self.data / os.fsdecode(new)).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.data / os.fsdecode(relpath), self.data / os.fsdecode(new))
        self.files[new] = self.files.pop(relpath)

    @precondition(lambda self: self._folders())
    @rule(data=st.data())
    def rename_folder(self, data):
        folder = data.draw(st.sampled_from(self._folders()))
        self.names += 1
        new = b"r%d/" % self.names
        os.rename(self.data / os.fsdecode(folder.rstrip(b"/")), self.data / os.fsdecode(new.rstrip(b"/")))
        for relpath in [r for r in self.files if r.startswith(folder)]:
            self.files[new + relpath[len(folder):]] = self.files.pop(relpath)

    @precondition(lambda self: self._folders())
    @rule(data=st.data())
    def delete_folder(self, data):
        folder = data.draw(st.sampled_from(self._folders()))
        shutil.rmtree(self.data / os.fsdecode(folder.rstrip(b"/")))
        for relpath in [r for r in self.files if r.startswith(folder)]:
            del self.files[relpath]

    # -- runs --------------------------------------------------------------------------------------
    @rule()
    def run_to_the_end(self):
        self._run_to_the_end()

    # SIGKILL of the coordinator (or of its whole process group), `delay_ms` after the run reaches
    # a phase: its start (the lock, the ledger, the scan), a task running, the merge's temp file.
    @rule(delay_ms=st.integers(0, 60), group=st.booleans())
    def kill_the_coordinator_early(self, delay_ms, group):
        self._kill_the_coordinator("start", lambda proc: True, delay_ms, group)

    @rule(delay_ms=st.integers(0, 60), group=st.booleans())
    def kill_the_coordinator_mid_batch(self, delay_ms, group):
        self._kill_the_coordinator("batch", lambda proc: tasks_running(self.out, proc.pid), delay_ms, group)

    @rule(delay_ms=st.integers(0, 60), group=st.booleans())
    def kill_the_coordinator_during_the_merge(self, delay_ms, group):
        started = time.time() - 0.02  # file times lag the clock by up to a tick
        self._kill_the_coordinator("merge", lambda proc: merging(self.out, started), delay_ms, group)

    def _kill_the_coordinator(self, phase: str, test, delay_ms: int, group: bool) -> None:
        proc = self._start()
        if reached(proc, lambda: test(proc), time.monotonic() + PHASE_TIMEOUT):
            time.sleep(delay_ms / 1000)
            try:
                os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            except ProcessLookupError:
                pass
        if self._ended(proc, killed=True) == -signal.SIGKILL:
            TALLY[f"coordinator killed ({phase}{', group' if group else ''})"] += 1

    @rule(delay_ms=st.integers(0, 60))
    def kill_a_worker(self, delay_ms):
        """SIGKILL one worker while tasks run; the run goes on and ends by itself."""
        proc = self._start()
        if reached(proc, lambda: tasks_running(self.out, proc.pid) and workers_of(proc.pid),
                   time.monotonic() + PHASE_TIMEOUT):
            time.sleep(delay_ms / 1000)
            for worker in workers_of(proc.pid)[:1]:
                try:
                    worker.kill()
                    TALLY["worker killed"] += 1
                except psutil.Error:
                    pass
        self._ended(proc)

    @rule(delay_ms=st.integers(0, 60))
    def interrupt(self, delay_ms):
        """SIGINT (Ctrl-C) while tasks run: in-flight tasks finish, exit 130, resumable."""
        proc = self._start()
        if reached(proc, lambda: tasks_running(self.out, proc.pid), time.monotonic() + PHASE_TIMEOUT):
            time.sleep(delay_ms / 1000)
            proc.send_signal(signal.SIGINT)
        self._ended(proc, interrupted=True)

    def _start(self) -> subprocess.Popen:
        self.runs += 1
        return crawl(self.data, self.out)

    def _run_to_the_end(self) -> None:
        self._ended(self._start())

    def _ended(self, proc: subprocess.Popen, *, killed: bool = False, interrupted: bool = False) -> int:
        """Wait for the run; check what it left; after a run that ended by itself, every invariant.
        Returns its exit code."""
        code, err = finish(proc)
        assert_session_ends(proc.pid)
        assert "Traceback" not in err, err
        if killed and code == -signal.SIGKILL:
            return code
        if interrupted and code == 130:
            assert "SIGINT received" in err, err
            TALLY["interrupted (SIGINT)"] += 1
            return code
        poisoned = any(os.path.basename(r).startswith(b"poison-") for r in self.files)
        assert code == (1 if poisoned else 0), f"exit {code}:\n{err}"
        self.check_after_run()
        TALLY["runs checked (ended by themselves)"] += 1
        TALLY["poison files failed with their reason"] += poisoned
        return code

    # -- the invariants ------------------------------------------------------------------------------
    def check_after_run(self) -> None:
        merged = (self.out / "merged.jsonl").read_bytes()
        assert merged == self._reference(), "merged.jsonl differs from a clean run of the tree"
        assert ledger_rows(self.out, "PRAGMA integrity_check") == [("ok",)]
        live = dict((bytes(p), (s, e)) for p, s, e in ledger_rows(
            self.out, "SELECT path_bytes, state, error FROM tasks WHERE state != 'gone'"))
        assert set(live) == set(self.files), (f"live tasks {sorted(set(live) - set(self.files))} are not in "
                                              f"the tree; files {sorted(set(self.files) - set(live))} have none")
        for relpath, (state, error) in live.items():
            name = os.path.basename(relpath).decode(errors="replace")
            reason = next((why for prefix, why in POISON_REASONS.items() if name.startswith(prefix)), None)
            if reason is None:
                assert state == "done", f"{relpath!r} is {state}: {error}"
            else:
                assert state == "failed" and error.startswith(reason), f"{relpath!r} is {state}: {error}"
        temps = [p.name for p in self.out.rglob(".*") if p.name.endswith(".tmp")]
        assert not temps, f"temp files left: {temps}"
        referenced = {b for (b,) in ledger_rows(self.out, "SELECT DISTINCT batch_id FROM tasks WHERE state = 'done'")}
        result_ids = {int(p.stem) for p in (self.out / "results").rglob("*.jsonl")}
        assert result_ids <= referenced, f"orphaned result files: {sorted(result_ids - referenced)}"

    def _reference(self) -> bytes:
        """merged.jsonl of a clean run of the tree as it is now (poison files, which must fail,
        left out), in an OUT of its own; cached by the tree's content."""
        key = frozenset(self.files.items())
        if key not in self.references:
            out = self.root / f"reference-{len(self.references)}"
            code, err = finish(crawl(self.data, out, "--exclude", "poison-*", env={"HISTORY_DELAY": "0",
                                                                                 "HISTORY_REDUCE_DELAY": "0"}))
            assert code == 0, err
            self.references[key] = (out / "merged.jsonl").read_bytes()
            shutil.rmtree(out)
        return self.references[key]


def history_settings(examples: int) -> settings:
    """CI replays the same few examples (derandomized); a long search (torture) explores."""
    return settings(max_examples=examples, stateful_step_count=STEPS, deadline=None,
                    derandomize="CRAWLPROC_HISTORY_EXAMPLES" not in os.environ,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def test_generated_histories():
    TALLY.clear()
    try:
        run_state_machine_as_test(Histories, settings=history_settings(HISTORY_EXAMPLES))
    finally:
        print("\nhistories:", ", ".join(f"{what}: {n}" for what, n in sorted(TALLY.items())))


# -- histories a search found, kept as plain tests --------------------------------------------------
# (none yet: a failing history is shrunk by Hypothesis, and its steps go here as a plain test that
# calls the rules above in order, with the drawn values written out)
