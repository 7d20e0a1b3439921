"""--dry-run on `run` and `watch`: what would be new, changed, gone and retried, with nothing
processed and nothing written in OUT."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from conftest import make_tree, out_held, query_ledger, run_cli
from test_cli import FAILING_PROCESSOR  # fails on files named bad*
from crawlproc.dryrun import dry_run
from crawlproc.errors import IdentityMismatch
from crawlproc.run import RunOptions, run_job

TREE = {"a.txt": "one\n", "b/c.txt": "two\n", "b/d/e.log": "three\n", "gone.txt": "g\n", "keep.txt": "k\n"}


def crawl(data: Path, out: Path, *args: str):
    return run_cli("run", str(data), "-o", str(out), "--no-progress", "-w", "1", *args)


def ok(result) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr


def counts_line(stdout: str) -> dict[str, int]:
    """The counts of the dry run's summary line."""
    line = next(line for line in stdout.splitlines() if line.startswith("dry run"))
    found = {kind: int(n) for n, kind in re.findall(r"(\d+) (new|changed|retried|gone)", line)}
    found["excluded"] = int(re.search(r"(\d+) no longer selected", line).group(1))
    return found


def listed(stdout: str) -> dict[str, list[str]]:
    """The -v lines: change -> paths."""
    paths: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(new|changed|retried|gone|excluded) +(.+)", line)
        if match:
            paths.setdefault(match.group(1), []).append(match.group(2))
    return paths


def out_state(out: Path) -> tuple[list[str], list[tuple]]:
    """OUT's entries (but SQLite's -wal and -shm, which a read may add) and its tasks."""
    entries = sorted(str(p.relative_to(out)) for p in out.rglob("*") if not p.name.endswith(("-wal", "-shm")))
    return entries, query_ledger(out, "SELECT * FROM tasks ORDER BY id")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", TREE)


@pytest.fixture
def failing(tmp_path: Path) -> str:
    (tmp_path / "failing.py").write_text(FAILING_PROCESSOR)
    return f"{tmp_path / 'failing.py'}:picky"


def test_dry_run_on_a_new_out_counts_every_file_and_creates_nothing(data, tmp_path):
    out = tmp_path / "out"
    result = crawl(data, out, "--dry-run", "-v")
    ok(result)
    assert counts_line(result.stdout) == {"new": 5, "changed": 0, "retried": 0, "gone": 0, "excluded": 0}
    assert listed(result.stdout) == {"new": sorted(TREE)}
    assert not out.exists()


def test_dry_run_says_what_the_run_then_does_and_writes_nothing(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out))
    (out / "lock").unlink()  # a dry run must not leave one behind
    (data / "a.txt").write_text("one more\n")
    (data / "gone.txt").unlink()
    make_tree(data, {"new/n.txt": "n\n"})
    before = out_state(out)
    ledger_bytes = (out / "ledger.db").read_bytes()
    result = crawl(data, out, "--exclude", "*.log", "--dry-run", "-v")
    ok(result)
    assert counts_line(result.stdout) == {"new": 1, "changed": 1, "retried": 0, "gone": 1, "excluded": 1}
    assert listed(result.stdout) == {"new": ["new/n.txt"], "changed": ["a.txt"], "gone": ["gone.txt"],
                                     "excluded": ["b/d/e.log"]}
    assert out_state(out) == before and (out / "ledger.db").read_bytes() == ledger_bytes
    assert not (out / "lock").exists()
    without_v = crawl(data, out, "--exclude", "*.log", "--dry-run")
    ok(without_v)
    assert listed(without_v.stdout) == {} and counts_line(without_v.stdout) == counts_line(result.stdout)
    # The run does what the dry run said.
    ran = crawl(data, out, "--exclude", "*.log")
    ok(ran)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings"]["tasks_done_this_run"] == 2 and summary["counts"]["gone"] == 2
    after = crawl(data, out, "--exclude", "*.log", "--dry-run")
    assert counts_line(after.stdout) == {"new": 0, "changed": 0, "retried": 0, "gone": 0, "excluded": 0}


