"""`crawlproc watch` where inotify cannot see: --poll, and the fallback to it.

The polling tests run a real `crawlproc watch --poll` and change the tree under
it. The fallback tests make the kernel refuse inotify watches or instances for
the watch alone: it runs in a new user namespace (`unshare -U -r`) whose own
limits (/proc/sys/user/max_inotify_*) are lowered there, so nothing outside
that namespace (other tests, other users) is touched. Skipped where user
namespaces are not allowed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import make_tree
from test_watch import DEADLINE, Watch, all_done, proc_spec, query, state_of, wait_until  # noqa: F401

from crawlproc.fsevents import no_events_filesystem

POLL = "0.3"
OLD = 1_600_000_000  # an mtime long past: a file with it is settled at once


def write_old(root: Path, files: dict[str, str]) -> None:
    """Files whose mtime is long past, so a scan records them without waiting to settle."""
    make_tree(root, files)
    for relpath in files:
        os.utime(root / relpath, (OLD, OLD))


def inotify_fds(pid: int) -> int:
    """How many inotify instances the process holds."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:inotify"
        except OSError:
            continue
    return count


# -- --poll ------------------------------------------------------------------------------

def test_poll_finds_new_changed_and_deleted_files_without_inotify(tmp_path, proc_spec):
    data = tmp_path / "data"
    write_old(data, {"a/one.txt": "1\n", "a/two.txt": "2\n", "b/three.txt": "3\n", "gone/x.txt": "x\n"})
    out = tmp_path / "out"
    with Watch(data, out, proc_spec, "--poll", POLL, settle="0.2") as watch:
        wait_until(lambda: all_done(out, ["a/one.txt", "a/two.txt", "b/three.txt", "gone/x.txt"]),
                   "the catch-up", watch=watch)
        assert inotify_fds(watch.pid) == 0
        # Polls of an unchanged tree skip its folders: the fingerprints are recorded.
        wait_until(lambda: {p for (p,) in query(out, "SELECT prefix FROM folders")} >= {b"a/", b"b/"},
                   "folder fingerprints", watch=watch)
        (data / "a" / "new.txt").write_text("new\n")
        (data / "b" / "three.txt").write_text("three, longer\n")
        (data / "a" / "two.txt").unlink()
        shutil.rmtree(data / "gone")
        make_tree(data, {"c/d/deep.txt": "deep\n"})
        wait_until(lambda: all_done(out, ["a/new.txt", "c/d/deep.txt"]), "new files found by a poll", watch=watch)
        wait_until(lambda: query(out, "SELECT size FROM tasks WHERE relpath = 'b/three.txt' AND state = 'done'")
                   == [(14,)], "the changed file processed again", watch=watch)
        wait_until(lambda: state_of(out, "a/two.txt") == "gone" and state_of(out, "gone/x.txt") == "gone",
                   "deleted files gone", watch=watch)
        assert watch.stop(signal.SIGTERM) == 0
    assert "polling" in watch.stderr and "instead of by file events" not in watch.stderr, watch.stderr
    assert query(out, "SELECT relpath FROM tasks WHERE state = 'done' ORDER BY relpath") == [
        ("a/new.txt",), ("a/one.txt",), ("b/three.txt",), ("c/d/deep.txt",)]


def polls(out: Path) -> int:
    """Full scans the running watch has made, as its heartbeat last recorded."""
    rows = query(out, "SELECT json_extract(info, '$.rescans') FROM runs ORDER BY id DESC LIMIT 1")
    return rows[0][0] or 0 if rows else 0


def test_poll_holds_back_a_file_until_it_settled(tmp_path, proc_spec):
    """A file that polls keep finding young is not recorded; once it is older than --settle it is."""
    data = tmp_path / "data"
    write_old(data, {"a.txt": "a\n"})
    out = tmp_path / "out"
    with Watch(data, out, proc_spec, "--poll", POLL, settle="3600") as watch:
        wait_until(lambda: all_done(out, ["a.txt"]), "the catch-up", watch=watch)
        (data / "young.txt").write_text("still being written\n")
        seen = polls(out)
        wait_until(lambda: polls(out) >= seen + 3, "three more polls", watch=watch)
        assert state_of(out, "young.txt") is None
        os.utime(data / "young.txt", (OLD, OLD))
        wait_until(lambda: all_done(out, ["young.txt"]), "the settled file", watch=watch)
        assert watch.stop() == 0


# -- the fallback ---------------------------------------------------------------------------

def _user_namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    tried = subprocess.run(["unshare", "-U", "-r", "sh", "-c", "echo 5 > /proc/sys/user/max_inotify_watches"],
                           capture_output=True, timeout=30)
    return tried.returncode == 0


needs_userns = pytest.mark.skipif(not _user_namespaces(),
                                  reason="needs user namespaces with their own inotify limits (unshare -U -r)")


