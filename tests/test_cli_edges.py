"""What people read from the CLI at its edges: option variables, hints they can run as printed,
plurals, JSON log lines, `status` after a crash, `retry` of an unknown path, `merge` with records missing.

A hint is tested by running it: the printed command is split as a shell would (shlex)
and run, with `crawlproc` standing for `python -m crawlproc`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from conftest import make_tree, query_ledger, run_cli, wait_until
from crawlproc.cli import cli
from test_run import SLEEPY_PROCESSOR, write_processor

WAIT_SECONDS = 30

FAILING_PROCESSOR = '''
from crawlproc import processor


@processor(version="1")
def picky(task):
    if task.relpath.rsplit("/", 1)[-1].startswith("bad"):
        raise ValueError(f"cannot handle {task.relpath}")
    return {"path": task.relpath}
'''

def invoke(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False, prog_name="crawlproc")


def one_line(result, code: int) -> str:
    """The only stderr line of a subprocess result that exited with `code`."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_hint(command: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a printed `crawlproc ...` hint exactly as a shell would split it."""
    argv = shlex.split(command)
    assert argv[0] == "crawlproc", command
    return run_cli(*argv[1:], "--no-progress", "-w", "2", cwd=cwd) if argv[1] == "run" else run_cli(*argv[1:])


def hint_after(text: str, marker: str) -> str:
    """The command printed after `marker` on one of the lines of `text`."""
    line = next(line for line in text.splitlines() if marker in line)
    return line.split(marker, 1)[1].strip().strip("`")


def processor_spec(tmp_path: Path, name: str, source: str) -> str:
    return f"{write_processor(tmp_path, name, source)}:{name}"


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {"a.txt": "one two\n", "b/c.txt": "x\n", "bad1.txt": "?\n"})


@pytest.fixture
def failed_out(tmp_path: Path, data: Path) -> Path:
    """An OUT (at tmp_path/'my out', a name that needs quoting) where bad1.txt failed."""
    out = tmp_path / "my out"
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    result = run_cli("run", str(data), "-o", str(out), "-p", picky, "-w", "1", "--retries", "0", "--no-progress")
    assert result.returncode == 1, result.stderr
    return out


