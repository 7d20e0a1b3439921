"""`crawlproc explain PATH`: a file's tasks and history, or the rule that left it out; run as a user would."""

from __future__ import annotations

import json
import os
import shlex
import threading
import time
from pathlib import Path

import pytest

import crawlproc
from conftest import make_tree, out_held, run_cli
from test_run import PICKY_PROCESSOR, write_processor


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    data = make_tree(tmp_path / "data", {"a.txt": "one two\n", "logs/x.log": "x\n", "keep/b.txt": "b\n",
                                         "bad1.txt": "?\n", "big.txt": "line\n" * 100})
    os.mkfifo(data / "fifo")
    os.symlink(data / "a.txt", data / "link.txt")
    os.symlink("/etc", data / "outside")
    return data


def explain(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    result = run_cli("explain", *args, cwd=cwd)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stdout, result.stderr


def as_json(path: str, out: Path, cwd: Path | None = None) -> dict:
    code, stdout, stderr = explain(path, "-o", str(out), "--json", cwd=cwd)
    assert code == 0, stderr
    return json.loads(stdout)


def run(data: Path, out: Path, **options) -> crawlproc.api.Outcome:
    return crawlproc.run(data, out=out, workers=1, quiet=True, **options)


def test_a_done_file_says_when_by_which_run_and_whether_it_changed(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out)
    found = as_json(str(tree / "a.txt"), out)
    (task,) = found["tasks"]
    assert found["relpath"] == "a.txt" and task["state"] == "done" and task["attempts"] == 1
    assert task["run"]["id"] == 1 and task["run"]["command"] == "run" and task["worker_pid"] > 0
    assert task["changed_since"] is False
    (tree / "a.txt").write_text("one two three\n")
    changed = as_json("a.txt", out, cwd=tmp_path)  # relative to DATA_DIR: not a file of the current folder
    assert changed["tasks"][0]["changed_since"] is True
    code, text, _ = explain("a.txt", "-o", str(out), cwd=tree)  # relative to the current folder
    assert code == 0 and "done" in text and "by run 1 (run" in text and "changed since" in text


def test_a_failed_file_gives_its_error_and_a_retry_that_runs_as_printed(tree, tmp_path):
    out = tmp_path / "my out"
    picky = f"{write_processor(tmp_path, 'picky', PICKY_PROCESSOR)}:picky"
    os.environ["PICKY_FAIL"] = "1"  # the test process runs the coordinator; workers inherit it
    try:
        outcome = run(tree, out, processor=picky, retries=1, retry_delay=0)
    finally:
        del os.environ["PICKY_FAIL"]
    assert outcome.exit_code == 1
    code, text, _ = explain(str(tree / "bad1.txt"), "-o", str(out))
    assert code == 0 and "failed, 2 attempts" in text and "ValueError('picky cannot read bad1.txt')" in text
    retried = run_cli(*retry_hint(text))
    assert retried.returncode == 0, retried.stderr
    assert as_json("bad1.txt", out)["tasks"][0]["state"] == "pending"


FAILS_ON_BAD = """
def fails_on_bad(task):
    if "bad" in task.relpath or task.relpath == "--":
        raise ValueError("cannot read " + task.relpath)
    return {"path": task.relpath}
"""


def retry_hint(text: str) -> list[str]:
    """The `crawlproc retry ...` explain printed, as a shell would split it (without `crawlproc`)."""
    hint = next(line for line in text.splitlines() if "to process it again: " in line).split(": ", 1)[1]
    argv = shlex.split(hint)
    assert argv[:2] == ["crawlproc", "retry"], hint
    return argv[1:]


def failed_relpaths(out: Path) -> set[str]:
    return {task["relpath"] for task in crawlproc.open(out).tasks(state="failed")}


def test_retry_as_explain_prints_it_for_a_name_that_reads_as_an_option(tmp_path):
    data = make_tree(tmp_path / "data", {"-bad.txt": "x\n", "--": "x\n", "bad.txt": "x\n", "ok.txt": "x\n"})
    out = tmp_path / "out"
    proc = f"{write_processor(tmp_path, 'fails', FAILS_ON_BAD)}:fails_on_bad"
    assert run(data, out, processor=proc, retries=0).exit_code == 1
    for name in ("-bad.txt", "--"):
        code, text, _ = explain("-o", str(out), "--", str(data / name))
        assert code == 0 and "failed" in text, text
        argv = retry_hint(text)
        assert argv[-2:] == ["--", name]
        retried = run_cli(*argv)
        assert retried.returncode == 0 and "1 task back to pending" in retried.stderr, retried.stderr
    assert failed_relpaths(out) == {"bad.txt"}  # `retry -o OUT --` alone would have put it back too


def test_a_non_utf8_name_as_failures_prints_it_is_explained_as_retry_reads_it(tmp_path):
    """`failures` shows a byte that is not UTF-8 as \\xNN; retry took that spelling, explain said
    the file had no task."""
    data = make_tree(tmp_path / "data", {"ok.txt": "x\n", "sub/ok.txt": "x\n"})
    (data / os.fsdecode(b"bad\xfe.txt")).write_text("x\n")
    (data / "sub" / os.fsdecode(b"bad\xfe.txt")).write_text("x\n")
    out = tmp_path / "out"
    proc = f"{write_processor(tmp_path, 'fails', FAILS_ON_BAD)}:fails_on_bad"
    assert run(data, out, processor=proc, retries=0).exit_code == 1
    printed = run_cli("failures", "-o", str(out), "--json")
    assert [failure["relpath"] for failure in json.loads(printed.stdout)] == ["bad\\xfe.txt", "sub/bad\\xfe.txt"]
    for relpath, cwd in (("bad\\xfe.txt", None), ("sub/bad\\xfe.txt", data / "sub")):  # also from a folder in it
        code, text, _ = explain(relpath, "-o", str(out), cwd=cwd)
        assert code == 0 and text.startswith(f"{relpath}: 1 task") and "failed" in text, text
        assert run_cli(*retry_hint(text), cwd=cwd).returncode == 0
    assert failed_relpaths(out) == set()


def test_explain_and_retry_read_a_path_alike_from_a_folder_inside_data_dir(tmp_path):
    data = make_tree(tmp_path / "data", {"sub/bad1.txt": "x\n", "sub/bad2.txt": "x\n", "bad3.txt": "x\n",
                                         "sub/ok.txt": "x\n"})
    out = tmp_path / "out"
    proc = f"{write_processor(tmp_path, 'fails', FAILS_ON_BAD)}:fails_on_bad"
    assert run(data, out, processor=proc, retries=0).exit_code == 1
    here = data / "sub"
    code, text, _ = explain("bad1.txt", "-o", str(out), cwd=here)  # relative to the current folder
    assert code == 0 and text.startswith("sub/bad1.txt: 1 task")
    argv = retry_hint(text)
    assert argv[-1] == "sub/bad1.txt"  # as `failures` prints it: relative to DATA_DIR
    code, again, _ = explain(argv[-1], "-o", str(out), cwd=here)  # what explain printed works from here
    assert code == 0 and again.startswith("sub/bad1.txt: 1 task")
    assert run_cli(*argv, cwd=here).returncode == 0  # and so does the retry it printed
    assert run_cli("retry", "-o", str(out), "bad2.txt", cwd=here).returncode == 0  # relative to here
    assert failed_relpaths(out) == {"bad3.txt"}
    assert run_cli("retry", "-o", str(out), "bad3.txt", cwd=here).returncode == 0  # no sub/bad3.txt: DATA_DIR's
    assert failed_relpaths(out) == set()


def test_a_file_without_a_task_names_the_rule_that_left_it_out(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out, exclude=["logs"], include=["*.txt", "*.log"])
    (tree / "new.txt").write_text("new\n")
    (tree / "notes.md").write_text("n\n")
    nested = tree / "old-out"
    run(tree / "keep", nested)  # an OUT inside DATA_DIR: never input
    (nested / "note.txt").write_text("n\n")
    reasons = {path: as_json(str(tree / path), out)["why_no_task"] for path in
               ("logs/x.log", "notes.md", "fifo", "link.txt", "new.txt", "gone.txt", "old-out/note.txt")}
    assert reasons["logs/x.log"] == "left out by the last run's patterns: --exclude 'logs' matches its folder logs/"
    assert reasons["notes.md"] == "left out by the last run's patterns: no --include pattern matches it ('*.txt', '*.log')"
    assert reasons["fifo"].startswith("it is a FIFO, not a regular file")
    assert reasons["link.txt"] == "it is a symlink, not followed without --follow-symlinks"
    assert reasons["new.txt"].startswith("not scanned yet")
    assert reasons["gone.txt"].startswith("no such file under DATA_DIR")
    assert reasons["old-out/note.txt"].startswith("it is inside old-out/, a folder holding a crawlproc ledger")


def test_a_link_out_of_data_dir_is_named_when_links_are_followed(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out, follow_symlinks=True)
    assert as_json(str(tree / "link.txt"), out)["tasks"][0]["state"] == "done"
    reason = as_json(str(tree / "outside" / "hostname"), out)["why_no_task"]
    assert reason.startswith("its folder outside/ is a symlink leading out of DATA_DIR")


def test_symlink_loops_are_named_when_links_are_followed(tree, tmp_path):
    os.mkdir(tree / "d")
    os.symlink("..", tree / "d" / "up")  # back to DATA_DIR: the walk would go round for ever
    os.symlink("ping", tree / "pong")
    os.symlink("pong", tree / "ping")  # links that point at each other
    out = tmp_path / "out"
    run(tree, out, follow_symlinks=True)
    up = as_json(str(tree / "d" / "up"), out)["why_no_task"]
    assert up == "it is a symlink looping back to a folder above it: the walk skips symlink loops"
    through = as_json(str(tree / "d" / "up" / "a.txt"), out)  # the same file as a.txt, which has a task
    assert through["relpath"] == "a.txt" and through["tasks"][0]["state"] == "done"
    (tree / "d" / "up" / "new.txt").write_text("n\n")  # no task under either name yet
    assert as_json(str(tree / "d" / "up" / "new.txt"), out)["why_no_task"].startswith(
        "its folder d/up/ is a symlink looping back to a folder above it")
    assert as_json(str(tree / "ping"), out)["why_no_task"].startswith("it is a symlink in a loop of symlinks")


def test_a_temp_name_in_watch_mode(tree, tmp_path):
    out = tmp_path / "out"
    (tree / "upload.part").write_text("half\n")
    stop = threading.Event()
    stop.set()  # the catch-up records what it finds, then the watch ends
    assert crawlproc.watch(tree, out=out, workers=1, quiet=True, settle=0, stop=stop).exit_code == 0
    reason = as_json("upload.part", out)["why_no_task"]
    assert reason.startswith("a temp name (*.part")


def test_chunks_and_gone_files(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out, chunk_size=128)
    tasks = as_json("big.txt", out)["tasks"]
    assert len(tasks) == 4 and [t["offset"] for t in tasks] == [0, 128, 256, 384]
    (tree / "big.txt").unlink()
    run(tree, out, chunk_size=128)
    code, text, _ = explain("big.txt", "-o", str(out))
    assert code == 0 and "4 tasks" in text and text.count(": gone,") == 4 and "left the output" in text


def test_a_gone_task_whose_file_is_there_names_the_rule_or_says_it_is_back(tree, tmp_path):
    """A file a later run's --exclude left out was 'not found by the last scan (deleted, or ...)',
    though it was there; one made again after the last scan was said to be deleted too."""
    out = tmp_path / "out"
    run(tree, out)
    run(tree, out, exclude=["keep"])
    code, text, _ = explain("keep/b.txt", "-o", str(out))
    assert code == 0 and "gone" in text and "--exclude 'keep' matches its folder keep/" in text, text
    assert "not found by the last scan" not in text
    assert as_json("keep/b.txt", out)["why_no_task"].startswith("left out by the last run's patterns")
    (tree / "a.txt").unlink()
    run(tree, out, exclude=["keep"])
    assert "not found by the last scan (deleted" in explain("a.txt", "-o", str(out))[1]
    (tree / "a.txt").write_text("back\n")
    text = explain("a.txt", "-o", str(out))[1]
    assert "its file is there again" in text and "the next run" in text and "changed since" not in text, text


def test_a_pending_task_waits_for_the_run_going_now_if_there_is_one(tree, tmp_path):
    """'waits for the next run' was said of a task pending in a watch that was running."""
    out = tmp_path / "out"
    run(tree, out)
    assert run_cli("retry", "-o", str(out), "--all", "a.txt").returncode == 0
    assert "waits for the next run" in explain("a.txt", "-o", str(out))[1]
    with out_held(out):
        text = explain("a.txt", "-o", str(out))[1]
    assert f"waits for the run going now (pid {os.getpid()})" in text, text


def test_a_path_outside_data_dir_is_one_line_exit_2(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out)
    code, stdout, stderr = explain(str(tmp_path / "elsewhere.txt"), "-o", str(out))
    assert code == 2 and stdout == "" and len(stderr.splitlines()) == 1
    assert f"is not under DATA_DIR {os.path.realpath(tree)}" in stderr
    code, _, stderr = explain("a.txt", "-o", str(tmp_path / "missing"))
    assert code == 2 and len(stderr.splitlines()) == 1 and "does not exist" in stderr
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "s.txt").write_text("s\n")
    for command in ("explain", "retry"):  # a file next to DATA_DIR, named from their parent folder
        result = run_cli(command, "elsewhere/s.txt", "-o", str(out), cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "elsewhere/s.txt is not under DATA_DIR" in result.stderr  # it was read as DATA_DIR/elsewhere/s.txt


def test_a_followed_symlink_is_compared_by_its_target_as_the_scan_does(tmp_path):
    data = make_tree(tmp_path / "data", {"plain.txt": "plain text"})  # 10 bytes; the link itself is 9
    os.symlink("plain.txt", data / "link-in.txt")
    out = tmp_path / "out"
    run(data, out, follow_symlinks=True)
    assert run(data, out, follow_symlinks=True).processed == 0  # the scan finds the link unchanged
    found = as_json("link-in.txt", out)
    assert found["tasks"][0]["changed_since"] is False
    assert found["on_disk"]["size"] == 10 and found["on_disk"]["followed_to"] == "plain.txt"
    code, text, _ = explain("link-in.txt", "-o", str(out))
    assert code == 0 and "a symlink to plain.txt, followed as the last run did (--follow-symlinks)" in text
    assert "changed since" not in text
    (data / "plain.txt").write_text("plain text, longer")
    code, text, _ = explain("link-in.txt", "-o", str(out))
    assert code == 0 and "its target changed since (size 10 -> 18" in text
    assert run(data, out, follow_symlinks=True).processed == 2  # as explain said: the link and its target


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns))


