"""crawlproc.Task: what a processor sees, for a whole file and for byte ranges."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from crawlproc import Task

CONTENTS = {
    "plain": b"alpha\nbeta\ngamma\ndelta\n",
    "no_final_newline": b"one\ntwo\nthree",
    "crlf": b"first line\r\nsecond\r\n\r\nthird line here\r\nlast",
    "long_lines": b"x" * 300 + b"\n" + b"short\n" + b"y" * 500 + b"\n" + b"z" * 50,
    "empty_lines": b"\n\n\na\n\n",
    "single_newline": b"\n",
    "no_newline_at_all": b"just one line without an ending",
    "empty": b"",
    "utf8": "caf\u00e9 \u00fcber\nna\u00efve\n\u65e5\u672c\u8a9e\u306e\u884c\n".encode(),
}


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def whole(path: Path) -> Task:
    return Task(1, str(path), path.name)


def ranged(path: Path, offset: int, length: int) -> Task:
    return Task(2, str(path), path.name, offset, length)


def splits(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """A random split of [0, size) into consecutive (offset, length) ranges."""
    if size == 0:
        return [(0, 0)]
    n_cuts = rng.randint(0, min(size - 1, 12))
    cuts = sorted(rng.sample(range(1, size), n_cuts)) if n_cuts else []
    bounds = [0, *cuts, size]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


# -- whole files ------------------------------------------------------------------------

def test_whole_file_read_bytes_open_lines_and_fspath(tmp_path):
    data = CONTENTS["crlf"]
    path = write(tmp_path, "f.txt", data)
    task = Task(7, str(path), "sub/f.txt", params={"k": "v"})
    assert task.id == 7 and task.relpath == "sub/f.txt" and task.params == {"k": "v"}
    assert task.offset is None and task.length is None and not task.is_range
    assert task.read_bytes() == data
    with task.open() as f:
        assert f.read() == data
    assert list(task.lines(binary=True)) == data.splitlines(keepends=True)
    assert list(task.lines()) == data.decode().splitlines(keepends=True)
    assert os.fspath(task) == str(path)
    with open(task, "rb") as f:
        assert f.read() == data
    assert Path(task).read_bytes() == data


def test_params_default_to_empty_mapping(tmp_path):
    task = whole(write(tmp_path, "f", b"x"))
    assert dict(task.params) == {}


def test_whole_file_lines_of_empty_file(tmp_path):
    task = whole(write(tmp_path, "empty", b""))
    assert list(task.lines()) == []
    assert task.read_bytes() == b""


def test_lines_decode_with_replacement_by_default(tmp_path):
    task = whole(write(tmp_path, "latin1", b"caf\xe9\nok\n"))
    assert list(task.lines()) == ["caf\ufffd\n", "ok\n"]
    assert list(task.lines(encoding="latin-1")) == ["caf\u00e9\n", "ok\n"]
    assert list(task.lines(binary=True)) == [b"caf\xe9\n", b"ok\n"]


# -- byte ranges ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_every_line_is_yielded_by_exactly_one_range_for_random_splits(tmp_path, name):
    data = CONTENTS[name]
    path = write(tmp_path, name, data)
    expected = _split_on_lf(data)
    assert b"".join(expected) == data
    rng = random.Random(f"crawlproc-{name}")
    tried = set()
    for _ in range(300):
        ranges = splits(len(data), rng)
        tried.add(tuple(ranges))
        got = [line for offset, length in ranges for line in ranged(path, offset, length).lines(binary=True)]
        assert got == expected, ranges
    assert len(tried) >= min(20, 2 ** max(len(data) - 1, 0))  # the splits really varied


def _split_on_lf(data: bytes) -> list[bytes]:
    """The file's lines, split after each b'\\n' only (a CR stays in its line)."""
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return [line for line in lines if line]


def test_crlf_is_kept_and_a_cut_between_cr_and_lf_does_not_split_the_line(tmp_path):
    data = b"ab\r\ncd\r\nef"
    path = write(tmp_path, "crlf", data)
    cut = data.index(b"\n")  # between \r and \n
    first = list(ranged(path, 0, cut).lines(binary=True))
    second = list(ranged(path, cut, len(data) - cut).lines(binary=True))
    assert first == [b"ab\r\n"]
    assert second == [b"cd\r\n", b"ef"]


def test_each_single_byte_range_owns_the_line_starting_in_it(tmp_path):
    data = b"a\nbb\n\nccc"
    path = write(tmp_path, "f", data)
    owners = {}
    for offset in range(len(data)):
        lines = list(ranged(path, offset, 1).lines(binary=True))
        if lines:
            owners[offset] = lines
    assert owners == {0: [b"a\n"], 2: [b"bb\n"], 5: [b"\n"], 6: [b"ccc"]}


def test_range_inside_a_long_line_yields_nothing(tmp_path):
    data = b"x" * 1000 + b"\nnext\n"
    path = write(tmp_path, "long", data)
    assert list(ranged(path, 10, 100).lines(binary=True)) == []
    assert list(ranged(path, 0, 100).lines(binary=True)) == [b"x" * 1000 + b"\n"]
    assert list(ranged(path, 100, len(data) - 100).lines(binary=True)) == [b"next\n"]


def test_range_lines_as_text(tmp_path):
    data = CONTENTS["utf8"]
    path = write(tmp_path, "u", data)
    cut = data.index(b"\n") + 1
    assert list(ranged(path, 0, cut).lines()) == [data[:cut].decode()]
    assert "".join(ranged(path, cut, len(data) - cut).lines()) == data[cut:].decode()


