"""I/O faults, end to end: the ledger's disk fills up, a file cannot be read, results go missing.

The full-disk test mounts tmpfs file systems (root; skipped where mounting is
not allowed): OUT is a small one of its own, and OUT/results and OUT/logs are
mounts of a larger one inside it, so that filling OUT's file system mid-run
hits the ledger (SQLITE_FULL) and nothing else first. The read error comes
from tests/io_fault_processors.py, which makes `Task.open` fail with EIO for
files named eio*.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, make_tree, query_ledger, run_cli, wait_until

HISTORY = f"{REPO / 'tests' / 'history_processors.py'}:history"
READS = f"{REPO / 'tests' / 'io_fault_processors.py'}:reads"
RUN_TIMEOUT = 120
FILES = {f"d{i % 13}/f{i:04d}.txt": "word " * (i % 40) + "\n" for i in range(800)}


def mount_tmpfs(where: Path, size: str, mounted: list[Path]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, timeout=30)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {tried.stderr.decode().strip()}")
    mounted.append(where)


@pytest.fixture
def ledger_disk(tmp_path: Path):
    """OUT on a small file system of its own; its results/ and logs/ on a larger one."""
    out = tmp_path / "out"
    mounted: list[Path] = []
    try:
        mount_tmpfs(out, "16m", mounted)
        mount_tmpfs(out / "results", "64m", mounted)
        mount_tmpfs(out / "logs", "16m", mounted)
        yield out
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(folder: Path) -> Path:
    """Write a file that takes every byte left on `folder`'s file system."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9):
            block = bytes(size)
            try:
                while True:
                    f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    return filler


def clean_run(data: Path, out: Path, *args: str) -> bytes:
    result = run_cli("run", str(data), "-o", str(out), "-q", *args, timeout=RUN_TIMEOUT)
    assert result.returncode in (0, 1), result.stderr
    return (out / "merged.jsonl").read_bytes()


def test_ledger_disk_full_mid_run_stops_with_one_line_and_the_next_run_finishes(tmp_path, ledger_disk):
    data = make_tree(tmp_path / "data", FILES)
    out = ledger_disk
    env = {"PYTHONUNBUFFERED": "1", "HISTORY_DELAY": "0.01", "HISTORY_REDUCE_DELAY": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-w", "2",
                             "--no-progress", "-p", HISTORY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **env})
    try:
        wait_until(lambda: proc.poll() is not None or query_ledger(
            out, "SELECT count(*) >= 40 FROM tasks WHERE state = 'done'") == [(1,)], 60, "40 tasks done")
        assert proc.poll() is None, "the run ended before the disk was filled"
        filler = fill(out)
        _, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    told = [line for line in stderr.splitlines() if "full" in line]
    assert told == [stderr.strip().splitlines()[-1]], stderr
    assert "database or disk is full" in told[0] and str(out) in told[0]
    assert "free some space and run again" in told[0]

    filler.unlink()
    resumed = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress", "-p", HISTORY,
                      timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert query_ledger(out, "PRAGMA integrity_check") == [("ok",)]
    assert query_ledger(out, "SELECT state, count(*) FROM tasks GROUP BY state") == [("done", len(FILES))]
    assert (out / "merged.jsonl").read_bytes() == clean_run(data, tmp_path / "clean", "-p", HISTORY)


def test_a_file_that_cannot_be_read_fails_alone_with_the_reason(tmp_path):
    data = make_tree(tmp_path / "data", {**{f"ok{i}.txt": f"{i}\n" for i in range(20)}, "sub/eio-bad.txt": "x\n"})
    out = tmp_path / "out"
    first = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress", "-p", READS,
                    "--retry-delay", "0.05", timeout=RUN_TIMEOUT)
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    failures = json.loads(run_cli("failures", "-o", str(out), "--json", timeout=30).stdout)
    assert [(f["relpath"], f["attempts"]) for f in failures] == [("sub/eio-bad.txt", 3)]
    assert failures[0]["error"] == "OSError(5, 'Input/output error')", failures[0]
    assert f"OSError: [Errno 5] Input/output error: '{data / 'sub' / 'eio-bad.txt'}'" in failures[0]["traceback"]
    merged = [json.loads(line)["path"] for line in (out / "merged.jsonl").read_text().splitlines()]
    assert merged == sorted(f"ok{i}.txt" for i in range(20))
    again = run_cli("run", str(data), "-o", str(out), "--no-progress", "-p", READS, timeout=RUN_TIMEOUT)
    assert again.returncode == 1 and "1 failed" in again.stderr, again.stderr  # left failed, and said so


def test_result_files_truncated_or_removed_between_runs_are_redone(tmp_path):
    data = make_tree(tmp_path / "data", FILES)
    out = tmp_path / "out"
    first = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress", "--batch-size", "50",
                    timeout=RUN_TIMEOUT)
    assert first.returncode == 0, first.stderr
    merged = (out / "merged.jsonl").read_bytes()
    results = sorted((out / "results").rglob("*.jsonl"))
    assert len(results) >= 3
    results[0].unlink()
    with open(results[1], "r+b") as f:
        f.truncate(results[1].stat().st_size // 2)
    again = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress", timeout=RUN_TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert "missing or damaged" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["timings"]["tasks_done_this_run"] <= 100
    assert (out / "merged.jsonl").read_bytes() == merged
    assert query_ledger(out, "SELECT state, count(*) FROM tasks GROUP BY state") == [("done", len(FILES))]