def local_time(seconds: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def changed_line(out: Path, name: str) -> str:
    code, text, stderr = explain(name, "-o", str(out))
    assert code == 0, stderr
    return next(line.strip() for line in text.splitlines() if "changed since" in line)


def test_a_change_says_what_changed_size_or_modification_time_or_both(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "one two\n"})
    then = 1_600_000_000
    set_mtime(data / "a.txt", then * 10**9)
    out = tmp_path / "out"
    run(data, out)
    set_mtime(data / "a.txt", (then + 3600) * 10**9)
    assert changed_line(out, "a.txt") == (f"the file changed since (modification time {local_time(then)} -> "
                                          f"{local_time(then + 3600)}): the next run processes it again")
    set_mtime(data / "a.txt", then * 10**9 + 250)  # within the same second: the seconds alone would read alike
    assert f"(modification time {local_time(then)}.000000000 -> {local_time(then)}.000000250)" in \
        changed_line(out, "a.txt")
    (data / "a.txt").write_text("one two three\n")
    set_mtime(data / "a.txt", then * 10**9)
    assert "(size 8 -> 14): " in changed_line(out, "a.txt")
    set_mtime(data / "a.txt", (then + 60) * 10**9)
    assert f"(size 8 -> 14, modification time {local_time(then)} -> {local_time(then + 60)}): " in \
        changed_line(out, "a.txt")


