"""The run's identity and processor code: edited code is refused, kept knowingly, or redone.

Also how a processor that cannot be loaded is reported: one line a person reads, exit 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sqlite3
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, make_tree, run_cli
from crawlproc.errors import IdentityMismatch, ProcessorLoadError, UsageError
from crawlproc.identity import CODE_KEY, KEPT_RESULTS_KEY, PYTHON_KEY, Verdict, judge
from crawlproc.ledger import Ledger
from crawlproc.processors.base import load
from crawlproc.processors.fingerprint import python_version
from crawlproc.run import RunOptions, run_job
from test_ledger import make_done, row, scan, states

WORDS = '''
from crawlproc import processor


@processor(version="1")
def words(task):
    """Words per file."""
    text = task.read_bytes().decode("utf-8", "replace")
    return {"path": task.relpath, "words": len(text.split())}


@words.reducer
def total(records):
    return {"words": sum(r["words"] for r in records)}
'''
COMMENTED = WORDS.replace('    """Words per file."""',
                          '    """Words per file."""\n    # split on any whitespace\n')
EDITED = WORDS.replace('"words": len(text.split())', '"words": 10 * len(text.split())')
TREE = {"a.txt": "one two\nthree\n", "b/c.txt": "x\n"}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", TREE)


def write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


def crawl(data: Path, out: Path, *args: str, env: dict | None = None, cwd: Path | None = None):
    return run_cli("run", str(data), "-o", str(out), "-w", "1", "--no-progress", *args, env=env, cwd=cwd)


def ok(result) -> None:
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr


def refused(result) -> str:
    """The one line of a run refused with exit 2."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def records(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "merged.jsonl").read_text().splitlines())}


def processed(out: Path) -> int:
    return summary(out)["timings"]["tasks_done_this_run"]


def hint(line: str, purpose: str) -> list[str]:
    """The command a refusal gives for `purpose`, as argv (after `crawlproc`)."""
    match = re.search(re.escape(purpose) + r"[^;]*?: crawlproc (.*?)(?:; |$)", line)
    assert match, (purpose, line)
    return shlex.split(match.group(1))


def set_meta(out: Path, values: dict[str, str | None]) -> None:
    conn = sqlite3.connect(out / "ledger.db")
    try:
        for key, value in values.items():
            if value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        conn.commit()
    finally:
        conn.close()


# -- end to end ----------------------------------------------------------------------------------

