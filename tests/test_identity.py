"""How a processor that cannot be loaded is reported: one line a person reads, exit 2."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from conftest import make_tree, run_cli
from crawlproc.errors import ProcessorLoadError
from crawlproc.processors.base import load

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


def refused(result) -> str:
    """The one line of a run refused with exit 2."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


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
