"""Built-in `jsonl-count`: valid, invalid and blank lines of JSON-lines files.

Record of one task (a file, or a byte range of it with --chunk-size):

    {"path": relpath, "offset": 0, "records": 10, "invalid": 1, "blank": 2,
     "invalid_samples": [{"offset": 1234, "error": "Expecting value: line 1 column 1 (char 0)"}]}

- `records`: lines that parse as one JSON value (an object, array, string,
  number, true/false/null; Python's json also takes NaN and Infinity),
  surrounding whitespace and a CRLF allowed.
- `invalid`: non-blank lines that do not (including lines that are not UTF-8).
- `blank`: lines holding only whitespace; they count neither as records nor as
  invalid (JSON-lines readers skip them).
- `invalid_samples` (only when `invalid` > 0): the byte offset in the file of
  the first few invalid lines, and the parser's message.

Lines are the task's own (task.py's owned span), so byte ranges of one file
count every line exactly once; the reducer sums the counts.

Speed: a block of lines is checked by C code alone (str.strip and the json
module's C scanner, mapped over the lines); only a block with an invalid line
goes line by line in Python, to count and locate them. pyarrow.json would
parse faster, but it takes objects only, one type per field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from itertools import repeat
from operator import itemgetter

from crawlproc.processors.base import processor
from crawlproc.task import Task, load_span

MAX_SAMPLES = 5
REDUCED_SAMPLES = 10
BLOCK = 1 << 20              # bytes of lines checked at once
_scan_once = json.scanner.make_scanner(json.JSONDecoder())   # C: (value, end) of the value at an index
_JSON_SPACE = " \t\n\r"


@processor(version="1")
def jsonl_count(task: Task) -> dict:
    """JSON lines per file: records (valid lines), invalid lines, blank lines; sums in summary."""
    data, (start, end), base = load_span(task.path, task.offset, task.length)
    counts = [0, 0, 0]  # records, invalid, blank
    samples: list[dict] = []
    pos = start
    while pos < end:
        stop = data.find(b"\n", min(pos + BLOCK, end) - 1, end)
        stop = end if stop == -1 else stop + 1
        block = data[pos:pos + (stop - pos)]
        bom = base + pos == 0
        if not _all_valid(block, bom, counts):
            _line_by_line(block, base + pos, bom, counts, samples)
        pos = stop
    record = {"path": task.relpath, "offset": task.offset or 0,
              "records": counts[0], "invalid": counts[1], "blank": counts[2]}
    if samples:
        record["invalid_samples"] = samples
    return record


def _all_valid(block: bytes, bom: bool, counts: list[int]) -> bool:
    """Count a block whose every line is a JSON value or blank, without a Python step per line
    (the C scanner over the stripped lines); False, and nothing counted, for any other block."""
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if bom:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark opens the file
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # after the last newline: not a line
    stripped = list(map(str.strip, lines, repeat(_JSON_SPACE)))
    values = list(filter(None, stripped))
    try:
        ends = list(map(itemgetter(1), map(_scan_once, values, repeat(0))))
    except (ValueError, StopIteration):
        return False
    if ends != list(map(len, values)):  # something after a value on some line
        return False
    counts[0] += len(values)
    counts[2] += len(lines) - len(values)
    return True


def _line_by_line(block: bytes, offset: int, bom: bool, counts: list[int], samples: list[dict]) -> None:
    """Each line parsed alone: the invalid ones counted and the first few described."""
    loads = json.loads
    for line in _split_lf(block):
        try:
            text = line.decode("utf-8")
            if bom:
                text = text.removeprefix("\ufeff")
                bom = False
            loads(text)
            counts[0] += 1
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            if line.isspace():
                counts[2] += 1
            else:
                counts[1] += 1
                if len(samples) < MAX_SAMPLES:
                    samples.append({"offset": offset, "error": _message(exc)})
        offset += len(line)


def _split_lf(block: bytes) -> list[bytes]:
    """Lines ending at \\n only (a CR stays in its line)."""
    lines = [line + b"\n" for line in block.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return [line for line in lines if line]


def _message(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return exc.msg + f" (column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8: {exc.reason} at byte {exc.start}"
    return str(exc)[:200]


@jsonl_count.reducer
def jsonl_totals(records: Iterable[dict]) -> dict:
    """Sums over every file and chunk."""
    paths: set[str] = set()
    tasks = valid = invalid = blank = 0
    samples: list[dict] = []
    for record in records:
        tasks += 1
        paths.add(record["path"])
        valid += record["records"]
        invalid += record["invalid"]
        blank += record["blank"]
        for sample in record.get("invalid_samples", ()):
            if len(samples) < REDUCED_SAMPLES:
                samples.append({"path": record["path"], **sample})
    out = {"files": len(paths), "tasks": tasks, "records": valid, "invalid": invalid, "blank": blank}
    if samples:
        out["invalid_samples"] = samples
    return out
