"""The Python API: crawlproc.run / watch / open, as a notebook or a script uses them.

Runs that start workers go through the real forkserver; what must not happen in the test
process (re-importing a script's __main__, a run in a thread without signal handlers) is
tried in a real `python` subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import crawlproc
from conftest import make_tree, run_cli, wait_until
from crawlproc.errors import CrawlprocError, IdentityMismatch, LedgerError, ProcessorLoadError, UsageError
from crawlproc.options import OptionError
from test_run import SLEEPY_PROCESSOR, WORDS_PROCESSOR, write_processor

TIMEOUT = 120
WAIT_SECONDS = 30
TREE = {"a.txt": "one two\nthree\n", "b/c.txt": "x\n", "b/d/e.log": "hello world\nbye", "empty.txt": ""}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "data", TREE)


def run_python(code: str, cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`python -c CODE` (a __main__ without a file, as in a notebook) in a subprocess."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def opened(out: Path):
    """crawlproc.open(out) once a run has made its ledger (None before)."""
    try:
        return crawlproc.open(out)
    except (UsageError, LedgerError):
        return None


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- crawlproc.run ------------------------------------------------------------------------------

def test_run_returns_an_outcome_and_matches_the_command(data, tmp_path):
    outcome = crawlproc.run(data, out=tmp_path / "api", workers=2, no_progress=True)
    assert outcome.ok and outcome.exit_code == 0 and not outcome.interrupted
    assert outcome.counts["done"] == 4 and outcome.total == 4 and outcome.processed == 4
    assert outcome.merged_output == tmp_path / "api" / "merged.jsonl"
    assert outcome.summary_file.is_file() and outcome.summary["counts"] == outcome.counts
    assert outcome.elapsed > 0
    cli = run_cli("run", str(data), "-o", str(tmp_path / "cli"), "-w", "2", "--no-progress")
    assert cli.returncode == 0, cli.stderr
    assert outcome.merged_output.read_bytes() == (tmp_path / "cli" / "merged.jsonl").read_bytes()
    again = crawlproc.run(data, out=tmp_path / "api", workers=2, quiet=True)
    assert again.ok and again.processed == 0  # resumed: nothing left to do


def test_run_takes_options_by_their_command_names(data, tmp_path):
    outcome = crawlproc.run(str(data), out=str(tmp_path / "out"), processor="csv-stats", include="*.txt",
                            exclude=["b/d"], max_memory_per_child="512MB", timeout=60, retries=0,
                            format="csv", source_column="src", no_progress=True)
    assert outcome.ok, outcome
    assert outcome.merged_output.name == "merged.csv"
    assert outcome.counts["done"] == 3  # a.txt, b/c.txt, empty.txt
    assert outcome.summary["processor"] == "csv-stats"


@pytest.mark.parametrize("options, needle", [
    ({"workers": 0}, "workers: 0 is less than 1"),
    ({"workers": "many"}, "'many' is not a whole number"),
    ({"max_memory_per_child": "lots"}, "'lots' is not a size"),
    ({"max_failures": "ten"}, "'ten' is not N or N%"),
    ({"max_failures": (150, True)}, "(150, True) is more than 100% of the tasks"),
    ({"format": "xml"}, "'xml' is not one of jsonl, csv, parquet"),
    ({"durable": "yes"}, "'yes' is not True or False"),
    ({"param": ["novalue"]}, "'novalue' is not KEY=VALUE"),
])
def test_a_bad_option_raises_a_typed_error_not_system_exit(data, tmp_path, options, needle):
    with pytest.raises(OptionError) as caught:
        crawlproc.run(data, out=tmp_path / "out", **options)
    assert needle in str(caught.value) and caught.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_the_command_line_judges_values_with_the_same_check(data, tmp_path):
    with pytest.raises(OptionError) as caught:
        crawlproc.run(data, out=tmp_path / "out", max_memory_per_task="lots")
    result = run_cli("run", str(data), "-o", str(tmp_path / "out"), "--max-memory-per-task", "lots")
    assert result.returncode == 2 and caught.value.problem in result.stderr, result.stderr


def test_an_unknown_keyword_names_the_nearest_option(data, tmp_path):
    with pytest.raises(UsageError, match="no option 'worker'; did you mean 'workers'"):
        crawlproc.run(data, out=tmp_path / "out", worker=2)
    with pytest.raises(UsageError, match="it is an option of crawlproc.watch"):
        crawlproc.run(data, out=tmp_path / "out", settle=1)


def test_user_errors_are_crawlproc_exceptions(tmp_path, data):
    with pytest.raises(UsageError, match="does not exist"):
        crawlproc.run(tmp_path / "missing", out=tmp_path / "out")
    with pytest.raises(UsageError, match="exclude each other"):
        crawlproc.run(data, out=tmp_path / "out", cmd="wc -l {}", processor="sha256")
    with pytest.raises(UsageError, match="--scheduler needs --executor dask"):
        crawlproc.run(data, out=tmp_path / "out", scheduler="local")
    with pytest.raises(ProcessorLoadError):
        crawlproc.run(data, out=tmp_path / "out", processor="no_such_module:f")


def test_a_processor_object_from_an_importable_module_is_named_by_its_spec(data, tmp_path, monkeypatch):
    module = write_processor(tmp_path, "words_mod", WORDS_PROCESSOR.format(version="1"))
    monkeypatch.syspath_prepend(str(module.parent))
    from words_mod import words  # a module only this process's sys.path finds

    outcome = crawlproc.run(data, out=tmp_path / "out", processor=words, workers=2, no_progress=True)
    assert outcome.ok and outcome.summary["processor"] == "words_mod:words"
    assert outcome.summary["reduced"] == {"words": 7}


def test_an_edited_function_is_refused_with_the_keywords_that_accept_it(data, tmp_path):
    @crawlproc.processor(version="1")
    def count(task):
        return {"path": task.relpath}

    assert crawlproc.run(data, out=tmp_path / "out", processor=count, workers=1, quiet=True).ok

    @crawlproc.processor(version="1")
    def count(task):  # noqa: F811 - the same name, edited code
        return {"path": task.relpath, "size": len(task.read_bytes())}

    with pytest.raises(IdentityMismatch) as caught:
        crawlproc.run(data, out=tmp_path / "out", processor=count, workers=1, quiet=True)
    assert "reprocess=True" in str(caught.value) and "keep_results=True" in str(caught.value)
    redone = crawlproc.run(data, out=tmp_path / "out", processor=count, workers=1, quiet=True, reprocess=True)
    assert redone.ok and redone.processed == 4


def test_a_dry_run_returns_what_would_change(data, tmp_path):
    result = crawlproc.run(data, out=tmp_path / "out", dry_run=True, verbose=1)
    assert result.counts["new"] == 4 and sorted(result.paths["new"]) == sorted(TREE)
    assert not (tmp_path / "out").exists()


# -- processors defined in a script or a notebook -------------------------------------------------

SCRIPT = '''
import os
import crawlproc
from crawlproc import processor

with open("imports.log", "a") as log:  # no `if __name__ == "__main__"` guard: must run once
    log.write(f"{os.getpid()}\\n")
LIMIT = 2


def capped(n):
    return min(n, LIMIT)


@processor(version="1")
def words(task):
    return {"path": task.relpath, "words": capped(len(task.read_bytes().split()))}


@words.reducer
def total(records):
    return {"words": sum(r["words"] for r in records)}


outcome = crawlproc.run("data", out="out", processor=words, workers=2, no_progress=True)
print(outcome.exit_code, outcome.summary["processor"], outcome.summary["reduced"]["words"])
'''


def test_a_script_without_a_main_guard_runs_once_and_its_function_reaches_the_workers(data, tmp_path):
    (tmp_path / "script.py").write_text(SCRIPT)
    result = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "__main__:words", "5"]  # capped at 2: 2 + 1 + 2 + 0
    assert len(lines(tmp_path / "imports.log")) == 1  # neither the forkserver nor a worker re-ran it
    records = [json.loads(line) for line in (tmp_path / "out" / "merged.jsonl").read_text().splitlines()]
    assert [r["path"] for r in records] == ["a.txt", "b/c.txt", "b/d/e.log", "empty.txt"]


def test_a_notebook_function_with_a_closure_and_a_lambda_runs_and_resumes(data, tmp_path):
    code = '''
        import crawlproc

        def make(scale):
            @crawlproc.processor(version="1")
            def sized(task):
                return {"path": task.relpath, "size": scale * len(task.read_bytes()), "n": twice(1)}
            return sized

        twice = lambda n: 2 * n
        first = crawlproc.run("data", out="out", processor=make(10), workers=2, quiet=True)
        again = crawlproc.run("data", out="out", processor=make(10), workers=2, quiet=True)
        print(first.exit_code, first.processed, again.exit_code, again.processed)
    '''
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "4", "0", "0"]
    records = [json.loads(line) for line in (tmp_path / "out" / "merged.jsonl").read_text().splitlines()]
    assert records[0] == {"path": "a.txt", "size": 140, "n": 2}
    merged = run_cli("merge", "-o", str(tmp_path / "out"))  # no command line can load the function
    assert merged.returncode == 0, merged.stderr
    status = json.loads(run_cli("status", "-o", str(tmp_path / "out"), "--json").stdout)
    assert status["processor"] == "__main__:sized" and status["run_command"] is None


def test_a_class_defined_in_main_is_refused_naming_it(data, tmp_path):
    code = '''
        import crawlproc
        from crawlproc.errors import ProcessorLoadError

        class Counter:
            pass

        @crawlproc.processor
        def uses_class(task):
            return {"n": Counter.__name__}

        try:
            crawlproc.run("data", out="out", processor=uses_class, quiet=True)
        except ProcessorLoadError as exc:
            print(exc)

        import threading
        LOCK = threading.Lock()

        @crawlproc.processor
        def uses_lock(task):
            with LOCK:
                return {}

        try:
            crawlproc.run("data", out="out", processor=uses_lock, quiet=True)
        except ProcessorLoadError as exc:
            print(exc)
    '''
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "uses_class uses Counter: class Counter, defined in __main__ (move it to a module)" in result.stdout
    assert "uses_lock uses LOCK: TypeError: cannot pickle '_thread.lock' object" in result.stdout
    assert not (tmp_path / "out").exists()


# -- threads, stopping ------------------------------------------------------------------------------

def test_run_and_watch_from_a_thread_stop_when_asked(tmp_path):
    """No signal handler can be installed off the main thread: `stop` does what Ctrl-C would."""
    data = make_tree(tmp_path / "data", {f"f{i}.txt": "x\n" for i in range(6)})
    release = tmp_path / "release"
    sleepy = f"{write_processor(tmp_path, 'sleepy', SLEEPY_PROCESSOR)}:sleepy"
    results: dict[str, object] = {}
    stop = threading.Event()

    def job(name: str, run, **options) -> None:
        try:
            results[name] = run(data, out=tmp_path / name, workers=1, quiet=True, stop=stop, **options)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            results[name] = exc

    running = threading.Thread(target=job, args=("run", crawlproc.run),
                               kwargs={"processor": sleepy, "param": {"release": str(release)}})
    running.start()
    try:
        reader = wait_until(lambda: opened(tmp_path / "run"), WAIT_SECONDS, "the run's ledger")
        wait_until(lambda: list(reader.tasks("running")), WAIT_SECONDS, "a task to start")
        stop.set()
    finally:
        release.touch()  # the task in flight ends at once
        running.join(TIMEOUT)
    assert not running.is_alive()
    assert getattr(results["run"], "exit_code", results["run"]) == 130
    log = (tmp_path / "run" / "logs" / "crawlproc.log").read_text()
    assert "stop requested: finishing tasks in flight" in log and "Ctrl-C" not in log  # no key to press here

    stop.clear()
    watching = threading.Thread(target=job, args=("watch", crawlproc.watch), kwargs={"settle": 0})
    watching.start()
    wait_until(lambda: (tmp_path / "watch" / "merged.jsonl").exists(), WAIT_SECONDS, "the catch-up merge")
    stop.set()
    watching.join(TIMEOUT)
    assert not watching.is_alive()
    outcome = results["watch"]
    assert getattr(outcome, "exit_code", outcome) == 0 and outcome.counts["done"] == 6


def test_one_job_at_a_time_per_process(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "x\n"})
    release = tmp_path / "release"
    sleepy = f"{write_processor(tmp_path, 'sleepy', SLEEPY_PROCESSOR)}:sleepy"
    first = threading.Thread(target=crawlproc.run, args=(data,),
                             kwargs={"out": tmp_path / "one", "processor": sleepy, "workers": 1, "quiet": True,
                                     "param": {"release": str(release)}})
    first.start()
    try:
        wait_until(lambda: opened(tmp_path / "one"), WAIT_SECONDS, "the first job")
        with pytest.raises(UsageError, match="already running in this process"):
            crawlproc.run(data, out=tmp_path / "two")
    finally:
        release.touch()
        first.join(TIMEOUT)
    assert crawlproc.run(data, out=tmp_path / "two", workers=1, quiet=True).ok


# -- crawlproc.open -----------------------------------------------------------------------------

def test_open_reads_a_finished_out(data, tmp_path):
    out = tmp_path / "out"
    words = write_processor(tmp_path, "words", WORDS_PROCESSOR.format(version="1"))
    crawlproc.run(data, out=out, processor=f"{words}:words", workers=2, quiet=True)
    reader = crawlproc.open(out)
    merged = [json.loads(line) for line in (out / "merged.jsonl").read_text().splitlines()]
    assert list(reader.records()) == merged
    assert reader.status()["counts"]["done"] == 4 and reader.failures() == []
    assert [t["relpath"] for t in reader.tasks()] == ["a.txt", "b/c.txt", "b/d/e.log", "empty.txt"]
    assert list(reader.tasks(state="failed")) == []
    assert {t["state"] for t in reader.tasks("done")} == {"done"}
    assert reader.summary["reduced"] == {"words": 7}
    table = reader.to_arrow()
    assert table.num_rows == 4 and table.column("words").to_pylist() == [r["words"] for r in merged]
    frame = reader.to_pandas()
    assert list(frame["path"]) == [r["path"] for r in merged]


def test_tasks_give_the_path_processors_get_to_join_with_records(tmp_path):
    """A non-UTF-8 name: `relpath` is for people (\\xNN), `path` is the str processors and
    their records hold (surrogateescape), so tasks and records join on it."""
    data = make_tree(tmp_path / "data", {"a.txt": "1\n"})
    raw = b"caf\xe9.txt"
    (data / os.fsdecode(raw)).write_bytes(b"2\n")
    out = tmp_path / "out"
    crawlproc.run(data, out=out, processor="linecount", workers=1, quiet=True)
    reader = crawlproc.open(out)
    tasks = {t["path"]: t for t in reader.tasks()}
    assert {r["path"] for r in reader.records()} == tasks.keys() == {"a.txt", os.fsdecode(raw)}
    assert tasks[os.fsdecode(raw)]["relpath"] == "caf\\xe9.txt"
    assert os.fsencode(tasks[os.fsdecode(raw)]["path"]) == raw


FIELDS_VARY_PROCESSOR = """
def vary(task):
    record = {"path": task.relpath}
    if task.relpath.startswith("b"):
        record.update(n=2.5, extra={"x": 1})
    elif task.relpath.startswith("c"):
        record.update(n=3, extra={"y": "q"})
    return record
