"""Processors: the protocol (`base`), the built-ins (one module each), and lookup.

`BUILTINS` maps a built-in name to its `module:function` spec, so listing them
(`crawlproc processors`) imports each module only when asked.
"""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "linecount": "crawlproc.processors.linecount:linecount",
    "sha256": "crawlproc.processors.sha256:sha256",
}


def describe_builtins() -> list[tuple[str, str, str]]:
    """(name, version, one-line description) of each built-in processor."""
    from crawlproc.processors.base import load

    rows = []
    for name in sorted(BUILTINS):
        proc = load(name)
        rows.append((name, proc.version, proc.summary_line))
    return rows
