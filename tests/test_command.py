"""`--cmd` as GNU parallel users expect it: placeholders and their quoting, hostile file names,
--ok-exit-codes, failures that keep the command's code and output, a missing program, -j."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import make_tree, run_cli
from crawlproc.cli import cli
from crawlproc.errors import UsageError
from crawlproc.processors.command import build_argv, parse_exit_codes, program_problem
from crawlproc.run import RunOptions, run_job

NON_UTF8 = os.fsdecode(b"bad\xff.txt")
HOSTILE_NAMES = ["x; touch PWNED", "$(touch PWNED)", "`touch PWNED`", "a'b\"c", "-rf", "with space.txt",
                 "new\nline", NON_UTF8]


def records(out: Path) -> dict[str, dict]:
    lines = (out / "merged.jsonl").read_text().splitlines()
    return {record["path"]: record for record in map(json.loads, lines)}


def failures(out: Path) -> list[dict]:
    result = run_cli("failures", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_no_pwned(*roots: Path) -> None:
    for root in roots:
        assert not [path for path in root.rglob("*") if path.name == "PWNED"]


def assert_one_line_exit_2(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """DATA_DIR with hostile names, each file a different size; a cwd and HOME of its own."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "home").mkdir()
    return make_tree(tmp_path / "data", {name: "x" * (index + 1) for index, name in enumerate(HOSTILE_NAMES)})


def run_in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """crawlproc in tmp_path/cwd with HOME at tmp_path/home: where `touch PWNED` would land."""
    return run_cli(*args, cwd=tmp_path / "cwd", env={"HOME": str(tmp_path / "home")})


# -- hostile names ------------------------------------------------------------------------------

def test_hostile_names_run_no_hidden_command_and_records_hold_the_real_output(hostile, tmp_path):
    out = tmp_path / "out"
    result = run_in(tmp_path, "run", str(hostile), "-o", str(out), "-w", "2", "-q", "--cmd", "sh -c 'wc -c < {}'")
    assert_no_pwned(tmp_path)
    assert result.returncode == 0, result.stderr
    got = records(out)
    assert sorted(got) == sorted(HOSTILE_NAMES)
    for index, name in enumerate(HOSTILE_NAMES):
        assert (got[name]["exit_code"], got[name]["stdout"].strip(), got[name]["stderr"]) == (0, str(index + 1), "")


@pytest.mark.parametrize("template", [
    "sh -c \"wc -c < '{}'\"",  # the user's own quotes around {} undo crawlproc's
    "sh -c 'cat \"{}\"'",
    "sh -c 'cat \\{}'",
    "sh -c \"cat '{/}'\"",
    "bash -c \"echo $'\\\\'{}'\"",  # inside $'...', where \' does not end the quotes
    "sh -c 'echo `basename {}`'",  # a backtick in the name ends the backticks
    "sh -c 'cat <<EOF\n{}\nEOF'",  # a here-document's body ignores quotes: $(touch PWNED) runs
])
def test_a_placeholder_in_quotes_inside_a_shell_script_is_refused_before_any_task(hostile, tmp_path, template):
    """Quoted by the user too, the path's shell quoting came undone: a file named
    `x; touch PWNED` ran `touch`, and its task counted as done."""
    out = tmp_path / "out"
    result = run_in(tmp_path, "run", str(hostile), "-o", str(out), "-w", "2", "--cmd", template)
    assert_one_line_exit_2(result, "is inside quotes", "write it bare")
    assert_no_pwned(tmp_path)
    assert not (out / "results").exists() or not list((out / "results").rglob("*.jsonl"))


def test_cmd_with_chunk_size_is_refused(tmp_path):
    """A command gets the whole file: per byte range it ran on the whole file each time, and the
    merged output held every file's output once per range."""
    data = make_tree(tmp_path / "data", {"big.txt": "line\n" * 1000})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "--cmd", "wc -c {}", "--chunk-size", "1KB")
    assert_one_line_exit_2(result, "--cmd runs its command on whole files")
    assert not out.exists()


