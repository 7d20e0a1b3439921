"""`crawlproc explain PATH`: why one file was or was not processed, from OUT's ledger and the tree now.

    PATH ─> its relpath under OUT's DATA_DIR (given_paths.relpath_under, as `retry` reads it)
      ├─ tasks in the ledger: state, attempts, last error; for a done one when it was done, by
      │   which run and worker, and whether the file changed since (size, mtime against the tree;
      │   for a symlink the last run followed, its target's, as that run's scan recorded them)
      └─ no task: the first rule a scan applies that leaves it out, checked as a scan checks it
          (walk.PathFilter, the walk's symlink and special-file rules, OUT folders, watch's temp
          names), or "not scanned yet"

A PATH that is not under DATA_DIR is a UsageError (exit 2); DATA_DIR itself is answered like
any folder in it. Read-only: the ledger is opened read-only and the tree is only stat'ed.
"""

from __future__ import annotations

import errno
import os
import shlex
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from crawlproc.errors import UsageError
from crawlproc.given_paths import DATA_DIR_ITSELF, inside, path_argument, relpath_under
from crawlproc.ledger import Ledger
from crawlproc.listing import FILE, holds_crawlproc_ledger
from crawlproc.lock import running_pid
from crawlproc.report import read_ledger
from crawlproc.task import relpath_for_people
from crawlproc.walk import SKIP_KINDS, PathFilter, judge_entry, kind_name

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass
class Explanation:
    path: str  # as given
    relpath: str  # under DATA_DIR, for people
    data_dir: str
    out: str
    # {"kind": file|folder|symlink|FIFO|...|missing, "size", "mtime_ns"}; a symlink the last run followed
    # also has "followed_to" (its target), and its target's size and mtime_ns (None: not a file to a scan)
    on_disk: dict[str, Any]
    tasks: list[dict[str, Any]] = field(default_factory=list)  # ledger rows, each with "run" and "changed_since"
    why_no_task: str | None = None  # the rule that leaves it out: it has no task, or only gone ones and is there
    lines: list[str] = field(default_factory=list)  # the whole story, for people

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def explain(path: str, out: Path) -> Explanation:
    ledger = read_ledger(out)
    try:
        meta = ledger.meta()
        data_dir = meta.get("data_dir")
        if not data_dir:
            raise UsageError(f"OUT {out} has no run yet: nothing to explain")
        relpath = relpath_under(path, data_dir, out, has_task=lambda name: ledger.file_named(name) is not None)
        if relpath == DATA_DIR_ITSELF:
            return _data_dir_itself(path, data_dir, out)
        relpath = ledger.file_named(relpath) or relpath  # \xNN for a byte, as `failures` printed it
        root = os.fsencode(data_dir)
        settings = ledger.scan_settings()
        on_disk = _on_disk(os.path.join(root, relpath), root, _followed_links(settings))
        found = Explanation(path, relpath_for_people(relpath), data_dir, str(out), on_disk)
        found.tasks = [_with_history(ledger, task, on_disk) for task in ledger.tasks_of(relpath)]
        if found.tasks:
            if on_disk["kind"] != "missing" and any(task["state"] == "gone" for task in found.tasks):
                found.why_no_task = _why_no_task(ledger, relpath, root, on_disk, out, settings)
            found.lines = _task_lines(found, out)
        else:
            found.why_no_task = _why_no_task(ledger, relpath, root, on_disk, out, settings)
            found.lines = _no_task_lines(found, out)
        return found
    finally:
        ledger.close()


def _data_dir_itself(path: str, data_dir: str, out: Path) -> Explanation:
    """DATA_DIR is answered as a folder inside it is: no task, and why."""
    root = os.fsencode(data_dir)
    found = Explanation(path, "./", data_dir, str(out), _on_disk(root, root, follow_links=False),
                        why_no_task="it is DATA_DIR itself: explain a file inside it")
    found.lines = _no_task_lines(found, out)
    return found


def _no_task_lines(found: Explanation, out: Path) -> list[str]:
    return [f"{found.relpath}: no task in {out}", f"  {found.why_no_task}"]


def _followed_links(settings: dict[str, Any] | None) -> bool:
    """The last run's --follow-symlinks (False for an OUT made before it was kept)."""
    return bool(settings and settings.get("follow_symlinks"))