def test_data_dir_itself_is_said_to_be_data_dir_as_a_folder_in_it_is(tree, tmp_path):
    out = tmp_path / "out"
    run(tree, out)
    folder_code, folder_text, _ = explain(str(tree / "keep"), "-o", str(out))
    assert folder_text == f"keep: no task in {out}\n  it is a folder: explain a file inside it\n"
    for path, cwd in ((str(tree), None), (f"{tree}/", None), (".", tree), ("data/", tmp_path), ("data", tmp_path)):
        code, text, stderr = explain(path, "-o", str(out), cwd=cwd)
        assert (code, stderr) == (folder_code, "")
        assert text == f"./: no task in {out}\n  it is DATA_DIR itself: explain a file inside it\n"
    assert as_json(".", out, cwd=tree)["why_no_task"] == "it is DATA_DIR itself: explain a file inside it"
    retried = run_cli("retry", "-o", str(out), ".", cwd=tree)  # retry reads PATH as explain does
    assert retried.returncode == 2 and len(retried.stderr.splitlines()) == 1
    assert f"is DATA_DIR {os.path.realpath(tree)} itself: name files inside it" in retried.stderr


@pytest.mark.parametrize("command", [("explain", "a.txt"), ("serve", "--port", "0"), ("status",), ("failures",)])
def test_an_out_that_is_a_file_is_said_to_be_no_folder(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("not an OUT\n")
    result = run_cli(*command, "-o", str(afile))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"crawlproc: OUT {afile} exists and is not a folder"]