def test_a_placeholder_inside_an_argument_is_shell_quoted():
    for name in [*HOSTILE_NAMES, "it's", "", "*", "~"]:
        path = f"/data/{name}"
        argv = build_argv("sh -c 'cat {} > /dev/null' --in={}", path)
        assert argv[:2] == ["sh", "-c"]
        assert argv[2] == f"cat {shlex.quote(path)} > /dev/null"
        assert shlex.split(argv[2]) == ["cat", path, ">", "/dev/null"]  # a shell sees the path as one word
        assert argv[3] == f"--in={shlex.quote(path)}"
    assert build_argv("cat {} -- '{}'", "/d/x; touch PWNED") == ["cat", "/d/x; touch PWNED", "--", "/d/x; touch PWNED"]


# -- placeholders -------------------------------------------------------------------------------

# relpath -> ({/}, {//} under DATA_DIR, {.} under DATA_DIR, {/.}), as GNU parallel gives them
PLACEHOLDER_CASES = {
    "sub.dir/arch.tar.gz": ("arch.tar.gz", "sub.dir", "sub.dir/arch.tar", "arch.tar"),
    "sub.dir/noext": ("noext", "sub.dir", "sub.dir/noext", "noext"),
    "top.txt": ("top.txt", "", "top", "top"),
    ".hidden": (".hidden", "", "", ""),
    "d x/a b'c\"d.txt": ("a b'c\"d.txt", "d x", "d x/a b'c\"d", "a b'c\"d"),
    "$(touch PWNED).log": ("$(touch PWNED).log", "", "$(touch PWNED)", "$(touch PWNED)"),
    "q/-rf": ("-rf", "q", "q/-rf", "-rf"),
    "new\nline.txt": ("new\nline.txt", "", "new\nline", "new\nline"),
    NON_UTF8: (NON_UTF8, "", os.fsdecode(b"bad\xff"), os.fsdecode(b"bad\xff")),
}


def expected_placeholders(data: Path, relpath: str) -> list[str]:
    """[{}, {/}, {//}, {.}, {/.}] for one file, as the command prints them (UTF-8 with replacement)."""
    base, folder, no_ext, base_no_ext = PLACEHOLDER_CASES[relpath]
    under = lambda rel: f"{data}/{rel}" if rel else str(data)  # noqa: E731
    values = [f"{data}/{relpath}", base, under(folder), f"{data}/{no_ext}", base_no_ext]
    return [os.fsencode(value).decode("utf-8", "replace") for value in values]


@pytest.mark.parametrize("template", [
    "printf <%s> {} {/} {//} {.} {/.}",                  # whole arguments: the raw values
    "sh -c 'printf \"<%s>\" {} {/} {//} {.} {/.}'",      # inside a shell's argument: quoted, then unquoted by sh
], ids=["whole-arguments", "inside-sh-c"])
def test_each_placeholder_as_gnu_parallel_defines_it(tmp_path, template):
    data = make_tree(tmp_path / "data", {relpath: "x" for relpath in PLACEHOLDER_CASES})
    (tmp_path / "cwd").mkdir()
    (tmp_path / "home").mkdir()
    out = tmp_path / "out"
    result = run_in(tmp_path, "run", str(data), "-o", str(out), "-q", "--cmd", template)
    assert_no_pwned(tmp_path)
    assert result.returncode == 0, result.stderr
    got = records(out)
    assert sorted(got) == sorted(PLACEHOLDER_CASES)
    for relpath, record in got.items():
        assert re.findall(r"<(.*?)>", record["stdout"], re.DOTALL) == expected_placeholders(data, relpath)