def test_a_comment_is_not_an_edit(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    first = (out / "merged.jsonl").read_bytes()
    source.write_text(COMMENTED)
    ok(crawl(data, out, "-p", f"{source}:words"))
    assert processed(out) == 0
    assert (out / "merged.jsonl").read_bytes() == first


def test_an_edited_body_is_refused_with_runnable_ways_out(data, tmp_path):
    write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", "procs/words.py:words", cwd=tmp_path))
    first = (out / "merged.jsonl").read_bytes()
    (tmp_path / "procs" / "words.py").write_text(EDITED)
    line = refused(crawl(data, out, "-p", "procs/words.py:words", cwd=tmp_path))
    assert line.startswith(
        f"crawlproc: the code of processor procs/words.py:words changed since {out} was made")
    assert '@processor(version="2") in procs/words.py' in line
    assert (out / "merged.jsonl").read_bytes() == first  # nothing touched
    # Each way out is this very command with one flag added; they run as printed.
    redo = hint(line, "to redo every task")
    assert redo[-1] == "--reprocess" and redo[:5] == ["run", str(data), "-o", str(out), "-w"]
    keep = hint(line, "to keep the done tasks' records")
    assert keep == [*redo[:-1], "--keep-results"]
    ok(run_cli(*redo, cwd=tmp_path))
    assert processed(out) == len(TREE)
    assert records(out)["a.txt"]["words"] == 30


def test_keep_results_keeps_done_tasks_and_uses_the_new_code_for_the_rest(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    old = summary(out)
    source.write_text(EDITED)
    (data / "new.txt").write_text("four five\n")
    result = crawl(data, out, "-p", f"{source}:words", "--keep-results")
    ok(result)
    assert "--keep-results" in result.stderr  # the INFO line says what was accepted
    assert processed(out) == 1
    assert {path: r["words"] for path, r in records(out).items()} == {"a.txt": 3, "b/c.txt": 1, "new.txt": 20}
    kept = summary(out)["kept_results"]
    assert len(kept) == 1 and kept[0]["done_tasks_kept"] == len(TREE)
    assert kept[0]["old"]["python"] == kept[0]["new"]["python"] == python_version()
    assert kept[0]["old"]["fingerprint"] != kept[0]["new"]["fingerprint"]
    assert old["kept_results"] == []
    # The new code is OUT's code now: a plain rerun goes on, and the record stays.
    ok(crawl(data, out, "-p", f"{source}:words"))
    assert processed(out) == 0 and summary(out)["kept_results"] == kept
    # --reprocess redoes every task with the new code: nothing old is kept any more.
    ok(crawl(data, out, "-p", f"{source}:words", "--reprocess"))
    assert processed(out) == len(TREE) + 1
    assert records(out)["a.txt"]["words"] == 30 and summary(out)["kept_results"] == []


def test_an_edited_reducer_kept_with_keep_results_makes_the_summary(data, tmp_path):
    """No task was left to process, so the merge was taken as unchanged and summary.json kept the
    old reducer's totals, its written_at refreshed as if they were new."""
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    assert summary(out)["reduced"] == {"words": 4}
    source.write_text(WORDS.replace('return {"words": sum', 'return {"total_words": sum'))
    ok(crawl(data, out, "-p", f"{source}:words", "--keep-results"))
    assert processed(out) == 0 and summary(out)["reduced"] == {"total_words": 4}


def test_a_summary_crawlproc_merge_made_with_other_code_is_not_kept_by_the_next_run(data, tmp_path):
    """`crawlproc merge` reduces with the code on disk, which no run compared with OUT's: its
    summary was remembered as OUT's code's, and a run with OUT's code kept it."""
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    source.write_text(WORDS.replace('return {"words": sum', 'return {"other": sum'))
    assert run_cli("merge", "-o", str(out)).returncode == 0
    assert summary(out)["reduced"] == {"other": 4}
    source.write_text(WORDS)
    ok(crawl(data, out, "-p", f"{source}:words"))
    assert processed(out) == 0 and summary(out)["reduced"] == {"words": 4}


def test_keep_results_from_the_environment_and_watch_has_it(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    source.write_text(EDITED)
    ok(crawl(data, out, "-p", f"{source}:words", env={"CRAWLPROC_KEEP_RESULTS": "1"}))
    assert len(summary(out)["kept_results"]) == 1
    assert "--keep-results" in run_cli("watch", "--help").stdout


def test_keep_results_accepts_edited_code_and_nothing_else(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    source.write_text(EDITED.replace('version="1"', 'version="2"'))
    line = refused(crawl(data, out, "-p", f"{source}:words", "--keep-results"))
    assert "processor_version: OUT has 1, this run 2" in line and "the processor's code changed" in line
    assert "--keep-results accepts edited processor code, nothing else" in line
    redo = hint(line, "to redo every task")
    assert "--keep-results" not in redo and redo[-1] == "--reprocess"
    line = refused(crawl(data, out, "-p", f"{source}:words", "--keep-results", "--reprocess"))
    assert "--keep-results and --reprocess exclude each other" in line
    source.write_text(WORDS)
    line = refused(crawl(data, out, "-p", f"{source}:words", "--keep-results", "--param", "mode=fast"))
    assert "params" in line and "mode" in line


def test_code_fixed_after_every_task_failed_needs_no_flag(data, tmp_path):
    failing = WORDS.replace('    text = task.read_bytes()',
                            '    raise ValueError("no words today")\n    text = task.read_bytes()')
    source = write(tmp_path / "procs" / "words.py", failing)
    out = tmp_path / "out"
    assert crawl(data, out, "-p", f"{source}:words", "--retries", "0").returncode == 1
    source.write_text(WORDS)
    result = crawl(data, out, "-p", f"{source}:words", "--retry-failed")
    ok(result)
    assert "no task is done yet: the new code is used" in result.stderr
    assert processed(out) == len(TREE) and summary(out)["kept_results"] == []


def test_an_undecorated_function(data, tmp_path):
    source = write(tmp_path / "procs" / "plain.py", '''
        def count(task):
            return {"path": task.relpath, "bytes": len(task.read_bytes())}
    ''')
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:count"))
    source.write_text("# counting\n\n" + source.read_text())
    ok(crawl(data, out, "-p", f"{source}:count"))
    source.write_text(source.read_text().replace("len(task.read_bytes())", "len(task.read_bytes()) * 8"))
    line = refused(crawl(data, out, "-p", f"{source}:count"))
    assert "the code of processor" in line and "plain.py:count changed" in line
    assert 'decorate count with @processor(version="1")' in line


SCALED = '''
    import os
    import random

    SCALE = 1
    SEED = random.random()
    TOKEN = os.environ.get("SCALED_TOKEN", "")


    def scaled(task):
        return {"path": task.relpath, "n": len(task.read_bytes()) * SCALE, "seeded": SEED > 0, "token": TOKEN}
'''


def test_a_changed_module_constant_is_an_edit(data, tmp_path):
    # `SCALE = 1` made `SCALE = 1000` between two runs once merged old and new records silently.
    source = write(tmp_path / "procs" / "scaled.py", SCALED)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:scaled"))
    first = (out / "merged.jsonl").read_bytes()
    source.write_text(source.read_text().replace("SCALE = 1", "SCALE = 1000"))
    (data / "new.txt").write_text("four five\n")
    line = refused(crawl(data, out, "-p", f"{source}:scaled"))
    assert "the code of processor" in line and "scaled.py:scaled changed since" in line
    assert (out / "merged.jsonl").read_bytes() == first
    ok(crawl(data, out, "-p", f"{source}:scaled", "--keep-results"))
    assert processed(out) == 1
    assert {path: r["n"] for path, r in records(out).items()} == {"a.txt": 14, "b/c.txt": 2, "new.txt": 10000}
    ok(crawl(data, out, "-p", f"{source}:scaled", "--reprocess"))
    assert processed(out) == len(TREE) + 1
    assert {path: r["n"] for path, r in records(out).items()} == {"a.txt": 14000, "b/c.txt": 2000,
                                                                    "new.txt": 10000}


def test_values_computed_at_import_are_not_an_edit(data, tmp_path):
    # SEED is another random number in each process, TOKEN comes from the environment.
    source = write(tmp_path / "procs" / "scaled.py", SCALED)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:scaled", env={"SCALED_TOKEN": "one"}))
    ok(crawl(data, out, "-p", f"{source}:scaled", env={"SCALED_TOKEN": "two"}))
    assert processed(out) == 0


def test_a_module_processor_on_the_pythonpath(data, tmp_path):
    package = tmp_path / "site" / "mypkg"
    write(package / "__init__.py", "")
    module = write(package / "procs.py", '''
        def _norm(text):
            return text.strip().lower()

        def lines(task):
            return {"path": task.relpath, "first": _norm(task.read_bytes().decode()).split("\\n")[0]}
    ''')
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(REPO)])}
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", "mypkg.procs:lines", env=env))
    module.write_text("'''Procs.'''\n\n\n" + module.read_text())
    ok(crawl(data, out, "-p", "mypkg.procs:lines", env=env))
    assert processed(out) == 0
    module.write_text(module.read_text().replace(".lower()", ".upper()"))  # the helper, not the processor
    line = refused(crawl(data, out, "-p", "mypkg.procs:lines", env=env))
    assert "the code of processor mypkg.procs:lines changed" in line and "in mypkg.procs first" in line


SCALED = """
from crawlproc import processor

SCALE = 1


@processor(version="1")
def scaled(task):
    return {"path": task.relpath, "n": len(task.read_bytes()) * SCALE}
"""


def test_an_out_stamped_before_module_constants_counted_adopts_the_same_code(data, tmp_path):
    """An OUT whose fingerprint an earlier crawlproc made without the module's constants, for the
    very code that runs now, goes on: no run of a job already going is refused by an upgrade of
    crawlproc. From then on a changed constant is an edit."""
    from crawlproc.processors.base import load
    from crawlproc.processors.fingerprint import code_digest, earlier_digests

    source = write(tmp_path / "procs" / "scaled.py", SCALED)
    spec = f"{source}:scaled"
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", spec))
    earlier = code_digest(load(spec), literals=False)
    assert earlier in earlier_digests(spec, load(spec))  # it uses a module constant: the fingerprints differ
    set_meta(out, {CODE_KEY: earlier})  # as that crawlproc stamped it
    result = crawl(data, out, "-p", spec)
    ok(result)
    assert "fingerprinted processor code less fully" in result.stderr and processed(out) == 0
    source.write_text(SCALED.replace("SCALE = 1", "SCALE = 1000"))
    refused(crawl(data, out, "-p", spec))


RATED = """
from crawlproc import processor


class Rate:
    PER_BYTE = 1


@processor(version="1")
def rated(task):
    return {"path": task.relpath, "n": len(task.read_bytes()) * Rate.PER_BYTE}
"""


@pytest.mark.parametrize("left_out", [{"literals": False}, {"class_literals": False}], ids=["every", "class"])
def test_a_changed_class_constant_is_an_edit_and_an_out_stamped_before_they_counted_goes_on(
        data, tmp_path, left_out):
    """`PER_BYTE = 1` made `PER_BYTE = 1000` between two runs merged old and new records silently.
    An OUT stamped by a crawlproc that left class constants (or every constant) out, for this very
    code, goes on."""
    from crawlproc.processors.base import load
    from crawlproc.processors.fingerprint import code_digest

    source = write(tmp_path / "procs" / "rated.py", RATED)
    spec = f"{source}:rated"
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", spec))
    set_meta(out, {CODE_KEY: code_digest(load(spec), **left_out)})  # as that crawlproc stamped it
    result = crawl(data, out, "-p", spec)
    ok(result)
    assert "fingerprinted processor code less fully" in result.stderr and processed(out) == 0
    first = (out / "merged.jsonl").read_bytes()
    source.write_text(RATED.replace("PER_BYTE = 1", "PER_BYTE = 1000"))
    line = refused(crawl(data, out, "-p", spec))
    assert "the code of processor" in line and "rated.py:rated changed since" in line
    assert (out / "merged.jsonl").read_bytes() == first


ADDED_CONSTANT = """
from crawlproc import processor
from settings import Base, SCALE


class Rate(Base):
    pass


@processor(version="1")
def added(task):
    return {"path": task.relpath, "n": len(task.read_bytes()) * SCALE * Rate.PER_BYTE}
"""


@pytest.mark.parametrize("before, after", [
    ("class Rate(Base):\n    pass", "class Rate(Base):\n    PER_BYTE = 1000"),  # overrides an inherited constant
    ("from settings import Base, SCALE", "from settings import Base\nSCALE = 1000"),  # this module's now
])
def test_an_edit_that_adds_a_constant_is_an_edit(data, tmp_path, before, after):
    """Edited code fingerprinted without its new constant, as an earlier crawlproc would have, is
    what this crawlproc stamped before the edit: that must not make the edit pass as unchanged."""
    write(tmp_path / "procs" / "settings.py", """
        SCALE = 1


        class Base:
            PER_BYTE = 1
    """)
    source = write(tmp_path / "procs" / "added.py", ADDED_CONSTANT)
    spec = f"{source}:added"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "procs"), str(REPO)])}  # for `settings`
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", spec, env=env))
    assert ADDED_CONSTANT.count(before) == 1
    source.write_text(ADDED_CONSTANT.replace(before, after))
    line = refused(crawl(data, out, "-p", spec, env=env))
    assert "added.py:added changed since" in line


