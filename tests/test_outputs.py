"""Outputs people pipe and read: `--output -`, one merged output per OUT, `--source-column`,
and `watch` publishing right after its catch-up."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tree, query_ledger, run_cli
from test_run import SLEEPY_PROCESSOR, write_processor
from test_watch import Watch, merged, proc_spec, state_of, wait_until  # noqa: F401 (a fixture)

WAIT_SECONDS = 30

NOISY_PROCESSOR = '''
from crawlproc import processor


@processor(version="1")
def noisy(task):
    print("noise from", task.relpath)  # a processor's stray print must not reach the records
    record = {"path": task.relpath, "pad": "x" * 1000}
    if task.relpath == "own.txt":
        record["src"] = "its own value"
    return record
'''


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {"a.txt": "one two\n", "b/c.txt": "x\n", "own.txt": "mine\n"})


@pytest.fixture
def noisy(tmp_path: Path) -> str:
    return f"{write_processor(tmp_path, 'noisy', NOISY_PROCESSOR)}:noisy"


def crawl(data: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress", *args, env=env)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_an_output_inside_data_dir_is_refused_as_out_is(data, tmp_path):
    """The merged output is never input: one in DATA_DIR was taken in by the next run, and
    processed again after every merge. In OUT (inside DATA_DIR or not) it is fine."""
    out = tmp_path / "out"
    result = crawl(data, out, "--output", str(data / "result.jsonl"))
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is inside DATA_DIR" in result.stderr and not out.exists() and not (data / "result.jsonl").exists()
    inner = data / "crawl-out"
    assert crawl(data, inner, "--output", str(inner / "all.jsonl")).returncode == 0
    assert crawl(data, out, "--output", str(tmp_path / "elsewhere.jsonl")).returncode == 0
    merged = run_cli("merge", "-o", str(out), "--output", str(data / "result.jsonl"))  # merge too
    assert merged.returncode == 2 and "is inside DATA_DIR" in merged.stderr and not (data / "result.jsonl").exists()


# -- --output - ------------------------------------------------------------------------------------

def test_output_dash_writes_only_the_records_to_stdout(data, tmp_path, noisy):
    out = tmp_path / "out"
    result = crawl(data, out, "-p", noisy, "--output", "-", "-v")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "-").exists() and not Path("-").exists()
    published = (out / "merged.jsonl").read_text()
    assert result.stdout == published  # nothing else: no log line, no summary, no processor print
    assert [r["path"] for r in records(result.stdout)] == ["a.txt", "b/c.txt", "own.txt"]
    assert "noise from a.txt" in result.stderr and "DEBUG" in result.stderr, result.stderr
    assert "3 done, 0 failed, 0 gone of 3 tasks" in result.stderr
    assert f"merged output: {out}/merged.jsonl (records on stdout)" in result.stderr
    again = crawl(data, out, "-p", noisy, "--output", "-")  # a no-op rerun writes them all again
    assert again.returncode == 0 and again.stdout == published
    assert "0 processed this run" in again.stderr


def test_output_dash_of_an_interrupted_run_writes_nothing_and_says_so(data, tmp_path):
    """Interrupted, a run writes no records to stdout (the rerun writes them all): its summary
    said "(records on stdout)" all the same."""
    release = tmp_path / "release"
    sleepy = f"{write_processor(tmp_path, 'sleepy', SLEEPY_PROCESSOR)}:sleepy"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-p", sleepy,
                             "-w", "2", "--no-progress", "--output", "-", "--param", f"release={release}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: query_ledger(out, "SELECT 1 FROM tasks WHERE state = 'running' LIMIT 1"),
                   "a task to be running", timeout=30)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        release.touch()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stdout == "" and "records on stdout" not in stderr, stderr


def test_output_dash_in_another_format_and_from_merge(data, tmp_path):
    out = tmp_path / "out"
    result = crawl(data, out, "--format", "csv", "--output", "-", "-q")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout == (out / "merged.csv").read_text()
    assert [row["path"] for row in csv.DictReader(io.StringIO(result.stdout))] == ["a.txt", "b/c.txt", "own.txt"]
    merge = run_cli("merge", "-o", str(out), "--output", "-")
    assert merge.returncode == 0, merge.stderr
    assert merge.stdout == (out / "merged.jsonl").read_text()
    assert len(records(merge.stdout)) == 3 and "merged 3 done tasks" in merge.stderr


def test_output_dash_to_a_reader_that_stops_early(tmp_path, noisy):
    data = make_tree(tmp_path / "data", {f"f{i:03d}.txt": f"{i}\n" for i in range(150)})  # > a pipe's 64 KiB
    proc = subprocess.Popen([sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(tmp_path / "out"),
                             "-p", noisy, "-w", "2", "--no-progress", "--output", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    try:
        stderr = proc.communicate(timeout=WAIT_SECONDS)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT_SECONDS)
    assert json.loads(first)["path"] == "f000.txt"
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr and "Exception" not in stderr, stderr


@pytest.mark.parametrize("args", [["run", "--no-merge"], ["watch"]])
def test_output_dash_refused_where_there_is_nothing_to_write_once(data, tmp_path, args):
    command, *extra = args
    result = run_cli(command, str(data), "-o", str(tmp_path / "out"), "--output", "-", *extra)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "--output -" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    if command == "watch":
        assert f"read {tmp_path / 'out' / 'merged.jsonl'}" in lines[0]


# -- one merged output per OUT --------------------------------------------------------------------

def test_a_merged_output_of_an_earlier_format_is_removed(data, tmp_path):
    out = tmp_path / "out"
    assert crawl(data, out, "-q").returncode == 0
    assert (out / "merged.jsonl").exists()
    result = crawl(data, out, "--format", "csv")
    assert result.returncode == 0, result.stderr
    assert (out / "merged.csv").exists() and not (out / "merged.jsonl").exists()
    assert f"removed {out / 'merged.jsonl'}: a merged output of an earlier --format" in result.stderr
    back = crawl(data, out, "-q")
    assert back.returncode == 0 and (out / "merged.jsonl").exists() and not (out / "merged.csv").exists()
    merged = run_cli("merge", "-o", str(out), "--format", "csv")  # the merge command says it as a run does
    line = next(line for line in merged.stderr.splitlines() if "an earlier --format" in line)
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO    removed .*", line), line


def test_an_output_elsewhere_leaves_every_merged_file_alone(data, tmp_path):
    out = tmp_path / "out"
    exported = tmp_path / "exports" / "merged.jsonl"
    exported.parent.mkdir()
    exported.write_text("a user's own file\n")
    assert crawl(data, out, "-q").returncode == 0
    result = crawl(data, out, "--format", "csv", "--output", str(tmp_path / "exports" / "all.csv"))
    assert result.returncode == 0, result.stderr
    assert (out / "merged.jsonl").exists() and "removed" not in result.stderr
    assert exported.read_text() == "a user's own file\n"


# -- --source-column ------------------------------------------------------------------------------

def test_source_column_puts_the_relpath_first_and_keeps_a_records_own_value(data, tmp_path, noisy):
    out = tmp_path / "out"
    result = crawl(data, out, "-p", noisy, "--source-column", "src", "-q")
    assert result.returncode == 0, result.stderr
    rows = records((out / "merged.jsonl").read_text())
    assert [list(r)[0] for r in rows] == ["src", "src", "src"]
    assert [r["src"] for r in rows] == ["a.txt", "b/c.txt", "its own value"]
    assert all("src_offset" not in r for r in rows)  # only with --chunk-size


def test_source_column_with_byte_ranges_adds_the_offset(tmp_path):
    big = "".join(f"line {i}\n" for i in range(400))
    data = make_tree(tmp_path / "data", {"big.log": big, "small.txt": "x\n"})
    out = tmp_path / "out"
    result = crawl(data, out, "-p", "sha256", "--chunk-size", "1024", "--format", "csv", "-q",
                   env={"CRAWLPROC_SOURCE_COLUMN": "from"})
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO((out / "merged.csv").read_text())))
    assert list(rows[0])[:2] == ["from", "from_offset"]
    assert [(r["from"], int(r["from_offset"])) for r in rows] == (
        [("big.log", offset) for offset in range(0, len(big), 1024)] + [("small.txt", 0)])


def test_source_column_is_part_of_the_runs_identity(data, tmp_path):
    out = tmp_path / "out"
    assert crawl(data, out, "--source-column", "src", "-q").returncode == 0
    for args in ([], ["--source-column", "other"]):
        refused = crawl(data, out, *args)
        assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert "added_columns" in refused.stderr and "src" in refused.stderr
    assert crawl(data, out, "--source-column", "src", "-q").returncode == 0


def test_an_empty_source_column_name_is_refused(data, tmp_path):
    result = crawl(data, tmp_path / "out", "--source-column", " ")
    assert result.returncode == 2 and "--source-column" in result.stderr
    assert len(result.stderr.splitlines()) == 1


# -- watch publishes after its catch-up -------------------------------------------------------------

def test_a_file_written_all_the_time_does_not_hold_the_first_merge_back(tmp_path, proc_spec):
    """The catch-up waits for the files it found still being written, but only until they
    could have settled: a log appended to all the time must not keep the first merge away."""
    import threading

    data = make_tree(tmp_path / "data", {f"f{i}.txt": f"file {i}\n" for i in range(5)})
    out = tmp_path / "out"
    stop = threading.Event()

    def append_forever() -> None:
        with open(data / "live.log", "a") as log:
            while not stop.wait(0.1):  # always younger than --settle 1
                log.write("one more line\n")
                log.flush()

    writer = threading.Thread(target=append_forever, daemon=True)
    writer.start()
    try:
        with Watch(data, out, proc_spec, "--merge-interval", "3600", settle="1") as w:
            wait_until(lambda: len(merged(out)) == 5, "the first merge, without the live log",
                       timeout=WAIT_SECONDS, watch=w)
            assert "live.log" not in merged(out)
            stop.set()
            assert w.stop() == 0
    finally:
        stop.set()
        writer.join(timeout=10)


def test_watch_publishes_right_after_the_catch_up(tmp_path, proc_spec):
    data = make_tree(tmp_path / "data", {f"d{i % 3}/f{i:02d}.txt": f"file {i}\n" for i in range(30)})
    out = tmp_path / "out"
    with Watch(data, out, proc_spec, "--merge-interval", "3600") as w:
        wait_until(lambda: len(merged(out)) == 30, "the catch-up to be merged", timeout=WAIT_SECONDS, watch=w)
        assert (out / "summary.json").exists()
        assert json.loads((out / "summary.json").read_text())["counts"]["done"] == 30
        (data / "late.txt").write_text("late\n")
        wait_until(lambda: state_of(out, "late.txt") == "done", "late.txt processed", watch=w)
        assert "late.txt" not in merged(out)  # next merge: after the interval, or at the stop
        assert w.stop() == 0
    assert "late.txt" in merged(out)


def test_the_lines_workers_print_at_once_are_never_torn(tmp_path, noisy):
    """With PYTHONUNBUFFERED (as CI and containers often set it) a print is several writes, and two
    workers printing at once mixed their lines: 'noise fromnoise from  own.txt'."""
    data = make_tree(tmp_path / "data", {f"f{i:03d}.txt": "x\n" for i in range(400)})
    result = crawl(data, tmp_path / "out", "-p", noisy, "--batch-size", "1", "--output", "-",
                   env={"PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    printed = [line for line in result.stderr.splitlines() if "noise" in line]
    assert sorted(printed) == [f"noise from f{i:03d}.txt" for i in range(400)], printed