def test_retried_covers_pending_running_and_with_retry_failed_failed_tasks(tmp_path, failing):
    data = make_tree(tmp_path / "data", {"bad1.txt": "1\n", "bad2.txt": "2\n", "fine.txt": "f\n",
                                         "later.txt": "l\n", "stopped.txt": "s\n"})
    out = tmp_path / "out"
    assert crawl(data, out, "-p", failing, "--retries", "0").returncode == 1
    plain = crawl(data, out, "-p", failing, "--dry-run", "-v")
    ok(plain)
    assert counts_line(plain.stdout)["retried"] == 0
    assert counts_line(crawl(data, out, "-p", failing, "--dry-run", "--retry-failed").stdout)["retried"] == 2
    # What an interrupted run leaves: a task waiting for a retry, one still marked running.
    conn = sqlite3.connect(out / "ledger.db")
    conn.execute("UPDATE tasks SET state = 'pending', attempts = 1 WHERE relpath = 'later.txt'")
    conn.execute("UPDATE tasks SET state = 'running' WHERE relpath = 'stopped.txt'")
    conn.commit()
    conn.close()
    result = crawl(data, out, "-p", failing, "--dry-run", "-v")
    ok(result)
    assert listed(result.stdout) == {"retried": ["later.txt", "stopped.txt"]}
    help_text = " ".join(run_cli("run", "--help").stdout.split())
    assert "Retried: unchanged files a run would process again: pending tasks" in help_text


def test_dry_run_refuses_what_a_run_refuses(data, tmp_path, failing):
    out = tmp_path / "out"
    ok(crawl(data, out))
    refused = crawl(data, out, "-p", failing)
    assert refused.returncode == 2
    dry = crawl(data, out, "-p", failing, "--dry-run")
    # The same refusal; its runnable ways out repeat the command as given, so they keep --dry-run.
    assert dry.returncode == 2 and dry.stdout == ""
    assert dry.stderr.replace(" --dry-run", "") == refused.stderr
    reprocess = crawl(data, out, "-p", failing, "--dry-run", "--reprocess")
    ok(reprocess)
    assert counts_line(reprocess.stdout)["retried"] == len(TREE)
    same = crawl(data, data, "--dry-run")
    assert same.returncode == 2 and "is DATA_DIR" in same.stderr


def test_dry_run_while_another_crawlproc_holds_out_exits_3(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out))
    with out_held(out):
        result = crawl(data, out, "--dry-run")
    assert result.returncode == 3 and f"pid {os.getpid()}" in result.stderr
    assert "ask again once that one has ended" in result.stderr  # it said it waited, and did not


def test_watch_dry_run_tells_the_catch_up_and_exits(data, tmp_path):
    make_tree(data, {"part.tmp": "being written"})  # watch waits for its final name
    out = tmp_path / "out"
    result = run_cli("watch", str(data), "-o", str(out), "--no-progress", "--dry-run", "-v", timeout=60)
    ok(result)
    assert listed(result.stdout) == {"new": sorted(TREE)}
    assert not out.exists()


@pytest.mark.usefixtures("lister")
def test_dry_run_in_process_matches_the_scan_that_follows(tmp_path):
    files = {f"f{i}/x{j}.txt": f"{i} {j}\n" for i in range(6) for j in range(3)}
    data = make_tree(tmp_path / "data", files)
    out = tmp_path / "out"
    options = RunOptions(data_dir=data, out=out, workers=1)
    assert run_job(options).exit_code == 0
    (data / "f1" / "x0.txt").write_text("changed, longer\n")
    (data / "f2" / "x1.txt").unlink()
    make_tree(data, {"f3/new.txt": "new\n", "f9/deep/n.txt": "n\n"})
    preview = dry_run(options, with_paths=True)
    assert preview.counts == {"new": 2, "changed": 1, "retried": 0, "gone": 1, "excluded": 0}
    assert preview.paths == {"new": ["f3/new.txt", "f9/deep/n.txt"], "changed": ["f1/x0.txt"], "retried": [],
                             "gone": ["f2/x1.txt"], "excluded": []}
    assert run_job(options).pool.done == 3
    assert dry_run(options).counts == dict.fromkeys(preview.counts, 0)
    with pytest.raises(IdentityMismatch):
        dry_run(RunOptions(data_dir=data, out=out, processor="sha256"))
