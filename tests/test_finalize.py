"""The finalizer: merged output from crc-checked result ranges, damaged results redone, summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import make_tree
from crawlproc.cli import cli
from crawlproc.finalize import merge_results
from crawlproc.ledger import Ledger
from crawlproc.results import result_path
from crawlproc.run import RunOptions, run_job

FILES = {
    "a.txt": "one two\nthree\n",
    "a/b.txt": "nested\n",
    "a-b.txt": "dash\n",
    "B.txt": "upper case B\n",
    "c/d/e.log": "hello world\nbye",
    "empty.txt": "",
    "\u00e4.txt": "umlaut\n",
    "z.txt": "last one\n" * 3,
}


def options(data: Path, out: Path, **kw) -> RunOptions:
    kw.setdefault("workers", 1)
    kw.setdefault("batch_size", 2)
    return RunOptions(data_dir=data, out=out, **kw)


@pytest.fixture
def job(tmp_path: Path):
    """A finished small run: (data, out, merged bytes)."""
    data = make_tree(tmp_path / "data", FILES)
    out = tmp_path / "out"
    outcome = run_job(options(data, out))
    assert outcome.exit_code == 0, outcome.message
    return data, out, (out / "merged.jsonl").read_bytes()


def done_rows(out: Path) -> list[dict]:
    led = Ledger(out / "ledger.db", readonly=True)
    try:
        cursor = led.conn.execute(
            "SELECT id, relpath, state, batch_id, result_offset, result_length FROM tasks ORDER BY path_bytes")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r)) for r in cursor]
    finally:
        led.close()


def merge_without_publishing(out: Path):
    led = Ledger(out / "ledger.db")
    try:
        return merge_results(led, out, out / "merged.jsonl", publish_if_damaged=False)
    finally:
        led.close()


def pending(out: Path) -> set[str]:
    return {r["relpath"] for r in done_rows(out) if r["state"] == "pending"}


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")]


# -- the merged output ------------------------------------------------------------------------

def test_merged_output_has_every_record_once_in_relpath_byte_order(job):
    data, out, merged = job
    records = [json.loads(line) for line in merged.decode("utf-8").splitlines()]
    paths = [r["path"] for r in records]
    assert paths == sorted(FILES, key=lambda p: p.encode())
    by_path = {r["path"]: r for r in records}
    assert by_path["c/d/e.log"] == {"path": "c/d/e.log", "lines": 2, "words": 3, "bytes": 15}
    assert by_path["empty.txt"] == {"path": "empty.txt", "lines": 0, "words": 0, "bytes": 0}
    assert merged.endswith(b"\n") and merged.count(b"\n") == len(FILES)


def test_summary_has_counts_timings_and_reduced_totals(job):
    data, out, merged = job
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"pending": 0, "running": 0, "done": len(FILES), "failed": 0, "gone": 0}
    assert summary["total"] == len(FILES)
    assert summary["processor"] == "linecount" and summary["processor_version"] == "1"
    assert summary["timings"]["tasks_done_this_run"] == len(FILES)
    contents = [c.encode() for c in FILES.values()]
    assert summary["reduced"] == {
        "files": len(FILES),
        "lines": sum(c.count(b"\n") + (1 if c and not c.endswith(b"\n") else 0) for c in contents),
        "words": sum(len(c.split()) for c in contents),
        "bytes": sum(len(c) for c in contents),
    }
    assert Path(summary["merged_output"]) == out / "merged.jsonl"
    assert temp_files(out) == []


def test_summary_and_merged_are_replaced_atomically_not_rewritten(job):
    data, out, merged = job
    (data / "new.txt").write_text("new file\n")
    with open(out / "summary.json", "rb") as old_summary, open(out / "merged.jsonl", "rb") as old_merged:
        old_summary_bytes = (out / "summary.json").read_bytes()
        old_ids = (os.fstat(old_summary.fileno()).st_ino, os.fstat(old_merged.fileno()).st_ino)
        assert run_job(options(data, out)).exit_code == 0
        # The old files were renamed over, never truncated in place: a reader keeps a whole file.
        assert old_summary.read() == old_summary_bytes
        assert old_merged.read() == merged
        new_ids = ((out / "summary.json").stat().st_ino, (out / "merged.jsonl").stat().st_ino)
    assert old_ids[0] != new_ids[0] and old_ids[1] != new_ids[1]
    assert json.loads((out / "summary.json").read_text())["counts"]["done"] == len(FILES) + 1
    paths = [json.loads(line)["path"] for line in (out / "merged.jsonl").read_text().splitlines()]
    assert "new.txt" in paths and len(paths) == len(FILES) + 1
    assert temp_files(out) == []


# -- damaged results ---------------------------------------------------------------------------

def test_deleted_result_file_requeues_exactly_its_tasks_and_publishes_nothing(job):
    data, out, merged = job
    rows = done_rows(out)
    victim = next(r for r in rows if r["relpath"] == "a/b.txt")
    affected = {r["relpath"] for r in rows if r["batch_id"] == victim["batch_id"]}
    merged_inode = (out / "merged.jsonl").stat().st_ino
    result_path(out, victim["batch_id"]).unlink()

    outcome = merge_without_publishing(out)

    assert not outcome.published
    assert outcome.damaged == len(affected)
    assert pending(out) == affected
    assert {r["relpath"] for r in done_rows(out) if r["state"] == "done"} == set(FILES) - affected
    assert (out / "merged.jsonl").read_bytes() == merged  # nothing published
    assert (out / "merged.jsonl").stat().st_ino == merged_inode
    assert temp_files(out) == []

    again = run_job(options(data, out))
    assert again.exit_code == 0
    assert again.summary["timings"]["tasks_done_this_run"] == len(affected)
    assert (out / "merged.jsonl").read_bytes() == merged


def test_truncated_result_file_requeues_only_the_cut_task(job):
    data, out, merged = job
    rows = done_rows(out)
    batches: dict[int, list[dict]] = {}
    for r in rows:
        batches.setdefault(r["batch_id"], []).append(r)
    batch_id, members = next((b, m) for b, m in batches.items() if len(m) >= 2)
    members.sort(key=lambda r: r["result_offset"])
    last = members[-1]
    path = result_path(out, batch_id)
    os.truncate(path, last["result_offset"] + last["result_length"] - 1)

    outcome = merge_without_publishing(out)

    assert (outcome.published, outcome.damaged) == (False, 1)
    assert pending(out) == {last["relpath"]}
    assert (out / "merged.jsonl").read_bytes() == merged
    assert run_job(options(data, out)).exit_code == 0
    assert (out / "merged.jsonl").read_bytes() == merged


def test_one_corrupt_byte_requeues_only_that_task(job):
    data, out, merged = job
    victim = next(r for r in done_rows(out) if r["relpath"] == "c/d/e.log")
    path = result_path(out, victim["batch_id"])
    content = bytearray(path.read_bytes())
    position = victim["result_offset"] + victim["result_length"] // 2
    content[position] ^= 0x01
    path.write_bytes(bytes(content))

    outcome = merge_without_publishing(out)

    assert (outcome.published, outcome.damaged) == (False, 1)
    assert pending(out) == {"c/d/e.log"}
    assert (out / "merged.jsonl").read_bytes() == merged
    assert run_job(options(data, out)).exit_code == 0
    assert (out / "merged.jsonl").read_bytes() == merged


def test_run_redoes_damaged_results_before_it_merges(job):
    data, out, merged = job
    victim = next(r for r in done_rows(out) if r["relpath"] == "z.txt")
    path = result_path(out, victim["batch_id"])
    same_batch = {r["relpath"] for r in done_rows(out) if r["batch_id"] == victim["batch_id"]}
    path.unlink()
    outcome = run_job(options(data, out))  # nothing changed in DATA_DIR: only the merge notices
    assert outcome.exit_code == 0
    assert outcome.summary["timings"]["tasks_done_this_run"] == len(same_batch)
    assert outcome.summary["counts"]["done"] == len(FILES)
    assert (out / "merged.jsonl").read_bytes() == merged


def test_clean_merge_publishes_and_keeps_tasks_done(job):
    data, out, merged = job
    (out / "merged.jsonl").unlink()
    outcome = merge_without_publishing(out)
    assert outcome.published and outcome.damaged == 0 and outcome.tasks == len(FILES)
    assert (out / "merged.jsonl").read_bytes() == merged
    assert pending(out) == set()


def test_result_files_no_done_task_refers_to_are_removed(job):
    data, out, merged = job
    orphan = result_path(out, 999_999)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b'{"stale": true}\n')
    temp = result_path(out, 5).with_name(".000000005.jsonl.12345.tmp")
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"half")
    assert run_job(options(data, out)).exit_code == 0
    assert not orphan.exists() and not temp.exists()
    assert (out / "merged.jsonl").read_bytes() == merged
    live = {r["batch_id"] for r in done_rows(out)}
    assert all(result_path(out, b).exists() for b in live)


def test_a_merge_with_nothing_changed_keeps_the_output_and_knows_its_result_files(job):
    data, out, merged = job
    needed: dict[int, int] = {}
    for r in done_rows(out):
        if r["result_length"]:
            needed[r["batch_id"]] = max(needed.get(r["batch_id"], 0), r["result_offset"] + r["result_length"])
    led = Ledger(out / "ledger.db")
    try:
        kept = merge_results(led, out, out / "merged.jsonl", reuse_unchanged=True)
        assert kept.unchanged and kept.batches == needed
        assert (out / "merged.jsonl").read_bytes() == merged
        # A result file it needs is gone: no reuse, and the full merge finds the damage.
        result_path(out, min(needed)).unlink()
        again = merge_results(led, out, out / "merged.jsonl", reuse_unchanged=True, publish_if_damaged=False)
        assert not again.unchanged and not again.published and again.damaged > 0
    finally:
        led.close()


# -- `crawlproc merge` alone ----------------------------------------------------------------------

def test_merge_command_regenerates_merged_identically(job):
    data, out, merged = job
    (out / "merged.jsonl").unlink()
    (out / "summary.json").unlink()
    result = CliRunner().invoke(cli, ["merge", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (out / "merged.jsonl").read_bytes() == merged
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == len(FILES)
    assert summary["reduced"]["files"] == len(FILES)


def test_merge_command_with_output_file(job, tmp_path):
    data, out, merged = job
    target = tmp_path / "elsewhere" / "all.jsonl"
    result = CliRunner().invoke(cli, ["merge", "-o", str(out), "--output", str(target)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert target.read_bytes() == merged


def test_merge_command_reports_damaged_results(job):
    data, out, merged = job
    victim = next(r for r in done_rows(out) if r["relpath"] == "a.txt")
    result_path(out, victim["batch_id"]).unlink()
    same_batch = {r["relpath"] for r in done_rows(out) if r["batch_id"] == victim["batch_id"]}
    result = CliRunner().invoke(cli, ["merge", "-o", str(out)], catch_exceptions=False)
    assert "damaged" in result.stderr
    assert pending(out) == same_batch
    assert run_job(options(data, out)).exit_code == 0
    assert (out / "merged.jsonl").read_bytes() == merged


# -- byte-range tasks (--chunk-size) ---------------------------------------------------------------

def test_chunked_records_are_merged_by_relpath_then_offset(tmp_path):
    big = "".join(f"line {i} " + "w " * (i % 7) + "\n" for i in range(200))
    data = make_tree(tmp_path / "data", {"a.txt": "small\n", "big.log": big, "c.txt": "x y\n"})
    out = tmp_path / "out"
    outcome = run_job(options(data, out, processor="sha256", chunk_size=256, workers=2, batch_size=3))
    assert outcome.exit_code == 0, outcome.message
    records = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    keys = [(r["path"], r.get("offset", 0)) for r in records]
    assert keys == sorted(keys)
    chunks = [r for r in records if r["path"] == "big.log"]
    assert [r["offset"] for r in chunks] == list(range(0, len(big), 256))
    assert sum(r["size"] for r in chunks) == len(big)
    assert [r["path"] for r in records if r["path"] != "big.log"] == ["a.txt", "c.txt"]


def test_chunked_linecount_reduces_to_exact_totals(tmp_path):
    big = "".join(f"{i} " * (i % 5) + "\n" for i in range(300)) + "tail without newline"
    files = {"big.txt": big, "crlf.txt": "a b\r\n" * 100, "small.txt": "one\n"}
    data = make_tree(tmp_path / "data", files)
    whole = run_job(options(data, tmp_path / "whole"))
    chunked = run_job(options(data, tmp_path / "chunked", chunk_size=100, workers=2))
    assert whole.exit_code == chunked.exit_code == 0
    assert chunked.summary["total"] > whole.summary["total"]  # really split
    assert chunked.summary["reduced"] == whole.summary["reduced"]
    assert whole.summary["reduced"]["files"] == len(files)


def test_chunked_merged_output_is_identical_across_workers_and_batches(tmp_path):
    big = "".join(f"row {i}\n" for i in range(400))
    data = make_tree(tmp_path / "data", {"big.txt": big, "z.txt": "z\n"})
    outputs = []
    for i, (workers, batch) in enumerate([(1, None), (2, 1), (2, 5)]):
        out = tmp_path / f"out{i}"
        assert run_job(options(data, out, chunk_size=200, workers=workers, batch_size=batch)).exit_code == 0
        outputs.append((out / "merged.jsonl").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
