"""OUT on a full disk: stop cleanly with one line, resume once space is freed.

Needs a small tmpfs (root); skipped where mounting is not allowed.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import make_tree, run_cli


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "disk"
    mount.mkdir()
    tried = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                           capture_output=True, timeout=30)
    if tried.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {tried.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def test_full_disk_stops_cleanly_and_the_next_run_resumes(tmp_path, small_disk):
    data = make_tree(tmp_path / "data", {f"d{i % 20}/f{i:04d}.txt": "word " * (i % 60) + "\n"
                                         for i in range(3000)})
    out = small_disk / f"out-{uuid.uuid4().hex[:6]}"
    full = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress")
    assert full.returncode == 1, full.stderr
    assert "Traceback" not in full.stderr
    assert "free some space and run again" in full.stderr.strip().splitlines()[-1]

    subprocess.run(["mount", "-o", "remount,size=32m", str(small_disk)], check=True, timeout=30)
    resumed = run_cli("run", str(data), "-o", str(out), "-w", "2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    clean = tmp_path / "clean"
    assert run_cli("run", str(data), "-o", str(clean), "-w", "2", "-q").returncode == 0
    assert (out / "merged.jsonl").read_bytes() == (clean / "merged.jsonl").read_bytes()
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