def test_range_read_bytes_is_exactly_the_range(tmp_path):
    data = bytes(range(256)) * 8
    path = write(tmp_path, "bin", data)
    rng = random.Random(3)
    for _ in range(100):
        offset = rng.randrange(0, len(data))
        length = rng.randrange(0, len(data) - offset + 1)
        task = ranged(path, offset, length)
        assert task.is_range
        assert task.read_bytes() == data[offset:offset + length]


def test_range_open_reads_only_the_range(tmp_path):
    data = b"".join(b"line %04d\n" % i for i in range(500))
    path = write(tmp_path, "lines", data)
    offset, length = 1234, 2345
    expected = data[offset:offset + length]
    task = ranged(path, offset, length)
    with task.open() as f:
        assert f.read() == expected
        assert f.read() == b""
    with task.open() as f:  # in small pieces
        pieces = []
        while piece := f.read(7):
            pieces.append(piece)
        assert b"".join(pieces) == expected
    with task.open() as f:  # readline stops at the end of the range too
        assert b"".join(iter(f.readline, b"")) == expected
    with task.open() as f:
        assert f.read(10) == expected[:10]
        assert f.read(10**6) == expected[10:]


def test_range_open_at_end_of_file_is_short_not_past_eof(tmp_path):
    data = b"0123456789"
    path = write(tmp_path, "f", data)
    with ranged(path, 6, 100).open() as f:
        assert f.read() == b"6789"
    with ranged(path, 3, 0).open() as f:
        assert f.read() == b""


def test_range_ranges_of_the_same_file_cover_it_exactly_with_read_bytes(tmp_path):
    data = CONTENTS["long_lines"]
    path = write(tmp_path, "f", data)
    rng = random.Random(9)
    for _ in range(50):
        ranges = splits(len(data), rng)
        assert b"".join(ranged(path, o, n).read_bytes() for o, n in ranges) == data
        joined = b""
        for o, n in ranges:
            with ranged(path, o, n).open() as f:
                joined += f.read()
        assert joined == data


def test_fspath_of_a_range_is_the_file(tmp_path):
    path = write(tmp_path, "f", b"abc\ndef\n")
    task = ranged(path, 4, 4)
    assert os.fspath(task) == str(path)
    assert "f" in repr(task) and "4" in repr(task)


# -- one buffer of the task's lines -------------------------------------------------------

@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
@pytest.mark.parametrize("name", sorted(CONTENTS))
def test_line_buffer_holds_exactly_the_lines_of_the_range(tmp_path, monkeypatch, name, mapped):
    import crawlproc.task as task_mod

    monkeypatch.setattr(task_mod, "_MAP_AT_LEAST", 1 if mapped else 1 << 30)
    data = CONTENTS[name]
    path = write(tmp_path, name, data)
    assert whole(path).line_buffer() == data
    rng = random.Random(f"buffer-{name}")
    for _ in range(100):
        for offset, length in splits(len(data), rng):
            task = ranged(path, offset, length)
            buffer = task.line_buffer()
            assert isinstance(buffer, memoryview) and buffer.readonly
            assert buffer == b"".join(task.lines(binary=True)), (offset, length)


def test_line_buffer_of_a_big_range_is_a_mapping_not_a_copy(tmp_path):
    import mmap

    data = b"".join(b"row %07d\n" % i for i in range(300_000))  # 3.3 MB
    path = write(tmp_path, "big", data)
    offset = len(data) // 3
    buffer = ranged(path, offset, len(data) // 3).line_buffer()
    assert isinstance(buffer.obj, mmap.mmap)
    start = data.index(b"\n", offset - 1) + 1
    assert bytes(buffer[:12]) == data[start:start + 12]
    import pyarrow as pa

    assert pa.py_buffer(buffer).size == len(buffer)  # zero-copy into Arrow


def test_a_range_inside_one_long_line_reads_no_more_than_itself(tmp_path):
    """Each range that started inside a long line read the rest of that line to learn it owned
    nothing: a 3 MB line cut into 1 KB ranges took minutes (thousands of ranges, megabytes each)."""
    import io

    from crawlproc.task import Span, owned_span

    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"b": "' + b"x" * (1 << 20) + b'"}\n{"k": 1}\n')
    size = path.stat().st_size

    class Counted(io.FileIO):
        read_bytes = 0

        def readinto(self, buffer):
            n = super().readinto(buffer)
            Counted.read_bytes += n or 0
            return n

    with io.BufferedReader(Counted(path, "rb"), buffer_size=4096) as f:
        assert owned_span(f, 500_000, 1024, size) == Span(501_024, 501_024)  # owns no line
    assert Counted.read_bytes <= 1024 + 2 * 4096
    with open(path, "rb") as f:  # the range where the next line starts owns it, to its end
        last = size - len(b'{"k": 1}\n')
        assert owned_span(f, last - 10, 1024, size) == Span(last, size)
    calls = []

    class Unbuffered(io.FileIO):  # as load_span opens files
        def read(self, n=-1):
            calls.append(n)
            return super().read(n)

    with Unbuffered(path, "rb") as f:  # the first range owns the long line, all of it: found in blocks,
        assert owned_span(f, 0, 1024, size) == Span(0, last)  # not by readline(), a byte per system call
    assert len(calls) < 100, len(calls)
