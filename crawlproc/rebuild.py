"""A lost or damaged ledger, rebuilt from the trailers of OUT's result files.

    start of run/watch: ledger.diagnose(OUT/ledger.db) ── usable ──> carry on
        │ missing, empty, not SQLite, damaged or foreign, and results/ holds result files
        v
    survey: every file's trailer (read from its end) ── other settings, or no trailer
        │                                               (an older crawlproc) ──> refused, exit 2
        v
    ledger.db.rebuilding: the run's identity; each task whose record range checks
        │ out, as done (for a key the highest batch id wins); a batch id floor
        │ above every result file, so none is overwritten
        v
    the old ledger and its -wal/-shm moved aside (never deleted), then renamed into place

A kill at any moment leaves either no usable ledger.db (the next run rebuilds
again) or the whole new one. The run's scan then reconciles it with DATA_DIR
(changed files -> pending, vanished ones -> gone; failed tasks are in no trailer,
so they are new), and the merge checks every range, as on every run.

The thorough check (PRAGMA quick_check, a pass over the whole file) is skipped
when the ledger is exactly as crawlproc last closed it: OUT/ledger.db.closed
holds its inode, size, mtime and ctime from then, and a ctime cannot be set back.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from crawlproc.errors import IdentityMismatch, LedgerError
from crawlproc.identity import read_as_today
from crawlproc.ledger import LEDGER_NAME, Ledger, diagnose
from crawlproc.results import (
    RESULTS_DIR,
    DamagedTrailer,
    NoTrailer,
    fsync_dir,
    identity_digest,
    read_trailer,
    result_files,
    verified_tasks,
    write_atomic,
)

STAMP_SUFFIX = ".closed"
TEMP_SUFFIX = ".rebuilding"
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal")
DEFAULT_PROCESSOR = "linecount"


class Survey(NamedTuple):
    """What the result files' trailers say, before anything is changed."""

    adoptable: list[tuple[int, Path]]  # same identity (or only what is accepted differs)
    foreign: list[dict[str, Any]]  # identities of files made with other settings
    without_trailer: list[Path]  # written by a crawlproc older than trailers
    damaged: int  # files whose trailer does not check out: their tasks are processed again


def rebuild_if_lost(out: Path, identity: Mapping[str, Any], *, reprocess: bool = False,
                    accept_changed: frozenset[str] = frozenset()) -> str | None:
    """Rebuild OUT's ledger when it is lost and results/ holds result files; the warning line, or None.

    Raises IdentityMismatch when result files were made with other settings,
    LedgerError when they have no trailer or when a damaged ledger has no result
    files to be rebuilt from; --reprocess (`reprocess`) ignores every result file
    instead. `accept_changed` names identity keys whose difference is accepted
    (--keep-results: the processor's code fingerprint).
    """
    path = out / LEDGER_NAME
    problem = diagnose(path, thorough=not closed_cleanly(path))
    if problem is None:
        return None
    _remove_with_companions(path.with_name(path.name + TEMP_SUFFIX))  # a rebuild killed halfway
    found = result_files(out)
    if not found:
        return _nothing_to_rebuild_from(path, problem)
    floor = max(batch_id for batch_id, _ in found) + 1
    if reprocess:
        _replace_ledger(path, identity, [], floor)
        return f"{path} was {problem}; --reprocess: {len(found)} result files ignored, every task is processed again"
    survey = _survey(found, identity, accept_changed)
    _refuse_unusable(survey, path, problem, identity, len(found))
    kept, damaged_ranges, aside = _replace_ledger(path, identity, survey.adoptable, floor)
    line = (f"{path} was {problem}; rebuilt from {len(survey.adoptable)} result files "
            f"({kept:,} done tasks kept); failed tasks will be tried again")
    if survey.damaged or damaged_ranges:
        line += (f"; {survey.damaged} damaged result files and {damaged_ranges} damaged record ranges "
                 "were not adopted: their tasks are processed again")
    return line + (f"; the old file is kept as {aside.name}" if aside is not None else "")


