"""`crawlproc run` end to end: resume, changes, identity, failures, retries, locking, options."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tree, run_cli, wait_until
from crawlproc import __version__
from crawlproc.ledger import RUNNING_FLAG
from crawlproc.results import read_trailer
from crawlproc.run import RunOptions, run_job

TREE = {
    "a.txt": "one two\nthree\n",
    "b/c.txt": "x\n",
    "b/d/e.log": "hello world\nbye",
    "empty.txt": "",
    "z.csv": "k,v\n1,2\n",
}

WORDS_PROCESSOR = '''
from crawlproc import processor


@processor(version="{version}")
def words(task):
    """Words per file."""
    text = task.read_bytes().decode("utf-8", "replace")
    return {{"path": task.relpath, "words": len(text.split())}}


@words.reducer
def total(records):
    return {{"words": sum(r["words"] for r in records)}}
'''

PICKY_PROCESSOR = '''
import os
from crawlproc import processor


@processor(version="1")
def picky(task):
    """Raises on files named bad*, while PICKY_FAIL is set."""
    if os.path.basename(task.relpath).startswith("bad") and os.environ.get("PICKY_FAIL"):
        raise ValueError("picky cannot read " + task.relpath)
    return {"path": task.relpath, "size": len(task.read_bytes())}
'''

SLEEPY_PROCESSOR = '''
import os
import time
from crawlproc import processor


@processor(version="1")
def sleepy(task):
    """Waits until the file named by --param release exists (at most 30 s)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(task.params["release"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return {"path": task.relpath}
'''

WAIT_SECONDS = 30


# -- helpers ------------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", TREE)


def crawl(data: Path, out: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    return run_cli("run", str(data), "-o", str(out), "--no-progress", *args, env=env, cwd=cwd)


def ok(result) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr


def merged(out: Path, name: str = "merged.jsonl") -> bytes:
    return (out / name).read_bytes()


def records(out: Path, name: str = "merged.jsonl") -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text(encoding="utf-8").splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def tasks(out: Path) -> dict[str, dict]:
    conn = sqlite3.connect(f"file:{out / 'ledger.db'}?mode=ro", uri=True, timeout=5)
    try:
        cursor = conn.execute("SELECT * FROM tasks")
        names = [d[0] for d in cursor.description]
        return {row["relpath"]: row for row in (dict(zip(names, r)) for r in cursor)}
    finally:
        conn.close()


def status(out: Path) -> dict:
    result = run_cli("status", "-o", str(out), "--json", timeout=WAIT_SECONDS)
    ok(result)
    return json.loads(result.stdout)


def write_processor(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / "procs" / f"{name}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(source)
    return path


# -- resume ----------------------------------------------------------------------------------

def test_second_run_reruns_nothing_and_merged_is_identical(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "2"))
    first = merged(out)
    assert summary(out)["timings"]["tasks_done_this_run"] == len(TREE)
    result = crawl(data, out, "-w", "2")
    ok(result)
    assert summary(out)["timings"]["tasks_done_this_run"] == 0
    assert summary(out)["counts"]["done"] == len(TREE)
    assert merged(out) == first
    assert [r["path"] for r in records(out)] == sorted(TREE)


def test_rewritten_file_is_processed_again_and_its_record_updated(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    (data / "b" / "c.txt").write_text("now three words\nand two\n")
    ok(crawl(data, out, "-w", "1"))
    assert summary(out)["timings"]["tasks_done_this_run"] == 1
    by_path = {r["path"]: r for r in records(out)}
    assert by_path["b/c.txt"] == {"path": "b/c.txt", "lines": 2, "words": 5, "bytes": 24}
    assert len(by_path) == len(TREE)
    assert tasks(out)["b/c.txt"]["state"] == "done"


def test_new_mtime_same_size_is_processed_again(data, tmp_path):
    out = tmp_path / "out"
    assert run_job(RunOptions(data_dir=data, out=out, workers=1)).exit_code == 0
    first = merged(out)
    st = os.stat(data / "a.txt")
    os.utime(data / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    outcome = run_job(RunOptions(data_dir=data, out=out, workers=1))
    assert outcome.exit_code == 0
    assert outcome.summary["timings"]["tasks_done_this_run"] == 1
    assert tasks(out)["a.txt"]["mtime_ns"] == st.st_mtime_ns + 5_000_000_000
    assert merged(out) == first


def test_changed_chunked_file_is_planned_anew(tmp_path):
    data = make_tree(tmp_path / "data", {"big.txt": "".join(f"{i:09d}\n" for i in range(100)), "s.txt": "s\n"})
    out = tmp_path / "out"

    def big_records() -> list[dict]:
        return [r for r in records(out) if r["path"] == "big.txt"]

    run = lambda: run_job(RunOptions(data_dir=data, out=out, processor="sha256", workers=2, chunk_size=100))
    assert run().exit_code == 0
    assert [r["offset"] for r in big_records()] == list(range(0, 1000, 100))
    (data / "big.txt").write_text("y" * 249 + "\n")  # shrinks to 3 chunks
    outcome = run()
    assert outcome.exit_code == 0
    assert [(r["offset"], r["size"]) for r in big_records()] == [(0, 100), (100, 100), (200, 50)]
    assert outcome.summary["timings"]["tasks_done_this_run"] == 3
    (data / "big.txt").write_text("tiny\n")  # no longer chunked
    assert run().exit_code == 0
    assert big_records() == [{"path": "big.txt", "size": 5, "sha256": hashlib.sha256(b"tiny\n").hexdigest()}]
    assert [r["path"] for r in records(out)] == ["big.txt", "s.txt"]


def test_new_file_is_added_to_merged(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    (data / "b" / "new.txt").write_text("fresh words here\n")
    ok(crawl(data, out, "-w", "1"))
    assert summary(out)["timings"]["tasks_done_this_run"] == 1
    assert [r["path"] for r in records(out)] == sorted([*TREE, "b/new.txt"])
    assert summary(out)["reduced"]["files"] == len(TREE) + 1


def test_deleted_file_leaves_merged_and_is_gone(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    (data / "b" / "d" / "e.log").unlink()
    ok(crawl(data, out, "-w", "1"))
    assert "b/d/e.log" not in [r["path"] for r in records(out)]
    assert len(records(out)) == len(TREE) - 1
    counts = status(out)["counts"]
    assert counts["gone"] == 1 and counts["done"] == len(TREE) - 1
    assert tasks(out)["b/d/e.log"]["state"] == "gone"
    assert summary(out)["reduced"]["files"] == len(TREE) - 1
    # It comes back: processed again.
    (data / "b" / "d" / "e.log").write_text("back\n")
    ok(crawl(data, out, "-w", "1"))
    assert "b/d/e.log" in [r["path"] for r in records(out)]


def test_tasks_left_running_go_back_to_pending_and_get_done(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    first = merged(out)
    with sqlite3.connect(out / "ledger.db") as conn:  # what a coordinator killed mid-batch leaves:
        conn.execute("UPDATE tasks SET state = 'running' WHERE relpath IN ('a.txt', 'z.csv')")
        conn.execute("UPDATE meta SET value = '1' WHERE key = ?", (RUNNING_FLAG,))  # set with its claim
    result = crawl(data, out, "-w", "2")
    ok(result)
    assert summary(out)["counts"] == {"pending": 0, "running": 0, "done": len(TREE), "failed": 0, "gone": 0}
    assert summary(out)["timings"]["tasks_done_this_run"] == 2
    assert merged(out) == first


# -- identity ------------------------------------------------------------------------------------

def test_other_processor_on_same_out_is_refused_then_reprocess_accepts(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    first = merged(out)
    result = crawl(data, out, "-w", "1", "-p", "sha256")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "linecount" in lines[0] and "sha256" in lines[0] and "--reprocess" in lines[0]
    assert merged(out) == first  # nothing touched
    ok(crawl(data, out, "-w", "1", "-p", "sha256", "--reprocess"))
    assert all("sha256" in r for r in records(out))
    assert summary(out)["timings"]["tasks_done_this_run"] == len(TREE)
    assert summary(out)["processor"] == "sha256"
    ok(crawl(data, out, "-w", "1", "-p", "sha256"))  # the new identity sticks
    assert summary(out)["timings"]["tasks_done_this_run"] == 0


def test_other_params_are_refused(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    result = crawl(data, out, "-w", "1", "--param", "mode=fast")
    assert result.returncode == 2 and "mode" in result.stderr


def test_processor_file_with_reducer_and_version_bump(data, tmp_path):
    source = write_processor(tmp_path, "words", WORDS_PROCESSOR.format(version="1"))
    out = tmp_path / "out"
    # A relative path, from another working directory.
    ok(crawl(data, out, "-w", "2", "-p", "procs/words.py:words", cwd=tmp_path))
    assert [r["path"] for r in records(out)] == sorted(TREE)
    assert summary(out)["reduced"] == {"words": 9}
    assert summary(out)["processor_version"] == "1"
    ok(crawl(data, out, "-w", "1", "-p", f"{source}:words"))  # the same file, named absolutely
    assert summary(out)["timings"]["tasks_done_this_run"] == 0

    source.write_text(WORDS_PROCESSOR.format(version="2"))
    result = crawl(data, out, "-w", "1", "-p", f"{source}:words")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "processor_version: OUT has 1, this run 2" in result.stderr
    ok(crawl(data, out, "-w", "1", "-p", f"{source}:words", "--reprocess"))
    assert summary(out)["processor_version"] == "2"
    assert summary(out)["timings"]["tasks_done_this_run"] == len(TREE)


# -- failures and retries ------------------------------------------------------------------------

@pytest.fixture
def picky_data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "pdata", {"a.txt": "a\n", "bad.txt": "b\n", "c/d.txt": "d\n"})


@pytest.fixture
def picky(tmp_path: Path) -> str:
    return f"{write_processor(tmp_path, 'picky', PICKY_PROCESSOR)}:picky"


def test_raising_processor_fails_only_its_task(picky_data, picky, tmp_path):
    out = tmp_path / "out"
    result = crawl(picky_data, out, "-w", "2", "-p", picky, "--retries", "0", env={"PICKY_FAIL": "1"})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rows = tasks(out)
    assert {k: v["state"] for k, v in rows.items()} == {"a.txt": "done", "bad.txt": "failed", "c/d.txt": "done"}
    bad = rows["bad.txt"]
    assert bad["attempts"] == 1
    assert "ValueError" in bad["error"] and "picky cannot read bad.txt" in bad["error"]
    assert "Traceback" in bad["traceback"] and "raise ValueError" in bad["traceback"]
    assert [r["path"] for r in records(out)] == ["a.txt", "c/d.txt"]
    failures = run_cli("failures", "-o", str(out), "--json", timeout=WAIT_SECONDS)
    ok(failures)
    listed = json.loads(failures.stdout)
    assert [(f["relpath"], f["offset"], f["attempts"]) for f in listed] == [("bad.txt", 0, 1)]
    assert "picky cannot read" in listed[0]["error"] and "Traceback" in listed[0]["traceback"]
    assert summary(out)["counts"]["failed"] == 1
    # The log names the process and the task on each line about it.
    log_lines = [line for line in (out / "logs" / "crawlproc.log").read_text().splitlines() if "bad.txt" in line]
    assert log_lines
    assert all(re.search(rf"pid=\d+ task={bad['id']}\b", line) for line in log_lines), log_lines


def test_default_retries_make_three_attempts(picky_data, picky, tmp_path):
    out = tmp_path / "out"
    result = crawl(picky_data, out, "-w", "1", "-p", picky, "--retry-delay", "0", env={"PICKY_FAIL": "1"})
    assert result.returncode == 1, result.stderr
    assert (tasks(out)["bad.txt"]["state"], tasks(out)["bad.txt"]["attempts"]) == ("failed", 3)
    assert tasks(out)["a.txt"]["attempts"] == 1


def test_retries_option_counts_attempts(picky_data, picky, tmp_path):
    out = tmp_path / "out"
    result = crawl(picky_data, out, "-w", "1", "-p", picky, "--retries", "4", "--retry-delay", "0",
                   env={"PICKY_FAIL": "1"})
    assert result.returncode == 1
    assert (tasks(out)["bad.txt"]["state"], tasks(out)["bad.txt"]["attempts"]) == ("failed", 5)


def test_zero_retry_delay_retries_every_task_until_it_fails(tmp_path, picky):
    data = make_tree(tmp_path / "data", {"bad.txt": "b\n", "good.txt": "g\n"})
    out = tmp_path / "out"
    result = crawl(data, out, "-w", "1", "-p", picky, "--retries", "20", "--retry-delay", "0",
                   env={"PICKY_FAIL": "1"})
    assert result.returncode == 1, result.stderr
    rows = tasks(out)
    assert {k: (v["state"], v["attempts"]) for k, v in rows.items()} == \
        {"bad.txt": ("failed", 21), "good.txt": ("done", 1)}


def test_plain_rerun_leaves_failed_and_retry_failed_reruns_them(picky_data, picky, tmp_path):
    out = tmp_path / "out"
    assert crawl(picky_data, out, "-w", "1", "-p", picky, "--retries", "0",
                 env={"PICKY_FAIL": "1"}).returncode == 1
    first_error = tasks(out)["bad.txt"]["error"]
    # The cause is gone, but a plain rerun leaves the failed task alone and reports it.
    result = crawl(picky_data, out, "-w", "1", "-p", picky)
    assert result.returncode == 1
    assert tasks(out)["bad.txt"]["state"] == "failed" and tasks(out)["bad.txt"]["error"] == first_error
    assert summary(out)["timings"]["tasks_done_this_run"] == 0
    ok(crawl(picky_data, out, "-w", "1", "-p", picky, "--retry-failed"))
    assert tasks(out)["bad.txt"]["state"] == "done"
    assert tasks(out)["bad.txt"]["error"] is None
    assert summary(out)["timings"]["tasks_done_this_run"] == 1
    assert [r["path"] for r in records(out)] == ["a.txt", "bad.txt", "c/d.txt"]


# -- one coordinator per OUT ----------------------------------------------------------------------

def test_second_coordinator_on_same_out_exits_3_naming_the_pid(data, tmp_path):
    source = write_processor(tmp_path, "sleepy", SLEEPY_PROCESSOR)
    release = tmp_path / "release"
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "--no-progress", "-w", "1",
         "-p", f"{source}:sleepy", "--param", f"release={release}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / "lock"
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(first.pid), WAIT_SECONDS,
                   "the lock to hold a pid")
        wait_until(lambda: status(out)["counts"]["running"] >= 1, WAIT_SECONDS, "a task to be running")

        second = crawl(data, out, "-w", "1")
        assert second.returncode == 3, second.stderr
        assert str(first.pid) in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1 and "Traceback" not in second.stderr

        during = status(out)  # status works while the run is going
        assert during["running_pid"] == first.pid
        assert during["total"] == len(TREE)
        retry = run_cli("retry", "-o", str(out), "--all", timeout=WAIT_SECONDS)
        assert retry.returncode == 3 and str(first.pid) in retry.stderr
        assert "stop that one first" in retry.stderr  # and what to do: `explain` and a watch advise retry
    finally:
        release.touch()
        try:
            stdout, stderr = first.communicate(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            first.kill()
            first.communicate(timeout=WAIT_SECONDS)
            raise
    assert first.returncode == 0, stderr
    assert [r["path"] for r in records(out)] == sorted(TREE)
    assert status(out)["running_pid"] is None


# -- what gets scanned ---------------------------------------------------------------------------

def test_out_inside_data_dir_is_not_scanned(data):
    out = data / "crawl-out"
    ok(crawl(data, out, "-w", "1"))
    first = merged(out)
    assert [r["path"] for r in records(out)] == sorted(TREE)
    ok(crawl(data, out, "-w", "1"))
    assert summary(out)["timings"]["tasks_done_this_run"] == 0
    assert summary(out)["total"] == len(TREE)
    assert merged(out) == first


def test_non_utf8_file_name_is_processed_and_merged_is_valid_utf8(tmp_path):
    data = make_tree(tmp_path / "data", {"plain.txt": "plain\n"})
    raw = b"caf\xe9 \xff.txt"
    fd = os.open(os.fsencode(data) + b"/" + raw, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"latin one\n")
    os.close(fd)
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "2"))
    text = merged(out).decode("utf-8")  # strict: raises if not UTF-8
    paths = [json.loads(line)["path"] for line in text.splitlines()]
    assert os.fsdecode(raw) in paths and "plain.txt" in paths
    assert os.fsencode(paths[paths.index(os.fsdecode(raw))]) == raw
    assert summary(out)["counts"]["done"] == 2
    ok(crawl(data, out, "-w", "1"))  # and a rerun finds the same file unchanged
    assert summary(out)["timings"]["tasks_done_this_run"] == 0
    status_result = run_cli("status", "-o", str(out), timeout=WAIT_SECONDS)
    ok(status_result)


def test_a_run_that_finds_data_dir_emptied_warns_that_it_may_not_be_mounted(tmp_path):
    """An unmounted mount point looks like an emptied DATA_DIR: every task goes and the output is
    emptied (an inbox emptied by another process looks the same, so it is not refused), but the
    user hears why that may be wrong."""
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b/c.txt": "c\n"})
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    for entry in list(data.iterdir()):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    result = crawl(data, out, "-w", "1")
    ok(result)
    assert "WARNING DATA_DIR holds no file now: every file of the last scan (2) is gone" in result.stderr
    assert "check that it is mounted" in result.stderr
    again = crawl(data, out, "-w", "1")  # said once: the next scan finds nothing more gone
    assert again.returncode == 0 and "holds no file now" not in again.stderr


NAMES_THE_FILE_IN_ITS_ERROR = """
from crawlproc import processor

@processor(version="1")
def refuse(task):
    raise ValueError("cannot parse " + task.relpath)
"""


def test_an_error_naming_a_non_utf8_file_fails_that_task_alone(tmp_path):
    """A processor's error text may hold a non-UTF-8 name (a str with lone surrogates, which
    SQLite cannot store): the task fails with the name shown as failures shows names, the
    others are done, and the run ends (it crashed here, and so did every rerun)."""
    data = make_tree(tmp_path / "data", {"plain.txt": "plain\n"})
    (data / os.fsdecode(b"caf\xe9.txt")).write_bytes(b"latin one\n")
    (tmp_path / "naming.py").write_text(NAMES_THE_FILE_IN_ITS_ERROR)
    out = tmp_path / "out"
    result = crawl(data, out, "-w", "1", "-p", f"{tmp_path / 'naming.py'}:refuse", "--retries", "0")
    assert result.returncode == 1, result.stderr  # finished, some tasks failed
    assert "internal error" not in result.stderr
    assert summary(out)["counts"] == {**summary(out)["counts"], "done": 0, "failed": 2, "running": 0}
    listed = run_cli("failures", "-o", str(out), "--json", timeout=WAIT_SECONDS)
    failures = json.loads(listed.stdout)
    failed = {f["relpath"]: f for f in failures}
    assert failed.keys() == {"caf\\xe9.txt", "plain.txt"}, failed.keys()
    assert failed["caf\\xe9.txt"]["error"] == "ValueError('cannot parse caf\\udce9.txt')"  # a repr, as every error
    assert "ValueError: cannot parse caf\\xe9.txt" in failed["caf\\xe9.txt"]["traceback"]


@pytest.mark.parametrize("args,expected", [
    (["--include", "*.txt"], ["a.txt", "b/c.txt", "empty.txt"]),
    (["--exclude", "b", "--exclude", "*.csv"], ["a.txt", "empty.txt"]),
    (["--include", "*.txt", "--include", "*.log", "--exclude", "b/d/*"], ["a.txt", "b/c.txt", "empty.txt"]),
])
def test_include_and_exclude(data, tmp_path, args, expected):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1", *args))
    assert [r["path"] for r in records(out)] == expected
    assert summary(out)["total"] == len(expected)


def test_empty_data_dir_is_a_clean_run(tmp_path):
    (tmp_path / "data").mkdir()
    out = tmp_path / "out"
    ok(crawl(tmp_path / "data", out, "-w", "2"))
    assert merged(out) == b""
    assert summary(out)["total"] == 0


# -- batches and determinism ---------------------------------------------------------------------

def _result_files(out: Path) -> list[Path]:
    return [p for p in (out / "results").rglob("*.jsonl") if not p.name.startswith(".")]


def test_batch_size_1_gives_one_result_file_per_task(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "2", "--batch-size", "1"))
    files = _result_files(out)
    assert len(files) == len(TREE)
    assert len({t["batch_id"] for t in tasks(out).values()}) == len(TREE)
    for f in files:  # one record, then the trailer that names its one task
        trailer = read_trailer(f)
        assert f.read_bytes()[:trailer.records_end].count(b"\n") == 1
        assert len(list(trailer.tasks())) == 1


def test_default_batches_group_small_files(tmp_path):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": f"{i}\n" for i in range(40)})
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    assert 1 <= len(_result_files(out)) < 40


@pytest.fixture
def wider_tree(tmp_path: Path) -> Path:
    files = {f"d{i % 4}/sub{i % 3}/f{i:03d}.txt": "word " * i + "\n" * (i % 5) for i in range(36)}
    files["empty"] = ""
    files["d1/\u00fcmlaut.txt"] = "\u00fc\n"
    return make_tree(tmp_path / "wide", files)


def test_merged_is_byte_identical_for_workers_and_batch_sizes(wider_tree, tmp_path):
    variants = [("-w", "1"), ("-w", "2"), ("-w", "2", "--batch-size", "1"), ("-w", "1", "--batch-size", "7")]
    outputs = []
    for i, args in enumerate(variants):
        out = tmp_path / f"out{i}"
        ok(crawl(wider_tree, out, *args))
        outputs.append((merged(out), summary(out)["reduced"]))
    assert all(o == outputs[0] for o in outputs[1:])
    assert outputs[0][1]["files"] == 38


# -- output options ---------------------------------------------------------------------------

def test_output_file(data, tmp_path):
    out = tmp_path / "out"
    target = tmp_path / "exports" / "all.jsonl"
    ok(crawl(data, out, "-w", "1", "--output", str(target)))
    assert [json.loads(line)["path"] for line in target.read_text().splitlines()] == sorted(TREE)
    assert not (out / "merged.jsonl").exists()
    assert Path(summary(out)["merged_output"]) == target


def test_no_merge_writes_no_merged_file(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1", "--no-merge"))
    assert not (out / "merged.jsonl").exists()
    assert status(out)["counts"]["done"] == len(TREE)
    assert _result_files(out)
    ok(run_cli("merge", "-o", str(out), timeout=WAIT_SECONDS))  # the finalizer alone, later
    assert [r["path"] for r in records(out)] == sorted(TREE)


def test_out_layout(data, tmp_path):
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1"))
    assert (out / "ledger.db").is_file() and (out / "summary.json").is_file()
    assert (out / "logs" / "crawlproc.log").is_file()
    for path in _result_files(out):
        assert path.parent.parent == out / "results"


# -- the module entry point ----------------------------------------------------------------------

def test_python_m_crawlproc_version():
    result = run_cli("--version", timeout=WAIT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_python_m_crawlproc_bad_data_dir_one_line(tmp_path):
    result = run_cli("run", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), timeout=WAIT_SECONDS)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(tmp_path / "nope") in result.stderr
    assert "Traceback" not in result.stderr


def test_each_recycled_worker_does_its_whole_task_budget(tmp_path):
    """A retiring worker gets its stop message after all its batches, not between them."""
    data = make_tree(tmp_path / "data", {f"f{i:03d}.txt": f"{i}\n" for i in range(100)})
    out = tmp_path / "out"
    ok(crawl(data, out, "-w", "1", "--max-tasks-per-child", "10", "--batch-size", "5"))
    db = sqlite3.connect(out / "ledger.db")
    per_worker = [n for (n,) in db.execute("SELECT count(*) FROM tasks GROUP BY worker_pid")]
    assert per_worker == [10] * 10


# -- library use -----------------------------------------------------------------------------------

def test_a_script_can_call_run_job_without_a_main_guard_or_logging_setup(data, tmp_path):
    # Workers start from crawlproc's own forkserver, which never imports the calling script.
    script = tmp_path / "job.py"
    out = tmp_path / "out"
    script.write_text(
        "from pathlib import Path\n"
        "from crawlproc.run import RunOptions, run_job\n"
        f"outcome = run_job(RunOptions(data_dir=Path({str(data)!r}), out=Path({str(out)!r}), workers=2))\n"
        "print('EXIT', outcome.exit_code)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("EXIT 0") == 1, result.stdout
    assert "Logging error" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert summary(out)["counts"]["done"] == len(TREE)
    assert "task=- |" in (out / "logs" / "crawlproc.log").read_text()


def test_nothing_is_cut_short_by_the_quick_exit(data, tmp_path):
    """The CLI ends with os._exit after the command: stdout through a pipe, the last log line
    and the exit code must all be there."""
    out = tmp_path / "out"
    result = crawl(data, out, "-w", "1", "-v")
    ok(result)
    assert "merged output:" in result.stderr and "finished with exit code 0" in result.stderr
    status = run_cli("status", "-o", str(out), "--json", env={"PYTHONUNBUFFERED": ""})  # a buffered pipe
    assert status.returncode == 0 and json.loads(status.stdout)["counts"]["done"] == len(TREE)
    last_line = (out / "logs" / "crawlproc.log").read_text().splitlines()[-1]
    assert "finished with exit code 0" in last_line
    refused = crawl(data, out, "-w", "1", "-p", "sha256")  # another processor: exit 2, one line
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