def test_without_a_placeholder_the_path_is_the_last_argument(tmp_path):
    data = make_tree(tmp_path / "data", {"a b.txt": "x"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-q", "--cmd", "printf <%s><%s> first")
    assert result.returncode == 0, result.stderr
    assert records(out)["a b.txt"]["stdout"] == f"<first><{data}/a b.txt>"


def test_help_explains_placeholders_quoting_and_the_appended_path():
    result = run_cli("run", "--help")
    text = " ".join(result.stdout.split())
    for words in ("{/} its basename", "{//} its folder", "{.} the path without its last extension",
                  "{/.} the basename without it", "give {} as an argument of its own", "shell-quoted",
                  "Without a placeholder the path is appended as the last argument", "--ok-exit-codes",
                  "-w, -j, --workers"):
        assert words in text


# -- --ok-exit-codes ----------------------------------------------------------------------------

def test_grep_c_with_ok_exit_codes_keeps_each_code_in_its_record(tmp_path):
    data = make_tree(tmp_path / "data", {"hit.txt": "needle\nhay\nneedle\n", "miss.txt": "hay\n"})
    out = tmp_path / "out"
    args = ("run", str(data), "-o", str(out), "-q", "--retries", "0", "--cmd", "grep -c needle {}")
    result = run_cli(*args, "--ok-exit-codes", "1,0")
    assert result.returncode == 0, result.stderr
    got = records(out)
    assert {path: (r["exit_code"], r["stdout"]) for path, r in got.items()} == \
           {"hit.txt": (0, "2\n"), "miss.txt": (1, "0\n")}

    # the same codes through the environment are the same run; other codes are another run
    again = run_cli(*args, env={"CRAWLPROC_OK_EXIT_CODES": "0,1,1"})
    assert again.returncode == 0, again.stderr
    other = run_cli(*args)
    assert_one_line_exit_2(other, "ok_exit_codes")

    default = tmp_path / "default-out"
    strict = run_cli("run", str(data), "-o", str(default), "-q", "--retries", "0", "--cmd", "grep -c needle {}")
    assert strict.returncode == 1
    assert [(f["relpath"], f["error"]) for f in failures(default)] == [("miss.txt", "command exited with code 1")]


@pytest.mark.parametrize("value", ["x", "1,,2", "256", "-1", "", " 0 , one"])
def test_a_bad_exit_code_list_is_one_line_exit_2_before_out_exists(tmp_path, value):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "--cmd", "true", "--ok-exit-codes", value)
    assert_one_line_exit_2(result, "--ok-exit-codes", repr(value))
    if value:  # click takes an empty variable for an unset one
        from_env = run_cli("run", str(data), "-o", str(out), "--cmd", "true", env={"CRAWLPROC_OK_EXIT_CODES": value})
        assert_one_line_exit_2(from_env, "--ok-exit-codes", repr(value))
    assert not out.exists()


@pytest.mark.parametrize("args", [["--ok-exit-codes", "0,1"], ["--cmd", "true", "--param", "ok_exit_codes=1"]])
def test_ok_exit_codes_only_with_cmd(tmp_path, args):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), *args)
    assert_one_line_exit_2(result, "--ok-exit-codes")
    assert not (tmp_path / "out").exists()


def test_exit_code_lists_are_normalised():
    assert parse_exit_codes("1,0, 1") == (0, 1)
    assert parse_exit_codes("255") == (255,)
    for bad in ("", "1;2", "0x1", "²"):
        with pytest.raises(ValueError, match="exit codes 0-255"):
            parse_exit_codes(bad)


# -- a failing command --------------------------------------------------------------------------

FAILING = ("sh -c 'case \"$0\" in *signal*) kill -TERM $$;; esac; "
           "echo out-line; echo err-first >&2; echo err-second >&2; exit 3'")