def _nothing_to_rebuild_from(path: Path, problem: str) -> None:
    """No result files: a new OUT, unless the ledger is damaged (which is not started from zero)."""
    if problem == "missing":
        _move_aside(path)  # the -wal/-shm of a deleted ledger must not be replayed into a new one
    elif problem.startswith("damaged"):
        aside = shlex.quote(str(path.with_name(path.name + ".bad")))
        raise LedgerError(f"{path} is {problem} and {path.parent / RESULTS_DIR} holds no result files to rebuild "
                          f"it from; to start over, move it away (mv {shlex.quote(str(path))} {aside}) and run again")
    return None  # empty: made anew; foreign or not SQLite: Ledger() refuses it, as always


def _survey(found: list[tuple[int, Path]], identity: Mapping[str, Any], accept_changed: frozenset[str]) -> Survey:
    ours = identity_digest(identity)
    adoptable: list[tuple[int, Path]] = []
    foreign: list[dict[str, Any]] = []
    without_trailer: list[Path] = []
    damaged = 0
    for batch_id, file in found:
        try:
            trailer = read_trailer(file)
        except NoTrailer:
            without_trailer.append(file)
        except (DamagedTrailer, OSError):
            damaged += 1
        else:
            if trailer.identity_digest == ours or _differences(trailer.identity, identity) <= accept_changed:
                adoptable.append((batch_id, file))
            else:
                foreign.append(trailer.identity)
    return Survey(adoptable, foreign, without_trailer, damaged)