def test_an_out_made_before_code_fingerprints_adopts_the_code(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    set_meta(out, {CODE_KEY: None, PYTHON_KEY: None})
    result = crawl(data, out, "-p", f"{source}:words")
    ok(result)
    assert "was made by a crawlproc that fingerprinted processor code less fully" in result.stderr
    assert "INFO" in result.stderr
    assert processed(out) == 0
    source.write_text(EDITED)  # from now on, an edit is seen
    refused(crawl(data, out, "-p", f"{source}:words"))


def test_another_python_is_named_not_taken_for_an_edit(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    ok(crawl(data, out, "-p", f"{source}:words"))
    set_meta(out, {CODE_KEY: "0" * 32, PYTHON_KEY: "cpython 3.1"})
    line = refused(crawl(data, out, "-p", f"{source}:words"))
    assert f"was made under cpython 3.1 and this is {python_version()}, whose bytecode differs" in line
    assert "changed since" not in line
    ok(run_cli(*hint(line, "if it did not, to keep the done tasks' records")))
    assert processed(out) == 0


def test_the_library_raises_with_the_ways_out(data, tmp_path):
    source = write(tmp_path / "procs" / "words.py", WORDS)
    out = tmp_path / "out"
    options = RunOptions(data_dir=data, out=out, processor=f"{source}:words", workers=1)
    assert run_job(options).exit_code == 0
    source.write_text(EDITED)
    with pytest.raises(IdentityMismatch) as info:
        run_job(options)
    assert [way.flag for way in info.value.ways_out] == ["--reprocess", "--keep-results"]
    assert "pass --reprocess" in str(info.value) and "pass --keep-results" in str(info.value)
    with pytest.raises(UsageError, match="exclude each other"):
        run_job(dataclasses.replace(options, reprocess=True, keep_results=True))
    outcome = run_job(dataclasses.replace(options, keep_results=True))
    assert outcome.exit_code == 0 and len(outcome.summary["kept_results"]) == 1


# -- the verdicts, and what the ledger keeps ---------------------------------------------------

STORED = {"processor": "/p/words.py:words", "processor_version": "1", "params": "{}",
          CODE_KEY: "aaaa", PYTHON_KEY: "cpython 3.11"}


def verdict(wanted: dict, *, stored: dict = STORED, reprocess: bool = False, keep_results: bool = False,
            done: int = 1, earlier: str | None = None):
    return judge(stored, {**STORED, **wanted}, out=Path("/o"), reprocess=reprocess, keep_results=keep_results,
                 count_done=lambda: done, earlier_code=lambda: {earlier} - {None})


def test_verdicts():
    assert verdict({}, stored={}) is Verdict.NEW
    assert verdict({}) is Verdict.SAME
    assert verdict({}, reprocess=True) is Verdict.SAME
    kept_before = {**STORED, KEPT_RESULTS_KEY: '[{"at": "then"}]'}
    assert verdict({}, stored=kept_before, reprocess=True) is Verdict.REPROCESS  # no old records left
    assert verdict({}, stored=kept_before) is Verdict.SAME
    old_out = {k: v for k, v in STORED.items() if k not in (CODE_KEY, PYTHON_KEY)}
    assert verdict({CODE_KEY: "bbbb"}, stored=old_out) is Verdict.ADOPTED
    assert verdict({PYTHON_KEY: "cpython 3.12"}) is Verdict.RECOMPILED
    assert verdict({CODE_KEY: "bbbb"}, keep_results=True) is Verdict.KEPT
    assert verdict({CODE_KEY: "bbbb"}, done=0) is Verdict.REPLACED  # no record of the old code to mix
    assert verdict({CODE_KEY: "bbbb"}, keep_results=True, done=0) is Verdict.REPLACED
    assert verdict({CODE_KEY: "bbbb", PYTHON_KEY: "cpython 3.12"}, keep_results=True) is Verdict.KEPT
    assert verdict({CODE_KEY: "bbbb"}, reprocess=True) is Verdict.REPROCESS
    assert verdict({"params": '{"a": "b"}'}, stored=old_out, reprocess=True) is Verdict.REPROCESS
    with pytest.raises(IdentityMismatch, match="params"):
        verdict({"params": '{"a": "b"}'}, stored=old_out, keep_results=True)


def test_an_out_stamped_without_module_constants_is_adopted_as_an_unchanged_one():
    """Stamped with what an earlier crawlproc gave this code ("aaaa"): taken as this code, and
    --reprocess still undoes what --keep-results kept (it did not, before: ADOPTED came first)."""
    assert verdict({CODE_KEY: "bbbb"}, earlier="aaaa") is Verdict.ADOPTED
    assert verdict({CODE_KEY: "bbbb"}, earlier="aaaa", reprocess=True) is Verdict.ADOPTED
    kept_before = {**STORED, KEPT_RESULTS_KEY: '[{"at": "then"}]'}
    assert verdict({CODE_KEY: "bbbb"}, stored=kept_before, earlier="aaaa", reprocess=True) is Verdict.REPROCESS
    old_out = {k: v for k, v in kept_before.items() if k not in (CODE_KEY, PYTHON_KEY)}
    assert verdict({CODE_KEY: "bbbb"}, stored=old_out, reprocess=True) is Verdict.REPROCESS
    with pytest.raises(IdentityMismatch):  # another earlier code: an edit
        verdict({CODE_KEY: "bbbb"}, earlier="cccc")
    assert verdict({CODE_KEY: "bbbb", PYTHON_KEY: "cpython 3.12"}, earlier="aaaa", keep_results=True) is Verdict.KEPT


def test_refusals_name_what_changed():
    with pytest.raises(IdentityMismatch) as info:
        verdict({CODE_KEY: "bbbb"})
    assert info.value.message == "the code of processor /p/words.py:words changed since /o was made"
    plugin = {"processor": "wordy", PYTHON_KEY: "null"}
    with pytest.raises(IdentityMismatch) as info:
        verdict({**plugin, CODE_KEY: "plugin dist 0.2"},
                stored={**STORED, **plugin, CODE_KEY: "plugin dist 0.1"})
    assert info.value.message == "processor wordy is dist 0.2 now, and /o was made with dist 0.1"
    assert "version" not in info.value.ways_out[0].purpose  # a plugin's maintainers bump its version
    with pytest.raises(IdentityMismatch) as info:
        verdict({"chunk_size": "null"}, stored={**STORED, "chunk_size": "65536"})
    assert "(chunk_size: OUT has 65536, this run none)" in info.value.message  # not 'null', not quoted


def test_the_ledger_records_each_acceptance_until_a_reprocess(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        assert ledger.settle_identity(STORED, reprocess=False) is Verdict.NEW
        scan(ledger, [row("a"), row("b")])
        make_done(ledger, ["a"])
        for n, code in enumerate(("bbbb", "cccc"), start=1):
            assert ledger.settle_identity({**STORED, CODE_KEY: code}, reprocess=False,
                                          keep_results=True) is Verdict.KEPT
            assert len(ledger.kept_results()) == n
        assert [(k["old"]["fingerprint"], k["new"]["fingerprint"], k["done_tasks_kept"])
                for k in ledger.kept_results()] == [("aaaa", "bbbb", 1), ("bbbb", "cccc", 1)]
        assert ledger.meta()[CODE_KEY] == "cccc"
        assert ledger.check_identity({**STORED, CODE_KEY: "dddd"}, reprocess=True) is True
        assert ledger.kept_results() == [] and KEPT_RESULTS_KEY not in ledger.meta()
        assert states(ledger) == {"a": "pending", "b": "pending"}
    finally:
        ledger.close()


# -- processors that cannot be loaded --------------------------------------------------------------

@pytest.mark.parametrize("source,func,expected", [
    ("import os\n\ndef f(task)\n    return {}\n", "f", "procs/bad.py:3: expected ':' (def f(task))"),
    ("import os\nX = 1 / 0\n", "f", "procs/bad.py:2: ZeroDivisionError: division by zero"),
    ("import json\n\ndef setting():\n    return json.loads('{oops')\n\nSETTING = setting()\n", "f",
     "procs/bad.py:4: JSONDecodeError: Expecting property name enclosed in double quotes"),
    ("from crawlproc import processor\n\n@processor\ndef words(task):\n    return {}\n\ndef _hidden():\n"
     "    pass\n", "word",
     "processor procs/bad.py:word: procs/bad.py has no function 'word'; did you mean 'words'? (it defines words)"),
])
def test_a_processor_that_cannot_be_loaded_is_one_line(data, tmp_path, source, func, expected):
    write(tmp_path / "procs" / "bad.py", source)
    out = tmp_path / "out"
    line = refused(crawl(data, out, "-p", f"procs/bad.py:{func}", cwd=tmp_path))
    assert line.startswith(f"crawlproc: {expected}")
    assert not out.exists()  # nothing left behind


def test_the_library_raises_processor_load_error(tmp_path):
    source = write(tmp_path / "broken.py", "def f(task):\n    return {\n")
    with pytest.raises(ProcessorLoadError, match=r"broken\.py:2: '\{' was never closed"):
        load(f"{source}:f")
    with pytest.raises(ProcessorLoadError, match=r"cannot import processor module 'no_such_pkg\.mod': "
                                                 r"ModuleNotFoundError: No module named 'no_such_pkg'"):
        load("no_such_pkg.mod:f")