def counts(out: Path) -> dict[str, int]:
    result = run_cli("status", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["counts"]


# -- --help and CRAWLPROC_* variables -------------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "watch"])
def test_help_names_the_variable_of_every_option(command):
    options = [p for p in cli.commands[command].params if isinstance(p, click.Option) and p.name != "help"]
    assert len(options) > 25
    text = " ".join(invoke(command, "--help").stdout.split())
    for option in options:
        long_name = next(opt for opt in option.opts if opt.startswith("--"))
        assert option.envvar == "CRAWLPROC_" + long_name[2:].replace("-", "_").upper(), long_name
        assert f"env var: {option.envvar}" in text, option.envvar


def test_a_bad_value_from_the_environment_names_the_variable(data, tmp_path):
    line = one_line(run_cli("run", str(data), "-o", str(tmp_path / "out"), env={"CRAWLPROC_WORKERS": "abc"}), 2)
    assert "from CRAWLPROC_WORKERS" in line and "'abc'" in line
    line = one_line(run_cli("run", str(data), "-o", str(tmp_path / "out"),
                            env={"CRAWLPROC_MAX_MEMORY_PER_CHILD": "lots"}), 2)
    assert "from CRAWLPROC_MAX_MEMORY_PER_CHILD" in line and "'lots'" in line
    assert not (tmp_path / "out").exists()


def test_a_bad_value_on_the_command_line_does_not_blame_a_variable(data, tmp_path):
    line = one_line(run_cli("run", str(data), "-o", str(tmp_path / "out"), "-w", "abc"), 2)
    assert "'abc'" in line and "CRAWLPROC_WORKERS" not in line


def test_verbose_from_the_environment(data, tmp_path):
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "-w", "1", "--no-progress",
                     env={"CRAWLPROC_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr
    assert "DEBUG" in result.stderr


# -- words -----------------------------------------------------------------------------------------

def test_one_file_one_task(tmp_path):
    data = make_tree(tmp_path / "data", {"only.txt": "x\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "1 done, 0 failed, 0 gone of 1 task\n" in result.stderr
    assert "1 processed this run" in result.stderr
    assert "1 tasks" not in result.stderr and "1 files" not in result.stderr
    retried = run_cli("retry", "-o", str(out), "--all")
    assert retried.returncode == 0 and retried.stderr.startswith("1 task back to pending;"), retried.stderr


def test_an_empty_failures_table_says_so(data, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-w", "1", "-q").returncode == 0
    result = run_cli("failures", "-o", str(out))
    assert result.returncode == 0 and result.stdout.strip() == "no failed tasks", result.stdout


def test_failures_table_title_counts_in_words(failed_out):
    result = run_cli("failures", "-o", str(failed_out))
    assert result.returncode == 0 and "1 failed task\n" in result.stdout and "bad1.txt" in result.stdout


# -- hints that run as printed ---------------------------------------------------------------------

def test_failed_run_hints_name_out_and_run_as_printed(failed_out, data, tmp_path):
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    result = run_cli("run", str(data), "-o", str(failed_out), "-p", picky, "-w", "1", "--no-progress")
    assert result.returncode == 1
    see = hint_after(result.stderr, "to see why: ")
    assert shlex.split(see) == ["crawlproc", "failures", "-o", str(failed_out)]
    assert "bad1.txt" in run_hint(see).stdout
    again = hint_after(result.stderr, "for the next run: ")
    assert run_hint(again).returncode == 0
    assert counts(failed_out)["pending"] == 1
    command = hint_after(run_cli("retry", "-o", str(failed_out), "--all", "a.txt").stderr, "to process it: ")
    assert shlex.split(command)[:5] == ["crawlproc", "run", str(data), "-o", str(failed_out)]
    assert run_hint(command).returncode == 1  # bad1.txt fails again, a.txt is done again
    assert counts(failed_out) == {"pending": 0, "running": 0, "done": 2, "failed": 1, "gone": 0}


def test_the_printed_run_command_keeps_the_runs_choice_of_files(tmp_path):
    """The command `retry` and `status` print carries the last run's --include, --exclude and
    --follow-symlinks: without them, running it as printed took in every file they left out."""
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "bad1.txt": "?\n", "notes.log": "n\n",
                                         **{f"many/f{i:02d}.txt": f"{i}\n" for i in range(12)}})
    (data / "link.txt").symlink_to(data / "a.txt")
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    out = tmp_path / "out"
    choice = ["--include", "*.txt", "--exclude", "*.log", "--exclude", "many/f0*", "--follow-symlinks"]
    first = run_cli("run", str(data), "-o", str(out), "-p", picky, "-w", "1", "--no-progress", *choice)
    assert first.returncode == 1, first.stderr  # bad1.txt
    taken = counts(out)
    command = hint_after(run_cli("retry", "-o", str(out), "--all", "bad1.txt").stderr, "to process it: ")
    assert shlex.split(command)[-len(choice):] == choice, command
    assert status_json(out)["run_command"] == command
    assert run_hint(command).returncode == 1  # bad1.txt fails again; no file comes in or goes
    assert counts(out) == taken == {"pending": 0, "running": 0, "done": 4, "failed": 1, "gone": 0}


def test_the_printed_command_after_a_watch_is_that_watch(tmp_path):
    """After a watch, status, retry and merge told the operator to carry on with `crawlproc run`:
    a one-shot run, not the service it was, with its --settle and its intervals."""
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    out = tmp_path / "out"
    how = ["--workers", "1", "--settle", "0.5", "--rescan-interval", "60.0", "--merge-interval", "5.0"]

    def watch(argv: list[str]) -> None:
        """Run `crawlproc ARGV` (a watch) until its tasks are done, then stop it as Ctrl-C does."""
        proc = subprocess.Popen([sys.executable, "-m", "crawlproc", *argv, "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: query_ledger(out, "SELECT count(*) FROM tasks WHERE state = 'pending'") == [(0,)]
                       and query_ledger(out, "SELECT count(*) FROM tasks WHERE state = 'done'") == [(1,)]
                       or proc.poll() is not None, 60, "the watch's catch-up")
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err

    watch(["watch", str(data), "-o", str(out), *how])
    command = status_json(out)["run_command"]
    assert shlex.split(command) == ["crawlproc", "watch", str(data), "-o", str(out), *how], command
    [(first_batch,)] = query_ledger(out, "SELECT batch_id FROM tasks")
    assert hint_after(run_cli("retry", "-o", str(out), "--all", "a.txt").stderr, "to process it: ") == command
    watch(shlex.split(command)[1:])  # accepted as printed: it processes a.txt again
    assert query_ledger(out, "SELECT batch_id FROM tasks") != [(first_batch,)]


def test_the_printed_run_command_keeps_how_the_run_ran(tmp_path):
    """It dropped --timeout, --format, --output, -w... (a task that hung, a CSV output replaced
    by a JSONL one), and gave --ok-exit-codes as a --param, which the command then refused."""
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b.txt": "zzz\n"})
    out, table = tmp_path / "out", tmp_path / "table.csv"
    how = ["--workers", "1", "--timeout", "60.0", "--retries", "0", "--max-failures", "50%", "--output", str(table),
           "--format", "csv"]
    first = run_cli("run", str(data), "-o", str(out), "--cmd", "grep -c zzz {}", "--ok-exit-codes", "0,1",
                    "--no-progress", "-q", *how)
    assert first.returncode == 0, first.stderr
    command = status_json(out)["run_command"]
    assert shlex.split(command) == ["crawlproc", "run", str(data), "-o", str(out), "--cmd", "grep -c zzz {}",
                                    "--ok-exit-codes", "0,1", *how], command
    again = run_hint(command)
    assert again.returncode == 0, again.stderr
    assert "0 processed this run" in again.stderr and table.exists() and not (out / "merged.jsonl").exists()
    plain = run_cli("run", str(data), "-o", str(out), "--cmd", "grep -c zzz {}", "--ok-exit-codes", "0,1")
    assert plain.returncode == 0, plain.stderr
    assert shlex.split(status_json(out)["run_command"])[-2:] == ["--ok-exit-codes", "0,1"]  # the defaults again
    relative = run_cli("run", str(data), "-o", str(out), "--cmd", "grep -c zzz {}", "--ok-exit-codes", "0,1",
                       "--output", "rel.csv", cwd=tmp_path)
    assert relative.returncode == 0, relative.stderr
    assert shlex.split(status_json(out)["run_command"])[-2:] == ["--output", str(tmp_path / "rel.csv")]


def test_each_option_the_carry_on_command_repeats_reads_back_as_it_was(tmp_path):
    """`--max-failures 1234567` came back as `1.23457e+06`, which the option refuses."""
    from crawlproc.options import CARRIED, RUN_OPTIONS, carried_args, check, checked

    values = checked({"workers": 7, "max_tasks_per_child": 10, "max_memory_per_child": "1.5GB",
                      "max_memory_per_task": "300MB", "timeout": 1e-07, "retries": 0, "retry_delay": 2.25,
                      "max_failures": "12.3456789%", "durable": True, "batch_size": 3,
                      "output": str(tmp_path / "out.parquet"), "format": "parquet", "no_merge": True}, watching=False)
    args, back = carried_args(values), {}
    while args:
        name = args.pop(0).removeprefix("--").replace("-", "_")
        back[name] = True if RUN_OPTIONS[name].default is False else check(name, args.pop(0))
    assert back == {name: values[name] for name in CARRIED}
    for budget in ("1234567", "0.00001%", "2.5"):
        number = check("max_failures", budget)
        args = carried_args({**values, "max_failures": number})
        assert check("max_failures", args[args.index("--max-failures") + 1]) == number


def test_quiet_run_with_failures_still_says_what_to_do_next(data, tmp_path):
    """-q keeps the counts and paths back, not the news that tasks failed and what to run: an
    exit-1 run printed its per-task warnings and nothing else."""
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", picky, "-w", "1", "-q", "--retries", "0")
    assert result.returncode == 1, result.stderr
    see = hint_after(result.stderr, "to see why: ")
    assert "bad1.txt" in run_hint(see).stdout
    assert "done, " not in result.stderr and "summary:" not in result.stderr  # still quiet
    clean = run_cli("run", str(data), "-o", str(tmp_path / "clean"), "-w", "1", "-q")
    assert clean.returncode == 0 and clean.stderr == "", clean.stderr


def test_no_hint_prints_a_placeholder_for_a_path():
    """The CLI and the modules behind it print real paths, never DATA_DIR or OUT/ledger.db."""
    package = Path(__file__).resolve().parent.parent / "crawlproc"
    for source in package.rglob("*.py"):
        text = source.read_text()
        for placeholder in ("`crawlproc run DATA_DIR", "OUT/ledger.db damaged", "-o OUT`"):
            assert placeholder not in text, (source.name, placeholder)


def test_a_damaged_ledger_is_named_by_its_real_path(data, tmp_path):
    out = tmp_path / "out"
    many = make_tree(tmp_path / "many", {f"d{i % 10}/f{i}.txt": f"{i}\n" for i in range(3000)})
    assert run_cli("run", str(many), "-o", str(out), "-w", "2", "-q").returncode == 0
    ledger = out / "ledger.db"
    size = ledger.stat().st_size
    with open(ledger, "r+b") as f:  # keep page 1 (header, schema); wreck the table pages
        f.seek(8192)
        f.write(b"\xa5" * (size - 8192))
    result = run_cli("status", "-o", str(out))
    line = one_line(result, 2)
    assert str(ledger) in line


# -- retry of a path that has no task ----------------------------------------------------------------

def test_retry_of_an_unknown_path_exits_2_naming_it_and_changes_nothing(failed_out):
    before = counts(failed_out)
    line = one_line(run_cli("retry", "-o", str(failed_out), "bad1.txt", "no such.txt"), 2)
    assert "'no such.txt'" in line and "bad1.txt" not in line.split("(")[0]
    assert "nothing was put back" in line
    assert counts(failed_out) == before


def test_retry_accepts_a_path_as_typed_or_absolute(failed_out, data):
    assert run_cli("retry", "-o", str(failed_out), "./bad1.txt").returncode == 0
    assert counts(failed_out)["pending"] == 1
    result = run_cli("retry", "-o", str(failed_out), "--all", str(data / "b" / "c.txt"))
    assert result.returncode == 0, result.stderr
    assert counts(failed_out)["pending"] == 2


def test_retry_puts_back_the_file_named_not_every_file_shown_alike(tmp_path):
    """`bad\\xff.txt` is how a name with the byte 0xff is shown, and also a real name: retry of
    either put back both (it matched the shown form)."""
    data = make_tree(tmp_path / "data", {"bad\\xff.txt": "literal backslash\n"})
    (data / os.fsdecode(b"bad\xff.txt")).write_bytes(b"byte 0xff\n")
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-p", picky, "-w", "1", "-q").returncode == 1
    assert counts(out)["failed"] == 2

    def failed_paths() -> set[bytes]:
        return {row[0] for row in query_ledger(out, "SELECT path_bytes FROM tasks WHERE state = 'failed'")}

    assert run_cli("retry", "-o", str(out), os.fsdecode(b"bad\xff.txt")).returncode == 0  # the real bytes
    assert failed_paths() == {b"bad\\xff.txt"}
    assert run_cli("retry", "-o", str(out), "bad\\xff.txt").returncode == 0  # typed as shown: the real name wins
    assert failed_paths() == set()
    assert counts(out)["pending"] == 2


def test_retry_with_nothing_to_put_back_says_why(failed_out):
    result = run_cli("retry", "-o", str(failed_out), "a.txt")
    assert result.returncode == 0
    assert result.stderr.startswith("nothing put back to pending: no failed task among those paths")


# -- merge with records missing ----------------------------------------------------------------------

def test_merge_exits_1_when_a_damaged_result_sent_tasks_back_and_its_hint_finishes_the_job(data, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "--param", "unused=a b").returncode == 0
    complete = (out / "merged.jsonl").read_bytes()
    for result_file in (out / "results").rglob("*.jsonl"):
        result_file.write_bytes(b"damaged")
    result = run_cli("merge", "-o", str(out))
    assert result.returncode == 1, result.stderr
    assert "3 done tasks had a missing or damaged result" in result.stderr
    command = hint_after(result.stderr, "to process them: ")
    assert shlex.split(command) == ["crawlproc", "run", str(data), "-o", str(out), "--param", "unused=a b",
                                    "--workers", "1"]  # the run's -w 1 too
    finished = run_hint(command)
    assert finished.returncode == 0, finished.stderr
    assert (out / "merged.jsonl").read_bytes() == complete
    again = run_cli("merge", "-o", str(out))
    assert again.returncode == 0 and again.stderr.splitlines() == [f"merged 3 done tasks into {out}/merged.jsonl"]


def test_merge_exits_1_when_tasks_failed(failed_out):
    result = run_cli("merge", "-o", str(failed_out))
    assert result.returncode == 1
    see = hint_after(result.stderr, "to see why: ")
    assert "bad1.txt" in run_hint(see).stdout


# -- --log-json ----------------------------------------------------------------------------------------

def test_log_json_gives_flat_objects_and_the_summary_as_one(failed_out, data, tmp_path):
    picky = processor_spec(tmp_path, "picky", FAILING_PROCESSOR)
    result = run_cli("run", str(data), "-o", str(failed_out), "-p", picky, "-w", "1", "--no-progress",
                     "--retry-failed", "--retries", "0", "-v", "--log-json")
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert len(lines) > 3
    for line in lines:
        assert {"level", "time", "message", "pid", "task"} <= set(line), line
        assert not any(isinstance(value, dict) for value in line.values()), line
    assert any(line["task"] != "-" and line["level"] == "WARNING" for line in lines)  # the failed attempt
    summary = lines[-1]
    assert summary["event"] == "summary" and summary["exit_code"] == 1
    assert (summary["done"], summary["failed"], summary["total"]) == (2, 1, 3)
    assert summary["merged_output"] == f"{failed_out}/merged.jsonl"
    assert any("crawlproc failures -o" in hint for hint in summary["hints"])


def test_log_json_error_is_a_json_line_too(data, tmp_path):
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-w", "1", "-q").returncode == 0
    refused = run_cli("run", str(data), "-o", str(out), "-p", "sha256", "--log-json")
    line = json.loads(one_line(refused, 2))
    assert line["level"] == "ERROR" and line["exit_code"] == 2 and "sha256" in line["message"]


# -- status after a crash ------------------------------------------------------------------------------

def test_a_first_run_counts_the_tasks_no_worker_has_yet_as_pending(tmp_path):
    """A first run records new tasks as running in the write that claims them, long before a
    worker has them: `status` said 1,364 of 1,504 were running with 2 workers, and pending
    (what an alert watches) stayed near 0 for the whole run."""
    files = 300
    data = make_tree(tmp_path / "data", {f"f{i:03d}.txt": f"{i}\n" for i in range(files)})
    release = tmp_path / "release"
    sleepy = processor_spec(tmp_path, "sleepy", SLEEPY_PROCESSOR)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-p", sleepy, "-w", "2",
         "--no-progress", "--param", f"release={release}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        waiting = wait_until(lambda: (s := status_json(out)) and s["counts"]["pending"] >= files // 2 and s,
                             WAIT_SECONDS, "the tasks no worker has to count as pending")
        counts = waiting["counts"]
        assert counts["done"] == 0 and counts["pending"] + counts["running"] == files, counts
        assert counts["running"] < files // 2, counts  # only what the 2 workers were handed
        release.touch()
        assert proc.wait(timeout=WAIT_SECONDS) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT_SECONDS)
    assert status_json(out)["counts"]["done"] == files


def test_status_after_kill9_says_the_run_ended_abruptly_and_what_goes_back(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", {f"f{i:02d}.txt": f"{i}\n" for i in range(12)})
    release = tmp_path / "release"
    sleepy = processor_spec(tmp_path, "sleepy", SLEEPY_PROCESSOR)
    monkeypatch.chdir(tmp_path)  # OUT given relative, as people do: `-o out`
    out = Path("out")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawlproc", "run", "data", "-o", "out", "-p", sleepy, "-w", "2",
         "--no-progress", "--param", f"release={release}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        going = wait_until(lambda: (s := status_json(out)) and s["counts"]["running"] >= 2 and s, WAIT_SECONDS,
                           "tasks to be running")
        assert going["last_run"]["state"] == "going" and going["running_pid"] == proc.pid
        assert going["requeued_at_next_start"] == 0
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT_SECONDS)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=WAIT_SECONDS)
    after = wait_until(lambda: (s := status_json(out))["running_pid"] is None and s, WAIT_SECONDS,
                       "the lock to be free")
    running = after["counts"]["running"]
    assert running >= 2
    assert after["last_run"]["state"] == "ended abruptly" and after["last_run"]["finished"] is None
    assert after["requeued_at_next_start"] == running
    assert after["last_run"]["started"] <= after["last_run"]["updated"]

    table = {width: invoke("status", "-o", "out", env={"COLUMNS": str(width)}).stdout for width in (80, 200)}
    assert table[80] == table[200]  # nothing wrapped at 80 columns
    assert all(len(line) <= 80 for line in table[80].splitlines() if str(tmp_path) not in line), table[80]
    text = table[80]
    assert "ended abruptly" in text and "still going" not in text
    assert f"{running} tasks left running go back to pending when the next run starts:" in text
    command = text.splitlines()[text.splitlines().index(
        f"  {running} tasks left running go back to pending when the next run starts:") + 1].strip()
    assert command == after["run_command"]
    release.touch()
    finished = run_hint(command, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert "went back to pending" in finished.stderr
    final = status_json(out)
    assert final["counts"]["done"] == 12 and final["last_run"]["state"] == "finished"
    assert final["requeued_at_next_start"] == 0
    assert query_ledger(tmp_path / "out", "SELECT count(*) FROM tasks WHERE state = 'running'") == [(0,)]


def status_json(out: Path) -> dict | None:
    result = run_cli("status", "-o", str(out), "--json")
    return json.loads(result.stdout) if result.returncode == 0 else None


THREADED_PROCESSOR = '''
import os
import sys
import threading
import time
from pathlib import Path

from crawlproc import processor


def _note_after_the_run():
    """Alive when the run ends: writes its note once summary.json is there."""
    summary, deadline = Path(os.environ["SUMMARY"]), time.monotonic() + 60
    while not summary.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(os.environ["NOTE"]).write_text("written after the run")


if Path(sys.argv[0]).name == "__main__.py":  # the coordinator only (python -m crawlproc)
    threading.Thread(target=_note_after_the_run).start()  # the exit waits for it
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()  # and not for this one


@processor(version="1")
def sizes(task):
    return {"path": task.relpath, "size": len(task.read_bytes())}
'''


def test_the_exit_waits_for_a_thread_that_is_not_a_daemon_and_for_no_daemon(tmp_path):
    """The CLI ends at once when only daemon threads are left (Dask's client leaves two),
    but a thread of the program's own that is not a daemon still finishes first."""
    data = make_tree(tmp_path / "data", {"a.txt": "one\n", "b.txt": "two\n"})
    proc = write_processor(tmp_path, "threaded", THREADED_PROCESSOR)
    out, note = tmp_path / "out", tmp_path / "note.txt"
    result = run_cli("run", str(data), "-o", str(out), "-p", f"{proc}:sizes", "-q", "--no-progress",
                     env={"SUMMARY": str(out / "summary.json"), "NOTE": str(note)})
    assert result.returncode == 0, result.stderr
    assert note.read_text() == "written after the run"


def test_only_threads_that_are_not_daemons_hold_the_exit():
    from crawlproc.cli.app import _threads_left

    done = threading.Event()
    daemon = threading.Thread(target=done.wait, daemon=True)
    daemon.start()
    try:
        assert not _threads_left(threading)
        worker = threading.Thread(target=done.wait)
        worker.start()
        assert _threads_left(threading)
    finally:
        done.set()
    worker.join(timeout=WAIT_SECONDS)
    daemon.join(timeout=WAIT_SECONDS)
    assert not _threads_left(threading)


FAILS_ON_ESCAPE = """
from crawlproc import processor

@processor(version="1")
def fails_on_escape(task):
    if "\\x1b" in task.relpath:
        raise ValueError("no")
    return {"path": task.relpath}
"""


def test_a_file_name_with_a_terminal_escape_sequence_is_logged_as_text(tmp_path):
    """A scraped file named `a ESC[2J b.txt` cleared the terminal of whoever read the warning
    about it (stderr, and the log file when printed): control characters are written as \\xNN."""
    data = make_tree(tmp_path / "data", {"ok.txt": "x\n", "a\x1b[2Jb.txt": "x\n"})
    out = tmp_path / "out"
    proc = f"{write_processor(tmp_path, 'escape', FAILS_ON_ESCAPE)}:fails_on_escape"
    result = run_cli("run", str(data), "-o", str(out), "-p", proc, "--retries", "0", "--no-progress")
    assert result.returncode == 1, result.stderr
    log = (out / "logs" / "crawlproc.log").read_text()
    for text in (result.stderr, log):
        assert "\x1b" not in text
        assert "a\\x1b[2Jb.txt" in text and "failed on attempt 1/1" in text, text
    explained = run_cli("explain", str(data / "a\x1b[2Jb.txt"), "-o", str(out))  # click drops it off a terminal
    assert explained.returncode == 0 and explained.stdout.startswith("a\\x1b[2Jb.txt: 1 task"), explained.stdout


FAILS_WITH_A_TAG = """
from crawlproc import processor

@processor(version="1")
def fails_with_a_tag(task):
    raise ValueError("unexpected closing tag [/meta] in " + task.relpath)
"""


def test_failures_shows_brackets_in_names_and_errors_as_they_are(tmp_path):
    """rich read them as markup: 'page[1].html' showed as 'page.html', and an error holding
    '[/meta]' (a closing tag to rich) made `crawlproc failures` an internal error."""
    data = make_tree(tmp_path / "data", {"page[1].html": "x\n", "a[bold]c.txt": "x\n"})
    out = tmp_path / "out"
    proc = f"{write_processor(tmp_path, 'tag', FAILS_WITH_A_TAG)}:fails_with_a_tag"
    assert run_cli("run", str(data), "-o", str(out), "-p", proc, "--retries", "0", "-q").returncode == 1
    shown = run_cli("failures", "-o", str(out), env={"COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    for text in ("page[1].html", "a[bold]c.txt", "closing tag [/meta] in page[1].html"):
        assert text in shown.stdout, shown.stdout