def _as_stored(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The identity as a trailer keeps it (through JSON: tuples become lists, and so on)."""
    return json.loads(json.dumps(dict(identity)))


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any]) -> set[str]:
    """Identity keys whose values differ (an earlier crawlproc's spelling of an unset setting is unset)."""
    theirs, ours = read_as_today(theirs), _as_stored(ours)
    return {key for key in theirs.keys() | ours.keys() if theirs.get(key) != ours.get(key)}


def _refuse_unusable(survey: Survey, path: Path, problem: str, identity: Mapping[str, Any], total: int) -> None:
    results = path.parent / RESULTS_DIR
    if survey.foreign:
        theirs, ours = survey.foreign[0], _as_stored(identity)
        detail = "; ".join(f"{key}: results have {theirs.get(key)!r}, this run {ours.get(key)!r}"
                           for key in sorted(_differences(theirs, identity)))
        raise IdentityMismatch(
            f"{path} is {problem}, and {len(survey.foreign)} of the {total} result files in {results} were made "
            f"with other settings ({detail}); use a new --out, or pass --reprocess to process every file again "
            "(those results are then removed)")
    if survey.without_trailer:
        raise LedgerError(
            f"{path} is {problem}, and {len(survey.without_trailer)} of the {total} result files in {results} "
            f"were written by an older crawlproc (no trailer, e.g. {survey.without_trailer[0].name}), so the "
            "ledger cannot be rebuilt from them; use a new --out, or pass --reprocess to process every file again")


def _replace_ledger(path: Path, identity: Mapping[str, Any], adoptable: list[tuple[int, Path]],
                    floor: int) -> tuple[int, int, Path | None]:
    """Build the new ledger, move the old one aside, rename the new one into place.

    Returns (tasks kept, record ranges not adopted, where the old ledger went).
    """
    temp = path.with_name(path.name + TEMP_SUFFIX)
    kept, damaged_ranges = _build(temp, identity, adoptable, floor)
    aside = _move_aside(path)  # its -wal too: replayed into the new file, it would damage it
    os.replace(temp, path)
    fsync_dir(path.parent)
    return kept, damaged_ranges, aside


def _build(temp: Path, identity: Mapping[str, Any], adoptable: list[tuple[int, Path]],
           floor: int) -> tuple[int, int]:
    """The new ledger at `temp`; returns (tasks kept, record ranges not adopted)."""
    ledger = Ledger(temp)
    kept = damaged_ranges = 0
    try:
        ledger.check_identity(identity, reprocess=False)  # a new ledger takes the run's identity
        for batch_id, file in sorted(adoptable, reverse=True):  # highest batch first: it wins a key
            try:
                trailer, tasks, damaged = verified_tasks(file)
            except (DamagedTrailer, OSError, ValueError):
                continue  # changed since the survey: not adopted, its tasks are processed again
            damaged_ranges += damaged
            with ledger.transaction() as conn:
                kept += ledger.adopt_done(conn, batch_id, trailer.pid, tasks)
        ledger.raise_batch_floor(floor)
    finally:
        ledger.close_as_one_file()
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)  # all of it on disk before the rename makes it the ledger
    finally:
        os.close(fd)
    return kept, damaged_ranges


def _move_aside(path: Path) -> Path | None:
    """Rename the ledger and its -wal/-shm to ledger.db.damaged-<time>[-wal|-shm]; the new name, if any."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    suffix = 1
    while any(target.with_name(target.name + c).exists() for c in ("", *SQLITE_COMPANIONS)):
        suffix += 1
        target = path.with_name(f"{path.name}.damaged-{stamp}-{suffix}")
    moved_ledger = False
    for companion in ("", *SQLITE_COMPANIONS):
        try:
            os.rename(path.with_name(path.name + companion), target.with_name(target.name + companion))
        except FileNotFoundError:
            continue
        moved_ledger = moved_ledger or companion == ""
    return target if moved_ledger else None


def _remove_with_companions(path: Path) -> None:
    for companion in ("", *SQLITE_COMPANIONS):
        try:
            os.unlink(path.with_name(path.name + companion))
        except FileNotFoundError:
            pass


# -- the ledger as crawlproc last closed it ----------------------------------------

def note_closed(path: Path) -> None:
    """Record the ledger's file as it is right after crawlproc closed it (see closed_cleanly)."""
    try:
        stamp = _file_stamp(path)
    except FileNotFoundError:
        return
    write_atomic(path.with_name(path.name + STAMP_SUFFIX), json.dumps(stamp).encode())


def closed_cleanly(path: Path) -> bool:
    """Is the ledger as crawlproc closed it: the same inode, size, mtime and ctime, nothing in a -wal?

    (A reader such as `crawlproc status` may leave an empty -wal behind.)
    """
    try:
        recorded = json.loads(path.with_name(path.name + STAMP_SUFFIX).read_bytes())
        if recorded != _file_stamp(path):
            return False
    except (OSError, ValueError):
        return False
    try:
        return path.with_name(path.name + "-wal").stat().st_size == 0
    except FileNotFoundError:
        return True


def _file_stamp(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


# -- for the commands that only read ----------------------------------------------

def lost_ledger_hint(out: Path) -> str | None:
    """When OUT's ledger is unusable but results/ holds result files: the line that says how to
    rebuild it (the run command, with the settings a trailer records). None otherwise."""
    path = out / LEDGER_NAME
    found = result_files(out)
    if not found:
        return None
    problem = diagnose(path, thorough=False)
    if problem is None:
        return None  # the ledger is there: whatever failed, a rebuild is not the answer
    for _, file in sorted(found, reverse=True):
        try:
            identity = read_trailer(file).identity
        except (NoTrailer, DamagedTrailer, OSError):
            continue
        if identity.get("data_dir"):
            return (f"{path} is {problem}, but {out / RESULTS_DIR} holds {len(found)} result files; "
                    f"`{rerun_command(out, identity)}` rebuilds the ledger from them")
    return (f"{path} is {problem}, and {out / RESULTS_DIR} holds {len(found)} result files that cannot rebuild "
            f"it; use a new --out, or run again on it with --reprocess to process every file again")


def rerun_command(out: Path, identity: Mapping[str, Any]) -> str:
    """The `crawlproc run` command line for OUT, with the data dir, processor, params and chunk size of
    `identity`, shell-quoted."""
    args = ["crawlproc", "run", str(identity["data_dir"]), "-o", str(out)]
    params = dict(identity.get("params") or {})
    processor = identity.get("processor") or DEFAULT_PROCESSOR
    if processor == "cmd" and "cmd" in params:
        args += ["--cmd", params.pop("cmd")]
    elif processor != DEFAULT_PROCESSOR:
        args += ["-p", processor]
    for key, value in sorted(params.items()):
        args += ["--param", f"{key}={value}"]
    if identity.get("chunk_size"):
        args += ["--chunk-size", str(identity["chunk_size"])]
    return shlex.join(args)
