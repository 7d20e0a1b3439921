"""The run's identity against the one OUT keeps: go on, store it, accept edited code, redo all, or refuse.

    OUT's meta (stored) vs run.run_identity (wanted), as meta texts     verdict
      equal .......................................................... SAME
      OUT has none yet ............................................... NEW
      only the code fingerprint is missing (OUT was made before
        crawlproc fingerprinted code), or it is one that a crawlproc
        that left constants out (module or class ones) gave this
        code: adopted ................................................. ADOPTED
      only the Python version, with the same bytecode ................ RECOMPILED
      anything, with reprocess ....................................... REPROCESS (every task redone)
      nothing, with reprocess, on an OUT that kept older code's results  REPROCESS
      only the code, and no task is done (no record to mix with) ...... REPLACED
      only the code, with keep_results ............................... KEPT (done tasks kept)
      anything else: IdentityMismatch naming what changed, with the flags that are ways out

This module only decides; `Ledger.settle_identity` stores what the verdict says.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

from crawlproc.errors import IdentityMismatch, WayOut
from crawlproc.processors.base import UNVERSIONED, path_for_people, spec_for_people

CODE_KEY = "code_fingerprint"  # see crawlproc.processors.fingerprint
PYTHON_KEY = "code_python"
CODE_KEYS = frozenset({CODE_KEY, PYTHON_KEY})
KEPT_RESULTS_KEY = "kept_results"  # meta: a JSON list, one entry per --keep-results that accepted edited code

_REDO = "to redo every task"
_KEEP = "to keep the done tasks' records and process the rest with the new code"


class Verdict(str, Enum):
    SAME = "same"
    NEW = "new"
    ADOPTED = "adopted"
    RECOMPILED = "recompiled"
    REPLACED = "replaced"
    REPROCESS = "reprocess"
    KEPT = "kept"


# Settings an earlier crawlproc recorded with a value that means "not set" to this one:
# --chunk-size 0 (whole files) was kept as 0. Key -> that value.
UNSET_BEFORE: dict[str, Any] = {"chunk_size": 0}


def read_as_today(identity: Mapping[str, Any], *, as_text: bool = False) -> dict[str, Any]:
    """`identity` (values; with `as_text`, the JSON texts the ledger's meta holds) with what an
    earlier crawlproc recorded for an unset setting read as unset."""
    read = dict(identity)
    for key, earlier in UNSET_BEFORE.items():
        if key in read and read[key] == (json.dumps(earlier) if as_text else earlier):
            read[key] = "null" if as_text else None
    return read


def judge(stored: Mapping[str, str], wanted: Mapping[str, str], *, out: Path, reprocess: bool,
          keep_results: bool, count_done: Callable[[], int],
          earlier_code: Callable[[], Collection[str]] = frozenset) -> Verdict:
    """The verdict on running with identity `wanted` on an OUT whose meta is `stored`.

    `count_done` counts OUT's done tasks; `earlier_code` gives the fingerprints earlier
    crawlprocs gave this code (fingerprint.earlier_digests); each is called only when the
    code alone changed.

    Raises IdentityMismatch, naming what changed and the ways out, when the run must not go on.
    """
    if "processor" not in stored:
        return Verdict.NEW
    stored = read_as_today(stored, as_text=True)
    # A key that an older crawlproc did not record counts as null: not set then.
    differ = {key for key, value in wanted.items() if stored.get(key, "null") != value}
    adopted = False  # OUT's stamp says less about the code than ours, and no more than that it is this code
    if CODE_KEY in wanted and CODE_KEY not in stored:
        differ -= CODE_KEYS
        adopted = True
    elif differ == {CODE_KEY} and stored.get(CODE_KEY) in earlier_code():  # stamped before constants counted
        differ = set()
        adopted = True
    if not differ:  # --reprocess also undoes earlier --keep-results: every record from this code
        if reprocess and kept_results(stored):
            return Verdict.REPROCESS
        return Verdict.ADOPTED if adopted else Verdict.SAME
    if differ == {PYTHON_KEY}:
        return Verdict.RECOMPILED
    if reprocess:
        return Verdict.REPROCESS
    if differ <= CODE_KEYS:
        if count_done() == 0:  # e.g. a bug that failed every task, fixed
            return Verdict.REPLACED
        if keep_results:
            return Verdict.KEPT
        raise _code_changed(stored, wanted, out)
    raise _settings_changed(stored, wanted, differ, out, keep_results)


def kept_results_entry(stored: Mapping[str, str], wanted: Mapping[str, str], done_tasks: int) -> dict[str, Any]:
    """What summary.json lists for one acceptance of edited code by --keep-results."""
    return {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "done_tasks_kept": done_tasks,
            "old": code_of(stored), "new": code_of(wanted)}


def kept_results(meta: Mapping[str, str]) -> list[dict[str, Any]]:
    """The --keep-results acceptances recorded in OUT's meta, oldest first."""
    return json.loads(meta.get(KEPT_RESULTS_KEY, "[]"))


def code_of(meta: Mapping[str, str]) -> dict[str, str | None]:
    """The code fingerprint and its Python version, from identity meta texts."""
    return {"fingerprint": _text_or_none(meta.get(CODE_KEY)), "python": _text_or_none(meta.get(PYTHON_KEY))}


def _text_or_none(text: str | None) -> str | None:
    return None if text in (None, "null") else text


def _code_changed(stored: Mapping[str, str], wanted: Mapping[str, str], out: Path) -> IdentityMismatch:
    name = spec_for_people(wanted["processor"])
    old, new = code_of(stored), code_of(wanted)
    if old["python"] and new["python"] and old["python"] != new["python"]:
        return IdentityMismatch(
            f"{out} was made under {old['python']} and this is {new['python']}, whose bytecode differs, "
            f"so crawlproc cannot tell whether the code of processor {name} changed",
            [WayOut("if it did not, to keep the done tasks' records", "--keep-results", ("--reprocess",)),
             WayOut(_REDO, "--reprocess", ("--keep-results",))])
    if (old["fingerprint"] or "").startswith("plugin ") and (new["fingerprint"] or "").startswith("plugin "):
        message = (f"processor {name} is {new['fingerprint'][len('plugin '):]} now, "
                   f"and {out} was made with {old['fingerprint'][len('plugin '):]}")
    else:
        message = f"the code of processor {name} changed since {out} was made"
    return IdentityMismatch(message, [WayOut(_REDO + _bump_note(wanted), "--reprocess", ("--keep-results",)),
                                      WayOut(_KEEP, "--keep-results", ("--reprocess",))])


def _bump_note(wanted: Mapping[str, str]) -> str:
    """How to record that the output changed, for a processor whose source the user edits."""
    target, sep, func = wanted["processor"].rpartition(":")
    if not sep:
        return ""  # a plugin: its maintainers bump its version
    where = path_for_people(target) if target.endswith(".py") or os.sep in target else target
    version = wanted.get("processor_version", "")
    if version == UNVERSIONED:
        how = f'decorate {func} with @processor(version="1")'
    elif version.isdigit():
        how = f'bump {func} to @processor(version="{int(version) + 1}")'
    else:
        how = f"bump the version= of {func}"
    return f" ({how} in {where} first if its output changed)"


def _settings_changed(stored: Mapping[str, str], wanted: Mapping[str, str], differ: set[str], out: Path,
                      keep_results: bool) -> IdentityMismatch:
    detail = "; ".join(f"{key}: OUT has {_shown(stored.get(key))}, this run {_shown(wanted[key])}"
                       for key in wanted if key in differ and key not in CODE_KEYS)
    if differ & CODE_KEYS:
        detail += "; and the processor's code changed"
    note = " (--keep-results accepts edited processor code, nothing else)" if keep_results else ""
    return IdentityMismatch(f"{out} was made with other settings ({detail}){note}; another OUT starts afresh",
                            [WayOut(_REDO, "--reprocess", ("--keep-results",))])


def _shown(text: str | None) -> str:
    """A meta text (JSON) for people: `none` for a setting not given."""
    return "none" if text in (None, "null") else text
