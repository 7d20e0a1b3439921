"""The reducer runs in a child beside the merge; whatever the child cannot do, it does here."""

from __future__ import annotations

import fcntl
import io
import json
import os
import threading
from pathlib import Path

import pytest

from conftest import make_tree, run_cli, wait_until
from crawlproc.finalize import merge_results
from crawlproc.ledger import Ledger
from crawlproc.lock import OutLock
from crawlproc.reduction import PIPE_BYTES, Reduction, records_in
from crawlproc.run import RunOptions, run_job

RECORDS = [b'{"n": %d, "text": "line %d"}\n' % (i, i) for i in range(5000)]


def reduce_all(reducer, blocks: list[bytes]):
    reduction = Reduction(reducer)
    try:
        for block in blocks:
            reduction.feed(block)
        return reduction.result(lambda: records_in(io.StringIO(b"".join(blocks).decode())))
    finally:
        reduction.close()


def total(records):
    return {"sum": sum(r["n"] for r in records), "pid": os.getpid()}


def test_the_reducer_runs_in_a_child_on_records_split_anywhere():
    data = b"".join(RECORDS)
    blocks = [data[i:i + 777] for i in range(0, len(data), 777)]  # cuts inside records
    result = reduce_all(total, blocks)
    assert result["sum"] == sum(range(5000))
    assert result["pid"] != os.getpid()


def test_with_another_thread_running_the_reducer_runs_here():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        result = reduce_all(total, [b"".join(RECORDS)])
    finally:
        stop.set()
        thread.join(5)
    assert result == {"sum": sum(range(5000)), "pid": os.getpid()}


def test_a_failing_reducer_fails_here_with_its_own_error():
    def broken(records):
        for record in records:
            if record["n"] == 4000:
                raise ValueError("bad record 4000")
        return "never"

    with pytest.raises(ValueError, match="bad record 4000"):
        reduce_all(broken, [b"".join(RECORDS)])


def test_a_result_that_does_not_pickle_is_computed_here():
    def unpicklable(records):
        n = sum(1 for _ in records)
        return {"n": n, "pid": os.getpid(), "lock": threading.Lock()}

    result = reduce_all(unpicklable, [b"".join(RECORDS)])
    assert result["n"] == 5000 and result["pid"] == os.getpid()


def test_a_child_that_dies_leaves_the_reduction_to_this_process():
    def dies_in_child(records, parent=os.getpid()):
        if os.getpid() != parent:
            os._exit(1)
        return sum(1 for _ in records)

    assert reduce_all(dies_in_child, [b"".join(RECORDS)]) == 5000


def test_what_the_reducer_prints_appears_once_and_buffered_output_is_not_repeated(capfd):
    print("before the merge", end="")  # still in our stdout buffer when the child is forked

    def chatty(records):
        print("reducing")
        return sum(1 for _ in records)

    assert reduce_all(chatty, [b"".join(RECORDS)]) == 5000
    out = capfd.readouterr().out
    assert out.count("before the merge") == 1 and out.count("reducing") == 1


def test_a_merge_given_up_stops_the_child(tmp_path: Path):
    reduction = Reduction(total)
    reduction.feed(RECORDS[0])
    pid = reduction._pid  # noqa: SLF001 - the test checks the real process
    reduction.close()
    assert pid is not None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped: no zombie left


def test_run_summary_has_the_reduced_totals(tmp_path: Path):
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "a b\n" * i for i in range(50)})
    outcome = run_job(RunOptions(data_dir=data, out=tmp_path / "out", workers=1, batch_size=7))
    assert outcome.exit_code == 0
    led = Ledger(tmp_path / "out" / "ledger.db")
    try:
        merged = merge_results(led, tmp_path / "out", tmp_path / "again.jsonl",
                               reducer=lambda records: sum(r["lines"] for r in records))
    finally:
        led.close()
    assert merged.reduced == sum(range(50))