def limited(setting: str, value: int) -> tuple[str, ...]:
    """A prefix that runs the watch in a user namespace whose inotify `setting` is `value`
    (sh execs it: the watch keeps the pid Watch knows)."""
    return ("unshare", "-U", "-r", "sh", "-c",
            f'echo {value} > /proc/sys/user/{setting} && exec "$0" "$@"')


FALLBACK_POLL = 1.0  # seconds between the scans of a watch that fell back to polling (10 s for a user)


def _fallback_warnings(watch: Watch) -> list[str]:
    return [line for line in watch.stderr.splitlines() if "instead of by file events" in line]


@needs_userns
@pytest.mark.parametrize("setting, value, words", [
    ("max_inotify_watches", 2, "fs.inotify.max_user_watches reached"),
    ("max_inotify_instances", 0, "fs.inotify.max_user_instances reached"),
])
def test_refused_inotify_at_start_falls_back_to_polling(tmp_path, proc_spec, setting, value, words):
    data = tmp_path / "data"
    write_old(data, {f"d{i}/f.txt": f"{i}\n" for i in range(5)})
    out = tmp_path / "out"
    with Watch(data, out, proc_spec, "--rescan-interval", "3600", settle="0.2",
               prefix=limited(setting, value), fallback_poll=FALLBACK_POLL) as watch:
        wait_until(lambda: all_done(out, [f"d{i}/f.txt" for i in range(5)]), "the catch-up", watch=watch)
        wait_until(lambda: _fallback_warnings(watch), "the fallback warning", watch=watch)
        make_tree(data, {"d3/new.txt": "new\n", "e/f/deep.txt": "deep\n"})
        # Found by a poll (every FALLBACK_POLL s), not by a rescan (an hour) nor by events.
        wait_until(lambda: all_done(out, ["d3/new.txt", "e/f/deep.txt"]), "files found by polling",
                   timeout=DEADLINE + 20, watch=watch)
        assert watch.stop() == 0
    warnings = _fallback_warnings(watch)
    assert len(warnings) == 1 and words in warnings[0], watch.stderr
    assert "sysctl -w fs.inotify.max_user_" in warnings[0]
    assert "Traceback" not in watch.stderr


@needs_userns
def test_watch_limit_reached_by_a_new_folder_falls_back_to_polling(tmp_path, proc_spec):
    """Enough watches for the tree at the start, none for the folders made later."""
    data = tmp_path / "data"
    write_old(data, {"a/f.txt": "a\n", "b/f.txt": "b\n"})
    out = tmp_path / "out"
    with Watch(data, out, proc_spec, "--rescan-interval", "3600", settle="0.2",
               prefix=limited("max_inotify_watches", 3), fallback_poll=FALLBACK_POLL) as watch:
        wait_until(lambda: all_done(out, ["a/f.txt", "b/f.txt"]), "the catch-up", watch=watch)
        assert inotify_fds(watch.pid) == 1
        assert not _fallback_warnings(watch)
        (data / "c").mkdir()
        (data / "c" / "d").mkdir()
        make_tree(data, {"c/d/late.txt": "late\n"})
        wait_until(lambda: _fallback_warnings(watch), "the fallback warning", watch=watch)
        make_tree(data, {"c/d/later.txt": "later\n"})
        wait_until(lambda: all_done(out, ["c/d/late.txt", "c/d/later.txt"]), "files in unwatched folders",
                   timeout=DEADLINE + 20, watch=watch)
        assert watch.stop() == 0
    warnings = _fallback_warnings(watch)
    assert len(warnings) == 1 and "is not watched" in warnings[0], watch.stderr


# -- file systems that send no events ----------------------------------------------------------

def test_network_file_systems_are_told_from_mountinfo(tmp_path):
    data = tmp_path / "data"
    (data / "sub" / "share").mkdir(parents=True)
    real = os.path.realpath(data).replace(" ", "\\040")
    mountinfo = tmp_path / "mountinfo"

    def told(*mounts: tuple[str, str]) -> str | None:
        mountinfo.write_text("".join(f"{i} 1 0:{i} / {point} rw - {fstype} src rw\n"
                                     for i, (point, fstype) in enumerate(mounts, 20)))
        return no_events_filesystem(os.fsencode(data), str(mountinfo))

    assert told(("/", "ext4")) is None
    assert told(("/", "ext4"), (real, "fuse.fuse-overlayfs")) is None  # a local FUSE does send events
    assert "is on nfs4" in told(("/", "ext4"), (real, "nfs4"))
    assert "is on nfs" in told(("/", "nfs"))
    inside = told(("/", "ext4"), (f"{real}/sub/share", "cifs"))
    assert inside is not None and "sub/share inside" in inside and "cifs" in inside
    assert "fuse.sshfs" in told(("/", "ext4"), (os.path.dirname(real), "fuse.sshfs"))
    assert told(("/", "ext4"), (f"{real}-other", "nfs")) is None  # a sibling, not DATA_DIR
    assert no_events_filesystem(os.fsencode(data), str(tmp_path / "missing")) is None
