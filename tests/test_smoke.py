"""End to end through a real subprocess: the first thing a user tries."""

from __future__ import annotations

import json

from conftest import run_cli


def test_run_merges_every_file_and_reduces_totals(small_tree, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", str(small_tree), "-o", str(out), "-w", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.txt", "b/c.txt", "b/d/e.log", "empty.txt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reduced"] == {"files": 4, "lines": 5, "words": 7, "bytes": 31}
    assert summary["counts"]["done"] == 4