def test_a_failing_command_leaves_its_code_and_output_in_failures(tmp_path):
    data = make_tree(tmp_path / "data", {"exit.txt": "a\n", "signal.txt": "b\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-q", "--retries", "1", "--retry-delay", "0",
                     "--cmd", FAILING)
    assert result.returncode == 1, result.stderr
    by_path = {row["relpath"]: row for row in failures(out)}
    exited, killed = by_path["exit.txt"], by_path["signal.txt"]
    assert (exited["attempts"], exited["error"]) == (2, "command exited with code 3: err-first")
    assert exited["traceback"] == "--- stderr ---\nerr-first\nerr-second\n--- stdout ---\nout-line"
    assert (killed["attempts"], killed["error"]) == (2, "command killed by SIGTERM")
    assert killed["traceback"] == "--- stderr: empty ---\n--- stdout: empty ---"
    table = run_cli("failures", "-o", str(out))
    assert "command exited with code 3: err-first" in table.stdout and "SIGTERM" in table.stdout


# -- a missing program --------------------------------------------------------------------------

def _not_executable(cwd: Path) -> str:
    (cwd / "notes.sh").write_text("#!/bin/sh\necho hi\n")
    return "./notes.sh"


def _a_folder(cwd: Path) -> str:
    (cwd / "tools").mkdir()
    return "./tools"


@pytest.mark.parametrize("make_program, problem", [
    (lambda cwd: "no-such-program-xyz", "no program 'no-such-program-xyz' on PATH"),
    (lambda cwd: "./missing.sh", "program ./missing.sh does not exist"),
    (_not_executable, "program ./notes.sh is not executable"),
    (_a_folder, "program ./tools is not executable"),
], ids=["bare-name", "missing-path", "not-executable", "folder"])
def test_a_missing_program_is_exit_2_before_out_exists(tmp_path, make_program, problem):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n", "b.txt": "b\n"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "out"
    template = f"{make_program(cwd)} --flag {{}}"
    result = run_cli("run", str(data), "-o", str(out), "--cmd", template, cwd=cwd)
    assert_one_line_exit_2(result, f"--cmd {shlex.quote(template)}: {problem}")
    assert not out.exists()


def test_the_library_refuses_a_missing_program_too(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    for spec in ("cmd", "crawlproc.processors.command:run_command"):
        options = RunOptions(data_dir=data, out=tmp_path / "out", processor=spec,
                             params={"cmd": "no-such-program-xyz {}"})
        with pytest.raises(UsageError, match="no program 'no-such-program-xyz' on PATH"):
            run_job(options)
        assert not (tmp_path / "out").exists()


def test_a_program_found_from_the_current_folder_runs(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tool = cwd / "tool.sh"
    tool.write_text('#!/bin/sh\necho "tool saw $1"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-q", "--cmd", "./tool.sh {/}", cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert records(out)["a.txt"]["stdout"] == "tool saw a.txt\n"


def test_a_program_named_by_a_placeholder_is_checked_per_task(tmp_path):
    data = make_tree(tmp_path / "data", {"run.sh": '#!/bin/sh\necho "ran with $1"\n', "plain.txt": "x\n"})
    (data / "run.sh").chmod(0o755)
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-q", "--retries", "0", "--cmd", "{} arg")
    assert result.returncode == 1, result.stderr
    assert records(out)["run.sh"]["stdout"] == "ran with arg\n"
    [failure] = failures(out)
    assert failure["relpath"] == "plain.txt"
    assert failure["error"].startswith(f"command not executable: {str(data / 'plain.txt')!r}")


def test_program_problem_resolves_like_exec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("#!/bin/sh\n")
    assert program_problem("tool") == "no program 'tool' on PATH"  # on PATH, but not executable
    (tmp_path / "bin" / "tool").chmod(0o755)
    assert program_problem("tool") is None
    assert program_problem("sh") == "no program 'sh' on PATH"  # only PATH counts for a bare name
    assert program_problem("bin/tool") is None  # a path: from the current folder, PATH aside
    assert program_problem("./tool") == "program ./tool does not exist"


# -- -j -----------------------------------------------------------------------------------------

def test_j_is_workers(tmp_path):
    context = cli.commands["run"].make_context("run", ["data", "-j", "3"])
    assert context.params["workers"] == 3
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "x" * i for i in range(6)})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-q", "-j", "2", "--batch-size", "1", "--cmd", "wc -c {}")
    assert result.returncode == 0, result.stderr
    assert {path: r["stdout"].split()[0] for path, r in records(out).items()} == \
           {f"f{i}.txt": str(i) for i in range(6)}
