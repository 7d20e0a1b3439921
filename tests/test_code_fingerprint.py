"""The fingerprint of a processor's code (crawlproc/processors/fingerprint.py).

Each variant is a real module file loaded by crawlproc's own loader, each at its own
path, so "the same code in another file, at other lines" is what is compared.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from crawlproc.processors.base import load
from crawlproc.processors.fingerprint import BUILT_IN, CodeFingerprint, fingerprint, python_version
from test_processors import make_plugin

BASE = '''
import json
from crawlproc import processor

SCALE = 2


def helper(text):
    return inner(text) * SCALE


def inner(text):
    return len(text.split())


class Counter:
    def __init__(self, step=1):
        self.step = step

    def count(self, items):
        return sum(self.step for _ in items)


@processor(version="1")
def words(task, limit=10):
    """Words per file."""
    text = task.read_bytes().decode()
    kinds = {"a", "b", "c"}
    firsts = [w[0] for w in text.split() if w in kinds]
    scored = sorted(firsts, key=lambda w: (w != "a", w))
    return {"path": task.relpath, "words": helper(text), "top": scored[:limit],
            "n": Counter().count(firsts), "json": json.dumps(limit)}


@words.reducer
def total(records):
    return {"words": sum(r["words"] for r in records)}
'''

# The same code as BASE: comments, blank lines, other docstrings, functions moved around.
SAME_CODE = '''
# A header comment.
import json
from crawlproc import processor


class Counter:
    """Counts things."""

    def __init__(self, step=1):
        # how far each item goes
        self.step = step

    def count(self, items):
        return sum(self.step
                   for _ in items)


SCALE = 2


@processor(version="1")
def words(task, limit=10):
    """Counts the words of a file; another docstring."""

    text = task.read_bytes().decode()  # the whole file
    kinds = {"c", "b", "a"}
    firsts = [w[0] for w in text.split()
              if w in kinds]
    scored = sorted(firsts, key=lambda w: (w != "a", w))

    return {"path": task.relpath, "words": helper(text), "top": scored[:limit],
            "n": Counter().count(firsts), "json": json.dumps(limit)}


@words.reducer
def total(records):
    # the sum of all
    return {"words": sum(r["words"] for r in records)}


def inner(text):
    return len(text.split())


def helper(text):
    """Moved below its caller."""
    return inner(text) * SCALE
'''

EDITS = {
    "a constant": ('"words": helper(text)', '"words": helper(text) + 1'),
    "an operator": ("return inner(text) * SCALE", "return inner(text) + SCALE"),
    "a called helper": ("return len(text.split())", "return len(text.split(' '))"),
    "a default argument": ("def words(task, limit=10):", "def words(task, limit=11):"),
    "the reducer": ('sum(r["words"] for r in records)', 'max(r["words"] for r in records)'),
    "a lambda": ('(w != "a", w)', '(w != "b", w)'),
    "a comprehension": ("[w[0] for w in text.split()", "[w[-1] for w in text.split()"),
    "a set constant": ('{"a", "b", "c"}', '{"a", "b", "d"}'),
    "a method of a class it uses": ("sum(self.step for _ in items)", "sum(self.step * 2 for _ in items)"),
    "a method's default": ("def __init__(self, step=1):", "def __init__(self, step=2):"),
    "the called function": ("json.dumps(limit)", "json.loads(limit)"),
    "a module constant a helper uses": ("SCALE = 2", "SCALE = 3"),
}

_counter = itertools.count()


def digest(tmp_path: Path, source: str, func: str = "words") -> CodeFingerprint:
    """Load `source` from a new file (a new path each time, as another module) and fingerprint it."""
    path = tmp_path / f"variant{next(_counter)}.py"
    path.write_text(textwrap.dedent(source))
    spec = f"{path}:{func}"
    return fingerprint(spec, load(spec))


def test_user_code_is_hashed_with_the_python_version(tmp_path):
    code = digest(tmp_path, BASE)
    major, minor = sys.version_info[:2]
    assert code.python == python_version() == f"{sys.implementation.name} {major}.{minor}"
    assert len(code.digest) == 32 and code.digest != BUILT_IN
    assert digest(tmp_path, BASE) == code  # the same file content at another path


def test_comments_blank_lines_docstrings_and_moved_lines_do_not_count(tmp_path):
    assert digest(tmp_path, SAME_CODE) == digest(tmp_path, BASE)


@pytest.mark.parametrize("what", sorted(EDITS))
def test_an_edit_of_the_code_counts(tmp_path, what):
    old, new = EDITS[what]
    assert BASE.count(old) == 1, what
    assert digest(tmp_path, BASE.replace(old, new)).digest != digest(tmp_path, BASE).digest


def test_which_global_the_code_uses_counts(tmp_path):
    base = digest(tmp_path, BASE)
    assert digest(tmp_path, BASE.replace("* SCALE", "* OTHER").replace("SCALE = 2", "OTHER = 2")) != base


def test_a_constant_the_code_does_not_use_does_not_count(tmp_path):
    unused = BASE.replace("SCALE = 2", "SCALE = 2\nUNUSED = 1")
    assert digest(tmp_path, unused.replace("UNUSED = 1", "UNUSED = 2")) == digest(tmp_path, unused)


@pytest.mark.parametrize("written", ["SCALE=2", "SCALE = (2)  # doubled", "SCALE: int = 2", "SCALE = 0x2"])
def test_a_constant_counts_by_its_value_not_its_writing(tmp_path, written):
    assert digest(tmp_path, BASE.replace("SCALE = 2", written)) == digest(tmp_path, BASE)


def test_a_value_computed_at_import_does_not_count(tmp_path, monkeypatch):
    # A setting read at import is not code: every rerun with another environment would look edited.
    from_environment = BASE.replace("SCALE = 2", "import os\nSCALE = int(os.environ.get('FP_SCALE', '2'))")
    monkeypatch.setenv("FP_SCALE", "2")
    base = digest(tmp_path, from_environment)
    monkeypatch.setenv("FP_SCALE", "3")
    assert digest(tmp_path, from_environment) == base
    from_chance = BASE.replace("SCALE = 2", "import random\nSCALE = random.random()")
    assert digest(tmp_path, from_chance) == digest(tmp_path, from_chance)


def test_each_literal_assignment_of_a_name_counts(tmp_path):
    twice = BASE.replace("SCALE = 2", "SCALE = 2\nSCALE += 1\nSCALE = max(SCALE, 1)")
    base = digest(tmp_path, twice)
    assert digest(tmp_path, twice.replace("SCALE = 2", "SCALE = 4")) != base
    assert digest(tmp_path, twice.replace("SCALE += 1", "SCALE += 2")) != base
    assert digest(tmp_path, twice.replace("SCALE += 1", "SCALE *= 1")) != base
    assert digest(tmp_path, twice.replace("max(SCALE, 1)", "max(SCALE, 2)")) == base  # computed


CLASS_CONSTANTS = '''
from crawlproc import processor


class Rules:
    RATE = 2
    LABELS: tuple = ("low", "high")
    SEEN = []

    class Limits:
        HIGHEST = 100

    def score(self, n):
        return min(n * self.RATE, self.Limits.HIGHEST)


@processor(version="1")
def scored(task):
    return {"path": task.relpath, "score": Rules().score(len(task.read_bytes()))}
'''


@pytest.mark.parametrize("old, new", [("RATE = 2", "RATE = 3"), ('("low", "high")', '("low", "top")'),
                                      ("SEEN = []", "SEEN = [1]"), ("HIGHEST = 100", "HIGHEST = 99")])
def test_a_class_constant_is_code(tmp_path, old, new):
    # `self.RATE` is an attribute, not a global: the class's body says what it is.
    assert CLASS_CONSTANTS.count(old) == 1
    edited = digest(tmp_path, CLASS_CONSTANTS.replace(old, new), "scored")
    assert edited.digest != digest(tmp_path, CLASS_CONSTANTS, "scored").digest


def test_a_class_constant_counts_by_its_value_and_a_computed_one_not_at_all(tmp_path):
    base = digest(tmp_path, CLASS_CONSTANTS, "scored")
    assert digest(tmp_path, CLASS_CONSTANTS.replace("RATE = 2", "RATE=0x2  # doubled"), "scored") == base
    computed = CLASS_CONSTANTS.replace("RATE = 2", "RATE = random.random()").replace(
        "from crawlproc import processor", "import random\nfrom crawlproc import processor")
    assert digest(tmp_path, computed, "scored") == digest(tmp_path, computed, "scored")  # another RATE each load


CLASS_DEFINED = {
    "twice": '''
        class Rules:
            RATE = 7


        class Rules:
            RATE = 2
        ''',
    "in a try block": '''
        try:
            from no_such_module_here import Rules
        except ImportError:
            class Rules:
                RATE = 2
        ''',
    "in a function": '''
        def make():
            class Rules:
                RATE = 2
            return Rules


        Rules = make()
        ''',
}


@pytest.mark.parametrize("where", sorted(CLASS_DEFINED))
def test_a_class_constant_counts_wherever_the_class_is_defined(tmp_path, where):
    source = textwrap.dedent(CLASS_DEFINED[where]) + textwrap.dedent('''

        @processor(version="1")
        def rated(task):
            return {"path": task.relpath, "n": len(task.read_bytes()) * Rules.RATE}
        ''')
    source = "from crawlproc import processor\n\n" + source
    base = digest(tmp_path, source, "rated")
    assert digest(tmp_path, source.replace("RATE = 2", "RATE = 3"), "rated") != base


WRAPPED = '''
from crawlproc import processor
from {decorators} import timed


class Rate:
    PER_BYTE = 1


@processor(version="1")
@timed
def rated(task):
    return {{"path": task.relpath, "n": len(task.read_bytes()) * Rate.PER_BYTE}}
'''

DECORATORS = '''
import functools


class Rate:  # another class of the same name, in the decorator's module
    PER_BYTE = 7


def timed(func):
    @functools.wraps(func)
    def wrapper(task):
        return func(task)
    return wrapper
'''


def test_a_class_constant_of_a_wrapped_processor_is_read_from_its_own_module(tmp_path, monkeypatch):
    # The wrapper's globals are the decorator's module: its `Rate` is not the processor's.
    (tmp_path / "fp_decorators.py").write_text(DECORATORS)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = WRAPPED.format(decorators="fp_decorators")
    base = digest(tmp_path, source, "rated")
    assert digest(tmp_path, source.replace("PER_BYTE = 1", "PER_BYTE = 1000"), "rated") != base


def test_without_the_module_source_constants_do_not_count(tmp_path):
    # As for a processor defined in a notebook: only its code is known.
    digests = set()
    for scale in ("2", "3"):
        path = tmp_path / f"gone{scale}.py"
        path.write_text(textwrap.dedent(BASE.replace("SCALE = 2", f"SCALE = {scale}")))
        proc = load(f"{path}:words")
        path.unlink()
        digests.add(fingerprint(f"{path}:words", proc))
    assert len(digests) == 1


def test_code_of_other_modules_counts_by_name_only(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    processor = '''
        from fp_helpers_{n} import shout

        def loud(task):
            return {{"text": shout(task.relpath)}}
    '''
    variants = []
    for n, body in enumerate(("return text.upper()", "return text.upper() + '!'")):
        (tmp_path / f"fp_helpers_{n}.py").write_text(f"def shout(text):\n    {body}\n")
        variants.append(digest(tmp_path, processor.format(n=n), "loud"))
    # Only the helper module's name differs: its code is not this processor's.
    assert variants[0] != variants[1]
    (tmp_path / "fp_helpers_2.py").write_text("def shout(text):\n    return text.upper()\n")
    before = digest(tmp_path, processor.format(n=2), "loud")
    (tmp_path / "fp_helpers_2.py").write_text("def shout(text):\n    return text.lower()\n")
    sys.modules.pop("fp_helpers_2")
    assert digest(tmp_path, processor.format(n=2), "loud") == before


def test_an_undecorated_function_with_recursion_and_a_closure(tmp_path):
    source = '''
        def make(threshold):
            def check(n):
                return n > threshold or (n > 0 and check(n - 1))
            return check

        big = make(5)

        def ping(n):
            return n if n <= 0 else pong(n - 1)

        def pong(n):
            return ping(n - 1)

        def plain(task):
            return {"big": big(len(task.relpath)), "p": ping(3)}
    '''
    base = digest(tmp_path, source, "plain")
    assert digest(tmp_path, source, "plain") == base
    assert digest(tmp_path, source.replace("make(5)", "make(6)"), "plain") != base  # a closure value
    assert digest(tmp_path, source.replace("ping(n - 1)", "ping(n - 2)"), "plain") != base


def test_set_constants_hash_the_same_whatever_the_hash_seed(tmp_path):
    path = tmp_path / "sets.py"
    with_module_set = BASE.replace("SCALE = 2", 'SCALE = 2\nSTOP = {"x", "y", "z"}')
    path.write_text(textwrap.dedent(with_module_set.replace("* SCALE", "* SCALE * len(STOP)")))
    script = ("import sys; from crawlproc.processors.base import load; "
              "from crawlproc.processors.fingerprint import fingerprint; "
              "print(fingerprint(sys.argv[1], load(sys.argv[1])).digest)")
    digests = set()
    for seed in ("1", "2", "3"):
        result = subprocess.run([sys.executable, "-c", script, f"{path}:words"], capture_output=True, text=True,
                                timeout=60, env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        digests.add(result.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("spec", ["linecount", "csv-stats", "cmd", "crawlproc.processors.sha256:sha256"])
def test_built_in_processors_are_identified_by_their_version(spec):
    assert fingerprint(spec, load(spec)) == CodeFingerprint(BUILT_IN, None)


def test_a_plugin_is_identified_by_its_distribution(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(make_plugin(tmp_path / "site")))
    assert fingerprint("wordy", load("wordy")) == CodeFingerprint("plugin crawlproc-test-plugin 0.1", None)
    # The same function named by its module is user code.
    spec = "crawlproc_test_plugin:words"
    assert fingerprint(spec, load(spec)).python == python_version()


def test_a_cached_helper_counts_and_an_odd_global_is_no_trouble(tmp_path):
    source = '''
        import functools

        class Lazy:
            def __getattr__(self, name):
                raise RuntimeError("not loaded yet")

        LAZY = Lazy()

        @functools.lru_cache(maxsize=None)
        def weight(word):
            return len(word)

        def scored(task):
            return {"w": weight(task.relpath), "lazy": LAZY is None}
    '''
    base = digest(tmp_path, source, "scored")
    assert digest(tmp_path, source.replace("len(word)", "len(word) * 2"), "scored") != base