def test_a_merge_reduces_in_a_child_and_the_next_finds_it_unchanged(tmp_path: Path):
    """The merge's signature is counted in a thread beside the copy: the reducer's child is
    forked before that thread starts, and the signature remembered is the one the next merge
    takes, so that merge keeps the output."""
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "a b\n" * i for i in range(50)})
    out, output = tmp_path / "out", tmp_path / "again.jsonl"
    assert run_job(RunOptions(data_dir=data, out=out, workers=1, batch_size=7)).exit_code == 0

    def where_and_lines(records):
        return [os.getpid(), sum(r["lines"] for r in records)]

    led = Ledger(out / "ledger.db")
    try:
        first = merge_results(led, out, output, reducer=where_and_lines, reuse_unchanged=True)
        second = merge_results(led, out, output, reducer=where_and_lines, reuse_unchanged=True)
    finally:
        led.close()
    assert first.reduced[0] != os.getpid() and first.reduced[1] == sum(range(50))
    assert second.unchanged and second.reduced == first.reduced


def test_the_child_does_not_hold_the_lock_on_out(tmp_path: Path):
    """A child still reducing after its coordinator was killed must not keep OUT locked."""
    with OutLock(tmp_path):
        reduction = Reduction(total)
        try:
            pid = reduction._pid  # noqa: SLF001 - the test looks at the real process
            lock = os.path.realpath(tmp_path / "lock")

            def child_fds() -> set[str]:
                return {os.path.realpath(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}

            wait_until(lambda: lock not in child_fds(), 5, "the reducer's child to close the lock")
        finally:
            reduction.close()


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="pipes cannot be made bigger here")
def test_a_whole_block_of_the_merge_reaches_the_child_before_it_reads_any(tmp_path):
    """The merge writes a megabyte at a time: the pipe takes it at once, so the merge copies on
    while the child parses, instead of the two taking turns 64 KB at a time."""
    go = tmp_path / "go"
    block = b"".join(RECORDS * 8)[:PIPE_BYTES]
    block = block[:block.rindex(b"\n") + 1]

    def counts_once_told(records):  # in the child: reads nothing before `go` exists
        wait_until(go.exists, 60, "the go file")
        return sum(1 for _ in records)

    reduction = Reduction(counts_once_told)
    try:
        fed = threading.Thread(target=reduction.feed, args=(block,), daemon=True)
        fed.start()
        fed.join(timeout=30)
        assert not fed.is_alive(), "the block did not fit in the pipe: the merge would wait on the child"
        go.touch()
        assert reduction.result(lambda: records_in(io.StringIO(block.decode()))) == block.count(b"\n")
    finally:
        go.touch()
        reduction.close()


BROKEN_REDUCER = '''
from crawlproc import processor


@processor(version="1")
def words(task):
    return {"path": task.relpath, "words": sum(len(line.split()) for line in task.lines())}


@words.reducer
def total(records):
    return {"words": len(records)}
'''


def test_a_failing_reducer_is_one_line_that_names_it(tmp_path):
    """It said 'internal error: TypeError(...)', exit 1, with no word of whose code it was; a
    reducer that takes len() of its records is an easy mistake."""
    data = make_tree(tmp_path / "data", {"a.txt": "one two\n", "b.txt": "three\n"})
    source = tmp_path / "broken.py"
    source.write_text(BROKEN_REDUCER)
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-p", f"{source}:words", "--no-progress")
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("crawlproc: the reducer total failed: TypeError(") and f"{source}, line 12" in line, line
    assert "internal error" not in line and not (out / "summary.json").exists()
    source.write_text(BROKEN_REDUCER.replace("len(records)", 'sum(r["words"] for r in records)'))
    merged = run_cli("merge", "-o", str(out))
    assert merged.returncode == 0, merged.stderr
    assert json.loads((out / "summary.json").read_text())["reduced"] == {"words": 3}