"""


def test_to_arrow_holds_the_fields_only_later_records_have(tmp_path):
    # The first merged record (a.txt) has `path` alone: every other field must still be there.
    data = make_tree(tmp_path / "data", {"a.txt": "1\n", "b.txt": "2\n", "c.txt": "3\n"})
    out = tmp_path / "out"
    vary = write_processor(tmp_path, "vary", FIELDS_VARY_PROCESSOR)
    crawlproc.run(data, out=out, processor=f"{vary}:vary", workers=1, quiet=True)
    table = crawlproc.open(out).to_arrow()
    assert table.column_names == ["path", "n", "extra"]
    assert str(table.schema.field("n").type) == "double"
    assert table.to_pylist() == [{"path": "a.txt", "n": None, "extra": None},
                                 {"path": "b.txt", "n": 2.5, "extra": {"x": 1, "y": None}},
                                 {"path": "c.txt", "n": 3.0, "extra": {"x": None, "y": "q"}}]


def test_to_arrow_of_records_whose_kinds_do_not_mix_is_a_crawlproc_error(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "1\n", "b.txt": "x\n"})
    out = tmp_path / "out"
    kind = write_processor(tmp_path, "kind", "def kind(task):\n"
                           "    text = task.read_bytes().strip().decode()\n"
                           "    return {'v': int(text) if text.isdigit() else text}\n")
    crawlproc.run(data, out=out, processor=f"{kind}:kind", workers=1, quiet=True)
    with pytest.raises(CrawlprocError, match="the records do not fit one table") as refused:
        crawlproc.open(out).to_arrow()
    # which record, of which task, and which field, as --format parquet says (it said only Arrow's words)
    assert "record 2 (task 2, b.txt), field 'v': 'x' is a string, where record 1 holds a number" in str(refused.value)
    data2 = make_tree(tmp_path / "data2", {"a.txt": "1\n", "b.txt": "x\n"})
    nested = write_processor(tmp_path, "nested", "def nested(task):\n"
                             "    text = task.read_bytes().strip().decode()\n"
                             "    return {'v': {'w': int(text) if text.isdigit() else text}}\n")
    crawlproc.run(data2, out=tmp_path / "out2", processor=f"{nested}:nested", workers=1, quiet=True)
    with pytest.raises(CrawlprocError, match="the records do not fit one table: field 'v': "):
        crawlproc.open(tmp_path / "out2").to_arrow()  # kinds that differ deeper down: the field, and Arrow's words


def test_to_arrow_of_an_integer_beyond_64_bits_says_so(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "1\n"})
    out = tmp_path / "out"
    big = write_processor(tmp_path, "big", "def big(task):\n    return {'path': task.relpath, 'n': -2**64}\n")
    crawlproc.run(data, out=out, processor=f"{big}:big", workers=1, quiet=True)
    with pytest.raises(CrawlprocError, match=r"^record 1 has an integer beyond 64 bits in field 'n' "
                                             r"\(-18446744073709551616\), which Arrow cannot hold$"):
        crawlproc.open(out).to_arrow()


def test_open_reads_records_of_a_run_still_going_and_without_a_merge(tmp_path):
    data = make_tree(tmp_path / "data", {"a.txt": "x\n", "b.txt": "y\n", "hold/z.txt": "z\n"})
    out = tmp_path / "out"
    release = tmp_path / "release"
    processor = write_processor(tmp_path, "holder", SLEEPY_PROCESSOR.replace(
        "deadline = time.monotonic() + 30", "deadline = time.monotonic() + (30 if 'hold' in task.relpath else 0)"))
    command = [sys.executable, "-m", "crawlproc", "run", str(data), "-o", str(out), "-p", f"{processor}:sleepy",
               "-w", "1", "--batch-size", "1", "--no-merge", "--no-progress", "--param", f"release={release}"]
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as run:
        try:
            reader = wait_until(lambda: opened(out), WAIT_SECONDS, "the ledger")
            done = wait_until(lambda: [r["path"] for r in reader.records()] == ["a.txt", "b.txt"],
                              WAIT_SECONDS, "two done tasks")
            assert done and reader.status()["last_run"]["state"] == "going"
            assert [t["relpath"] for t in reader.tasks("running")] == ["hold/z.txt"]
            assert reader.summary is None
        finally:
            release.touch()
            assert run.wait(TIMEOUT) == 0, run.stderr.read()
    assert [r["path"] for r in crawlproc.open(out).records()] == ["a.txt", "b.txt", "hold/z.txt"]


def test_open_says_what_is_wrong(tmp_path, data):
    with pytest.raises(UsageError, match="does not exist"):
        crawlproc.open(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LedgerError):
        crawlproc.open(tmp_path / "empty")
    crawlproc.run(data, out=tmp_path / "out", workers=1, quiet=True)
    with pytest.raises(UsageError, match="'finished' is not one of pending, running, done, failed, gone"):
        crawlproc.open(tmp_path / "out").tasks("finished")


def test_open_refuses_records_of_a_damaged_result(data, tmp_path):
    out = tmp_path / "out"
    crawlproc.run(data, out=out, workers=1, quiet=True)
    for result in (out / "results").rglob("*.jsonl"):
        result.write_bytes(result.read_bytes().replace(b"a.txt", b"A.txt"))
    with pytest.raises(CrawlprocError, match="missing or damaged"):
        list(crawlproc.open(out).records())


def test_crawlproc_run_stays_the_function_when_its_module_is_imported():
    import crawlproc.run  # noqa: F401 - the module of the same name
    import crawlproc.watch  # noqa: F401

    assert callable(crawlproc.run) and crawlproc.run.__module__ == "crawlproc"
    assert callable(crawlproc.watch) and crawlproc.watch.__module__ == "crawlproc"
    assert sys.modules["crawlproc.run"].RunOptions is not None


@pytest.mark.parametrize("name, value", [
    ("max_failures", "10%"), ("max_failures", "3"), ("max_memory_per_child", "1GiB"), ("ok_exit_codes", "1,0"),
    ("param", ("k=v",)), ("include", ("*.txt",)), ("output", "x.jsonl"), ("timeout", "2.5"), ("workers", "3"),
])
def test_a_checked_value_passes_its_check_again(name, value):
    """The command line checks a value, then hands it to the API, which checks it again."""
    from crawlproc.options import check

    once = check(name, value)
    assert check(name, once) == once


def test_an_empty_exit_code_list_is_refused_but_an_empty_size_turns_the_limit_off():
    from crawlproc.options import check

    with pytest.raises(OptionError, match="not a comma-separated list"):
        check("ok_exit_codes", "")
    assert check("max_memory_per_child", "off") is None and check("max_failures", "") is None


def test_python_values_a_user_writes_are_taken_as_the_command_line_takes_their_text():
    """serve=8080 (it said "8080 is not a string"), verbose=True ("True is not a whole number"), and
    chunk_size=0, which chunked nothing but was kept as an identity apart from no chunk size."""
    from crawlproc.options import check

    assert check("serve", 8080) == "8080" and check("serve", "0.0.0.0:0") == "0.0.0.0:0"
    assert check("verbose", True) == 1 and check("verbose", False) == 0 and check("verbose", "2") == 2
    assert check("chunk_size", 0) is None and check("chunk_size", "0") is None and check("chunk_size", "1KB") == 1024
    with pytest.raises(OptionError):
        check("serve", True)


def test_chunk_size_0_is_whole_files_to_the_next_run_too(data, tmp_path):
    out = tmp_path / "out"
    assert crawlproc.run(data, out=out, chunk_size=0, quiet=True).exit_code == 0
    again = run_cli("run", str(data), "-o", str(out), "--no-progress")  # no --chunk-size: the same job
    assert again.returncode == 0, again.stderr
    with sqlite3.connect(out / "ledger.db") as ledger:  # as an earlier crawlproc recorded --chunk-size 0
        ledger.execute("UPDATE meta SET value = '0' WHERE key = 'chunk_size'")
    for chunk in (["--chunk-size", "0"], []):
        again = run_cli("run", str(data), "-o", str(out), "--no-progress", *chunk)
        assert again.returncode == 0, again.stderr