# -- where PATH is -------------------------------------------------------------------------------

def _on_disk(full: bytes, root: bytes, follow_links: bool) -> dict[str, Any]:
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        return {"kind": "missing", "size": None, "mtime_ns": None}
    except OSError as exc:
        return {"kind": f"unreadable ({exc.strerror})", "size": None, "mtime_ns": None}
    if stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISDIR(st.st_mode):
        kind = "folder"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = kind_name(st.st_mode)
    found = {"kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if kind == "symlink" and follow_links:
        found.update(_as_followed(full, root))
    return found


def _as_followed(link: bytes, root: bytes) -> dict[str, Any]:
    """A link as a scan that follows links records it (walk.judge_entry): the size and mtime of
    the regular file it reaches inside DATA_DIR, not the link's own; None when a scan would not
    take it as a file (it leads out of DATA_DIR, nowhere, round a loop, or to a folder or FIFO)."""
    real_root = os.path.realpath(root)
    target = os.path.realpath(link)
    verdict = judge_entry(link, real_root, follow=True)
    st = verdict.st if verdict.kind == FILE else None
    shown = relpath_for_people(os.path.relpath(target, real_root)) if inside(target, real_root) else os.fsdecode(target)
    return {"followed_to": shown, "size": st.st_size if st else None, "mtime_ns": st.st_mtime_ns if st else None}


# -- a file with tasks -----------------------------------------------------------------------------

def _with_history(ledger: Ledger, task: dict[str, Any], on_disk: dict[str, Any]) -> dict[str, Any]:
    run = ledger.run_at(task["finished_at"]) if task["finished_at"] else None
    changed = None
    if on_disk["kind"] == "file" or (on_disk["kind"] == "symlink" and on_disk["size"] is not None):
        changed = _current_stat(on_disk) != (task["size"], task["mtime_ns"])
    return {**task, "run": run and {k: run[k] for k in ("id", "command", "pid", "started", "finished")},
            "changed_since": changed}


def _current_stat(on_disk: dict[str, Any]) -> tuple[int, int]:
    return on_disk["size"], on_disk["mtime_ns"]


def _task_lines(found: Explanation, out: Path) -> list[str]:
    quoted_out = shlex.quote(str(out))
    lines = [f"{found.relpath}: {len(found.tasks)} task{'s' if len(found.tasks) > 1 else ''} in {out}"]
    if "followed_to" in found.on_disk:
        lines.append(f"  a symlink to {found.on_disk['followed_to']}, followed as the last run did "
                     "(--follow-symlinks): its target's size and mtime are what a scan compares")
    for task in found.tasks:
        where = "" if task["length"] is None else f" bytes {task['offset']}-{task['offset'] + task['length']}"
        lines.append(f"  task {task['id']}{where}: {task['state']}, {task['attempts']} attempt"
                     f"{'' if task['attempts'] == 1 else 's'}")
        lines += [f"    {line}" for line in _state_lines(task, found, quoted_out)]
    return lines


def _state_lines(task: dict[str, Any], found: Explanation, quoted_out: str) -> list[str]:
    state, lines = task["state"], []
    if state == "done":
        run = task["run"]
        by = f" by run {run['id']} ({run['command']}, pid {run['pid']})" if run else ""
        lines.append(f"done {_when(task['finished_at'])}{by}, worker pid {task['worker_pid']}, "
                     f"in {task['elapsed_s'] or 0:.3f}s; its records are in result batch {task['batch_id']}")
    elif state == "failed":
        lines.append(f"failed: {task['error']}")
        lines.append(f"to process it again: crawlproc retry -o {quoted_out} {path_argument(found.relpath)}")
    elif state == "pending":
        if task["error"]:
            lines.append(f"last attempt failed: {task['error']}")
        due = task["not_before"] or 0
        holder = running_pid(Path(found.out))
        then = f"the run going now (pid {holder})" if holder else "the next run"
        lines.append(f"waits for a retry, not before {_when(due)}, by {then}" if due > time.time()
                     else f"waits for {then}")
    elif state == "running":  # a first run records the tasks its scan finds as its own at once
        lines.append("claimed by the run going now (waiting for a worker, or being processed), or left so "
                     f"by a run that stopped (see crawlproc status -o {quoted_out})")
    elif state == "gone":
        lines.append(_gone_line(found))
    if task["changed_since"] and state != "gone":  # a gone task's line says what comes next already
        what = "its target" if "followed_to" in found.on_disk else "the file"
        lines.append(f"{what} changed since ({_what_changed(task, found.on_disk)}): the next run processes it again")
    elif task["changed_since"] is None and state != "gone":
        lines.append(_no_longer_a_file(found.on_disk))
    return lines


def _what_changed(task: dict[str, Any], on_disk: dict[str, Any]) -> str:
    """'size 10 -> 9', 'modification time A -> B', or both: what a scan finds differ from the task."""
    changes = []
    if task["size"] != on_disk["size"]:
        changes.append(f"size {task['size']} -> {on_disk['size']}")
    if task["mtime_ns"] != on_disk["mtime_ns"]:
        changes.append("modification time {} -> {}".format(*_readable_mtimes(task["mtime_ns"], on_disk["mtime_ns"])))
    return ", ".join(changes)


def _readable_mtimes(old_ns: int | None, new_ns: int | None) -> tuple[str, str]:
    """Both as local times; with their nanoseconds when they fall in the same second (else they would
    read alike, as a file rewritten within a second does)."""
    same_second = None not in (old_ns, new_ns) and old_ns // 10**9 == new_ns // 10**9
    return _local_time_ns(old_ns, same_second), _local_time_ns(new_ns, same_second)


def _local_time_ns(ns: int | None, to_the_ns: bool) -> str:
    if ns is None:
        return "unknown"
    text = time.strftime(TIME_FORMAT, time.localtime(ns // 10**9))
    return f"{text}.{ns % 10**9:09d}" if to_the_ns else text


def _no_longer_a_file(on_disk: dict[str, Any]) -> str:
    """Why a task's file has no size and mtime to compare now."""
    kind = on_disk["kind"]
    if kind == "missing":
        return "the file is no longer in DATA_DIR: the next scan drops its records from the output"
    if "followed_to" in on_disk:
        return (f"it links to {on_disk['followed_to']} now, which a scan does not take as a file "
                "(a folder, a special file, a missing target or one outside DATA_DIR)")
    return f"it is a {kind} now, no longer a regular file"


def _gone_line(found: Explanation) -> str:
    """Why a task is gone: its file is not there, or it is and a rule now leaves it out."""
    if found.why_no_task is None:
        return ("its file was not found by the last scan (deleted, or no longer selected by --include/--exclude): "
                "its records left the output")
    if found.why_no_task == NOT_SCANNED_YET:
        return ("its file is there again (made, or selected, after the last scan): the next run (or watch's next "
                "event or rescan) processes it")
    return f"its file is there, but left out: {found.why_no_task}; its records left the output"


def _when(timestamp: float | None) -> str:
    return "at an unknown time" if not timestamp else time.strftime(TIME_FORMAT, time.localtime(timestamp))


# -- a file without a task: the first rule of a scan that leaves it out ---------------------------------

NOT_SCANNED_YET = "not scanned yet: the next run (or watch's next event or rescan) records it"  # no rule does

def _why_no_task(ledger: Ledger, relpath: bytes, root: bytes, on_disk: dict[str, Any], out: Path,
                 settings: dict[str, Any] | None) -> str:
    last = ledger.last_run()
    checks = (  # in the order a walk applies them: an entry's kind and links before any pattern
        lambda: _folder_problem(ledger, relpath),
        lambda: _link_on_the_way(relpath, root, settings),
        lambda: _not_a_regular_file(relpath, root, on_disk, settings),
        lambda: _by_patterns(relpath, settings),
        lambda: _in_an_out(relpath, root, out),
        lambda: _temp_name(relpath, last),
    )
    for check in checks:
        reason = check()
        if reason:
            return reason
    if on_disk["kind"] == "missing":
        return "no such file under DATA_DIR now, and no scan ever recorded one there"
    if on_disk["kind"] == "folder":
        return "it is a folder: explain a file inside it"
    return NOT_SCANNED_YET


def _folder_problem(ledger: Ledger, relpath: bytes) -> str | None:
    shown = relpath_for_people(relpath)
    for problem in ledger.scan_problems():
        folder = problem["relpath"]
        if folder in ("./", shown) or (folder.endswith("/") and shown.startswith(folder)):
            return f"the last scan could not read {folder}: {problem['error']}"
    return None


def _in_an_out(relpath: bytes, root: bytes, out: Path) -> str | None:
    """Inside this OUT, or inside any folder holding a crawlproc ledger: never input."""
    parts = relpath.split(b"/")
    ours = os.path.realpath(out)
    for depth in range(1, len(parts)):
        folder = os.path.join(root, *parts[:depth])
        if os.path.realpath(folder) == os.fsencode(ours) or holds_crawlproc_ledger(folder):
            return (f"it is inside {relpath_for_people(b'/'.join(parts[:depth]))}/, a folder holding a crawlproc "
                    "ledger (an OUT): never input")
    return None


def _link_on_the_way(relpath: bytes, root: bytes, settings: dict[str, Any] | None) -> str | None:
    """A folder of its path, or the file itself, that is a symlink the walk would not go through."""
    follow = _followed_links(settings)
    parts = relpath.split(b"/")
    real_root = os.path.realpath(root)
    for depth in range(1, len(parts) + 1):
        here = os.path.join(root, *parts[:depth])
        if not os.path.islink(here):
            continue
        shown = relpath_for_people(b"/".join(parts[:depth]))
        what = "it is a symlink" if depth == len(parts) else f"its folder {shown}/ is a symlink"
        target = os.path.realpath(here)
        if not follow:
            return f"{what}, {SKIP_KINDS['symlinks'][2]}"
        if not inside(target, real_root):
            return f"{what} {SKIP_KINDS['links_outside'][2]} ({os.fsdecode(target)})"
        try:
            reached = os.stat(here)
        except FileNotFoundError:
            return f"{what} {SKIP_KINDS['broken_links'][2]}"
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{what} in a loop of symlinks that point at each other: the walk skips it"
            raise
        if stat.S_ISDIR(reached.st_mode) and _one_of_its_parents(reached, root, parts[:depth - 1]):
            return f"{what} looping back to a folder above it: the walk skips symlink loops"
    return None


def _one_of_its_parents(folder: os.stat_result, root: bytes, parents: list[bytes]) -> bool:
    """`folder` is DATA_DIR or a folder on the way down to it (a walk would enter it again)."""
    for depth in range(len(parents) + 1):
        above = os.stat(os.path.join(root, *parents[:depth]))
        if (above.st_dev, above.st_ino) == (folder.st_dev, folder.st_ino):
            return True
    return False


def _by_patterns(relpath: bytes, settings: dict[str, Any] | None) -> str | None:
    if settings is None:
        return None
    rule = PathFilter(settings.get("include", ()), settings.get("exclude", ())).rule_against(relpath)
    return f"left out by the last run's patterns: {rule}" if rule else None


def _temp_name(relpath: bytes, last_run: dict[str, Any] | None) -> str | None:
    from crawlproc.watch import TEMP_NAME_PATTERNS

    if not last_run or last_run["command"] != "watch":
        return None
    for pattern in TEMP_NAME_PATTERNS:
        if PathFilter((), (pattern,)).rule_against(relpath):
            return (f"a temp name ({pattern}, or in such a folder): watch waits for it to be renamed to its "
                    "final name (`crawlproc run` takes it as it is)")
    return None


def _not_a_regular_file(relpath: bytes, root: bytes, on_disk: dict[str, Any],
                        settings: dict[str, Any] | None) -> str | None:
    kind = on_disk["kind"]
    if kind in ("file", "folder", "missing", "symlink"):
        if kind == "symlink" and os.path.exists(os.path.join(root, relpath)):
            target = os.stat(os.path.join(root, relpath))
            if not stat.S_ISREG(target.st_mode) and not stat.S_ISDIR(target.st_mode):
                return f"it links to a {kind_name(target.st_mode)}: {SKIP_KINDS['special_files'][2]} are skipped"
        return None
    if kind.startswith("unreadable"):
        return f"it cannot be read: {kind}"
    return f"it is a {kind}, not a regular file: {SKIP_KINDS['special_files'][2]} are skipped"
