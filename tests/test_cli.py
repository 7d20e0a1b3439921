"""The `crawlproc` command in-process (click's CliRunner): help, errors, exit codes, small commands."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tree, run_cli
from crawlproc import __version__
from crawlproc.cli import cli

FAILING_PROCESSOR = '''
from crawlproc import processor


@processor(version="1")
def picky(task):
    """Fails on every file whose name starts with 'bad'."""
    name = task.relpath.rsplit("/", 1)[-1]
    if name.startswith("bad"):
        raise ValueError(f"cannot handle {task.relpath}")
    return {"path": task.relpath, "size": len(task.read_bytes())}
'''


def invoke(*args: str, env: dict | None = None):
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False, prog_name="crawlproc")


def assert_one_line_error(result, code: int = 2, *needles: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", {"a.txt": "one two\n", "b/c.txt": "x\n", "bad1.txt": "?\n",
                                         "d/bad2.txt": "??\n"})


@pytest.fixture
def picky(tmp_path: Path) -> str:
    path = tmp_path / "procs" / "picky.py"
    path.parent.mkdir()
    path.write_text(FAILING_PROCESSOR)
    return f"{path}:picky"


@pytest.fixture
def failed_out(tmp_path: Path, data: Path, picky: str) -> Path:
    """An OUT where a.txt and b/c.txt are done and bad1.txt, d/bad2.txt failed."""
    out = tmp_path / "out"
    result = invoke("run", str(data), "-o", str(out), "-p", picky, "-w", "1", "--retries", "0", "--no-progress")
    assert result.exit_code == 1, result.stderr
    assert "2 done, 2 failed" in result.stderr, result.stderr
    return out


def status_json(out: Path) -> dict:
    result = invoke("status", "-o", str(out), "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


# -- help and version ---------------------------------------------------------------------------

def test_help_on_the_group_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "watch", "status", "failures", "retry", "merge", "processors"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["run", "watch", "status", "failures", "retry", "merge", "processors"])
def test_help_on_every_command(command):
    assert command in cli.commands
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage:" in result.stdout and command in result.stdout
    assert result.stderr == ""


def test_run_help_documents_spec_options():
    text = invoke("run", "--help").stdout
    for option in ("--processor", "--param", "--out", "--workers", "--include", "--exclude",
                   "--max-tasks-per-child", "--max-memory-per-child", "--timeout", "--retries",
                   "--max-failures", "--durable", "--retry-failed", "--reprocess", "--batch-size",
                   "--follow-symlinks", "--output", "--no-merge", "--no-progress"):
        assert option in text, option


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout and "crawlproc" in result.stdout


def test_processors_lists_builtins_one_line_each():
    result = invoke("processors")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    names = [line.split()[0] for line in lines]
    assert "linecount" in names and "sha256" in names
    assert len(names) == len(set(names))
    assert all(len(line.split()) > 2 for line in lines)  # a description on each line


# -- usage errors: exit 2, one line, no traceback ------------------------------------------------

@pytest.mark.parametrize("args", [
    ["run", "DATA", "--bogus"],
    ["run", "DATA", "-w", "zero"],
    ["run", "DATA", "-w", "0"],
    ["run", "DATA", "--retries", "-1"],
    ["run", "DATA", "--max-memory-per-child", "lots"],
    ["run", "DATA", "--max-failures", "ten"],
    ["run", "DATA", "--max-failures", "150%"],
    ["run", "DATA", "--executor", "nowhere"],
    ["run"],
    ["status", "--bogus"],
    ["nosuchcommand"],
])
def test_bad_options_exit_2_with_one_line(args, data):
    args = [str(data) if a == "DATA" else a for a in args]
    assert_one_line_error(invoke(*args), 2)


def test_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "no-such-dir"
    line = assert_one_line_error(invoke("run", str(missing), "-o", str(tmp_path / "out")), 2, str(missing))
    assert "exist" in line


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("x")
    assert_one_line_error(invoke("run", str(path), "-o", str(tmp_path / "out")), 2, str(path))


@pytest.mark.parametrize("spec,needle", [
    ("nosuchmodule_xyz:func", "nosuchmodule_xyz"),
    ("missing.py:f", "missing.py"),
    ("builtin-that-does-not-exist", "builtin-that-does-not-exist"),
    ("json:no_such_function", "no_such_function"),
    ("json:__doc__", "callable"),
])
def test_bad_processor_exit_2_with_one_clear_line(spec, needle, data, tmp_path):
    assert_one_line_error(invoke("run", str(data), "-o", str(tmp_path / "out"), "-p", spec), 2, needle)


def test_processor_file_that_raises_on_import(data, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('broken at import')\n")
    assert_one_line_error(invoke("run", str(data), "-o", str(tmp_path / "out"), "-p", f"{broken}:f"), 2,
                          "broken")


@pytest.mark.parametrize("param", ["bad", "=value"])
def test_bad_param_exit_2(param, data, tmp_path):
    assert_one_line_error(invoke("run", str(data), "-o", str(tmp_path / "out"), "--param", param), 2, param)


def test_foreign_ledger_in_out_exit_2(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with sqlite3.connect(out / "ledger.db") as conn:
        conn.execute("CREATE TABLE other (x)")
    assert_one_line_error(invoke("run", str(data), "-o", str(out), "--no-progress"), 2, "ledger")


def test_out_that_is_a_file_exit_2(data, tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert_one_line_error(invoke("run", str(data), "-o", str(out), "--no-progress"), 2, str(out))


# -- environment variables ------------------------------------------------------------------------

def test_env_workers_bad_value_exit_2(data, tmp_path):
    result = invoke("run", str(data), "-o", str(tmp_path / "out"), env={"CRAWLPROC_WORKERS": "0"})
    assert_one_line_error(result, 2)
    assert not (tmp_path / "out" / "ledger.db").exists()


def test_env_variables_are_honoured(data, tmp_path):
    out = tmp_path / "env-out"
    env = {"CRAWLPROC_WORKERS": "1", "CRAWLPROC_PROCESSOR": "sha256", "CRAWLPROC_OUT": str(out),
           "CRAWLPROC_NO_PROGRESS": "1", "CRAWLPROC_INCLUDE": "*.txt"}
    result = invoke("run", str(data), env=env)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert all(len(r["sha256"]) == 64 for r in records)
    assert len(records) == 4
    result = invoke("status", "--json", env={"CRAWLPROC_OUT": str(out)})
    assert json.loads(result.stdout)["processor"] == "sha256"


def test_command_line_beats_env(data, tmp_path):
    out = tmp_path / "out"
    result = invoke("run", str(data), "-o", str(out), "-p", "linecount", "--no-progress",
                    env={"CRAWLPROC_PROCESSOR": "sha256", "CRAWLPROC_WORKERS": "1"})
    assert result.exit_code == 0, result.stderr
    first = json.loads((out / "merged.jsonl").read_text().splitlines()[0])
    assert "lines" in first and "sha256" not in first


# -- status ------------------------------------------------------------------------------------

def test_status_json_has_spec_keys(failed_out):
    data = status_json(failed_out)
    assert set(data["counts"]) >= {"pending", "running", "done", "failed", "gone"}
    assert all(isinstance(v, int) for v in data["counts"].values())
    assert data["counts"]["done"] == 2 and data["counts"]["failed"] == 2
    assert data["total"] == sum(data["counts"].values()) == 4
    assert isinstance(data["out"], str) and Path(data["out"]) == failed_out


def test_status_table_mentions_counts(failed_out):
    result = invoke("status", "-o", str(failed_out))
    assert result.exit_code == 0, result.stderr
    for word in ("pending", "running", "done", "failed", "gone"):
        assert word in result.stdout


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["failures"], ["failures", "--json"],
                                     ["retry", "--failed"], ["retry", "--all"], ["merge"]])
def test_commands_on_missing_out_exit_2_one_line(command, tmp_path):
    missing = tmp_path / "missing-out"
    assert_one_line_error(invoke(*command, "-o", str(missing)), 2, str(missing))
    assert not missing.exists()


@pytest.mark.parametrize("command", [["status", "--json"], ["failures", "--json"], ["merge"]])
def test_commands_on_out_without_ledger_exit_2_one_line(command, tmp_path):
    empty = tmp_path / "empty-out"
    empty.mkdir()
    assert_one_line_error(invoke(*command, "-o", str(empty)), 2, "ledger")


# -- failures ---------------------------------------------------------------------------------

def test_failures_json_is_a_list_ordered_by_relpath(failed_out):
    result = invoke("failures", "-o", str(failed_out), "--json")
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert isinstance(rows, list)
    assert [r["relpath"] for r in rows] == ["bad1.txt", "d/bad2.txt"]
    for row in rows:
        assert set(row) >= {"relpath", "offset", "attempts", "error", "traceback"}
        assert row["offset"] == 0 and row["attempts"] == 1
        assert "ValueError" in row["error"] and row["relpath"] in row["error"]
        assert "Traceback" in row["traceback"] and "raise ValueError" in row["traceback"]


def test_failures_table(failed_out):
    result = invoke("failures", "-o", str(failed_out))
    assert result.exit_code == 0, result.stderr
    assert "bad1.txt" in result.stdout and "d/bad2.txt" in result.stdout


def test_failures_json_empty_list_when_nothing_failed(data, tmp_path):
    out = tmp_path / "out"
    assert invoke("run", str(data), "-o", str(out), "-w", "1", "--no-progress").exit_code == 0
    result = invoke("failures", "-o", str(out), "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


# -- retry ------------------------------------------------------------------------------------

def test_retry_failed_is_the_default(failed_out):
    result = invoke("retry", "-o", str(failed_out))
    assert result.exit_code == 0, result.stderr
    assert "2" in result.stderr
    assert status_json(failed_out)["counts"] == {"pending": 2, "running": 0, "done": 2, "failed": 0, "gone": 0}
    assert json.loads(invoke("failures", "-o", str(failed_out), "--json").stdout) == []


def test_retry_failed_explicit(failed_out):
    assert invoke("retry", "-o", str(failed_out), "--failed").exit_code == 0
    assert status_json(failed_out)["counts"]["pending"] == 2


def test_retry_all(failed_out):
    assert invoke("retry", "-o", str(failed_out), "--all").exit_code == 0
    assert status_json(failed_out)["counts"] == {"pending": 4, "running": 0, "done": 0, "failed": 0, "gone": 0}


def test_retry_failed_and_all_together_is_one_line_and_changes_nothing(failed_out):
    result = invoke("retry", "-o", str(failed_out), "--failed", "--all")
    assert_one_line_error(result, 2, "--failed and --all exclude each other")
    assert status_json(failed_out)["counts"]["failed"] == 2


def test_retry_named_paths(failed_out):
    assert invoke("retry", "-o", str(failed_out), "d/bad2.txt").exit_code == 0
    counts = status_json(failed_out)["counts"]
    assert (counts["pending"], counts["failed"], counts["done"]) == (1, 1, 2)
    failures = json.loads(invoke("failures", "-o", str(failed_out), "--json").stdout)
    assert [f["relpath"] for f in failures] == ["bad1.txt"]
    # A done task is only put back with --all.
    assert invoke("retry", "-o", str(failed_out), "a.txt").exit_code == 0
    assert status_json(failed_out)["counts"]["done"] == 2
    assert invoke("retry", "-o", str(failed_out), "--all", "a.txt").exit_code == 0
    assert status_json(failed_out)["counts"]["done"] == 1


def test_retry_then_run_with_a_fixed_processor_finishes(failed_out, data, picky):
    assert invoke("retry", "-o", str(failed_out)).exit_code == 0
    processor_file = Path(picky.rsplit(":", 1)[0])
    processor_file.write_text(FAILING_PROCESSOR.replace('name.startswith("bad")', "False"))
    # The done tasks' records came from the code before the fix: keeping them is a choice.
    result = invoke("run", str(data), "-o", str(failed_out), "-p", picky, "-w", "1", "--no-progress",
                    "--keep-results")
    assert result.exit_code == 0, result.stderr
    assert status_json(failed_out)["counts"]["done"] == 4


# -- run summary on stderr -----------------------------------------------------------------------

def test_run_prints_a_summary_and_exit_1_when_some_failed(failed_out, data, picky):
    result = invoke("run", str(data), "-o", str(failed_out), "-p", picky, "-w", "1", "--no-progress")
    assert result.exit_code == 1
    assert "failed" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_quiet_run_prints_nothing(data, tmp_path):
    result = invoke("run", str(data), "-o", str(tmp_path / "out"), "-w", "1", "-q")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""


def test_two_runs_in_one_process(data, tmp_path):
    """The CLI entry point called twice in one process (a notebook, a test, an embedding program)."""
    out = tmp_path / "out"
    first = invoke("run", str(data), "-o", str(out), "-w", "1", "--no-progress")
    assert first.exit_code == 0, first.stderr
    second = invoke("run", str(data), "-o", str(out), "-w", "1", "--no-progress")
    assert second.exit_code == 0, second.stderr
    assert "0 processed this run" in second.stderr


def test_edited_processor_file_is_seen_by_a_second_run_in_one_process(data, tmp_path):
    """A version bump of a processor file is refused even when the CLI runs twice in one process."""
    source = tmp_path / "procs" / "versioned.py"
    source.parent.mkdir()
    template = ('from crawlproc import processor\n\n\n@processor(version="{v}")\n'
                'def proc(task):\n    return {{"path": task.relpath, "v": "{v}"}}\n')
    source.write_text(template.format(v="1"))
    out = tmp_path / "out"
    first = invoke("run", str(data), "-o", str(out), "-p", f"{source}:proc", "-w", "1", "--no-progress")
    assert first.exit_code == 0, first.stderr
    source.write_text(template.format(v="2"))
    second = invoke("run", str(data), "-o", str(out), "-p", f"{source}:proc", "-w", "1", "--no-progress")
    assert_one_line_error(second, 2, "processor_version: OUT has 1, this run 2")
    fresh = tmp_path / "fresh-out"
    third = invoke("run", str(data), "-o", str(fresh), "-p", f"{source}:proc", "-w", "1", "--no-progress")
    assert third.exit_code == 0, third.stderr
    summary = json.loads((fresh / "summary.json").read_text())
    assert summary["processor_version"] == "2"
    assert {json.loads(line)["v"] for line in (fresh / "merged.jsonl").read_text().splitlines()} == {"2"}


# -- --cmd ------------------------------------------------------------------------------------

def test_cmd_runs_a_program_per_file_without_a_shell(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "hello\n", "-rf": "x y\n", "x; rm -rf ~": "z\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "--cmd", "wc -c {}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert [(r["path"], r["exit_code"]) for r in records] == [("-rf", 0), ("a.txt", 0), ("x; rm -rf ~", 0)]
    assert records[2]["stdout"] == f"2 {data / 'x; rm -rf ~'}\n"
    assert (data / "x; rm -rf ~").exists()


def test_cmd_failure_is_a_failed_task_with_a_readable_error(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "--retries", "0", "--cmd", "false {}")
    assert result.returncode == 1
    failures = json.loads(run_cli("failures", "-o", str(out), "--json").stdout)
    assert failures[0]["error"] == "command exited with code 1"


@pytest.mark.parametrize("args", [["--cmd", "wc {}", "-p", "sha256"], ["--cmd", "   "],
                                  ["--cmd", "wc 'unclosed {}"], ["--cmd", "wc {}", "--param", "cmd=x"]])
def test_cmd_misuse_is_one_line_exit_2(tmp_path, args):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
