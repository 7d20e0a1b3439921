"""Files that change under a run, and OUTs that cannot be used: a clear line, nothing lost."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tree, query_ledger, run_cli

TOUCHY = '''
import os
from crawlproc import processor

@processor(version="1")
def touchy(task):
    """Appends to its own file while processing it: once per file, or on every try with TOUCH_ALWAYS."""
    data = task.read_bytes()
    marker = task.path + ".touched"
    if task.relpath.startswith("touch") and (os.environ.get("TOUCH_ALWAYS") or not os.path.exists(marker)):
        with open(task.path, "ab") as f:
            f.write(b"more\\n")
        open(marker, "w").close()
    return {"path": task.relpath, "bytes": len(data)}
'''


@pytest.fixture
def touchy(tmp_path: Path) -> str:
    path = tmp_path / "touchy.py"
    path.write_text(TOUCHY)
    return f"{path}:touchy"


def test_file_changed_while_processed_is_processed_again_with_its_new_content(tmp_path, touchy):
    data = make_tree(tmp_path / "data", {"touch.txt": "one\n", "plain.txt": "two\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "-p", touchy,
                     "--include", "*.txt", "--retry-delay", "0")
    assert result.returncode == 0, result.stderr
    records = {r["path"]: r for r in map(json.loads, (out / "merged.jsonl").read_text().splitlines())}
    assert records["touch.txt"]["bytes"] == len("one\nmore\n")  # not the stale first reading
    rows = dict(query_ledger(out, "SELECT relpath, attempts FROM tasks"))
    assert rows == {"touch.txt": 2, "plain.txt": 1}


def test_file_rewritten_on_every_try_ends_failed_not_in_a_loop(tmp_path, touchy):
    data = make_tree(tmp_path / "data", {"touch.txt": "one\n", "plain.txt": "two\n"})
    out = tmp_path / "out"
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q", "-p", touchy, "--include", "*.txt",
                     "--retries", "2", "--retry-delay", "0", env={"TOUCH_ALWAYS": "1"}, timeout=60)
    assert result.returncode == 1, result.stderr
    failures = json.loads(run_cli("failures", "-o", str(out), "--json").stdout)
    assert [(f["relpath"], f["attempts"]) for f in failures] == [("touch.txt", 3)]
    assert "changed while it was processed" in failures[0]["error"]


def test_damaged_ledger_is_rebuilt_never_restarted_from_zero(tmp_path):
    """Rebuilt from the result files (tests/test_rebuild.py has the details); refused without them."""
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "x\n" * i for i in range(50)})
    out = tmp_path / "out"
    assert run_cli("run", str(data), "-o", str(out), "-w", "1", "-q").returncode == 0
    ledger = out / "ledger.db"
    raw = bytearray(ledger.read_bytes())
    raw[4096:8192] = b"\xff" * 4096  # a page of the tasks table, as a bad disk would leave it
    ledger.write_bytes(bytes(raw))
    for wal in (out / "ledger.db-wal", out / "ledger.db-shm"):
        wal.unlink(missing_ok=True)
    result = run_cli("run", str(data), "-o", str(out), "-w", "1", "-q")
    assert result.returncode == 0, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"{ledger} was damaged" in result.stderr and "(50 done tasks kept)" in result.stderr
    assert json.loads((out / "summary.json").read_text())["timings"]["tasks_done_this_run"] == 0
    aside = [p for p in out.glob("ledger.db.damaged-*") if not p.name.endswith(("-wal", "-shm"))]
    assert [p.read_bytes() for p in aside] == [bytes(raw)]  # kept as found, for whoever wants to rescue it


def test_out_that_is_not_writable_is_one_line_exit_2(tmp_path):
    setpriv = shutil.which("setpriv")
    data = make_tree(tmp_path / "data", {"a.txt": "a\n"})
    out = tmp_path / "readonly-out"
    out.mkdir()
    out.chmod(0o555)
    command = [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-q"]
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that allows it
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        command = [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
                   "--", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not writable" in result.stderr
