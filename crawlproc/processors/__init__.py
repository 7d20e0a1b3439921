"""Processors: the protocol (`base`), the built-ins (one module each), and lookup.

`BUILTINS` maps a built-in name to its `module:function` spec, so listing them
(`crawlproc processors`) imports each module only when asked.

Other packages add processors through the entry-point group
`crawlproc.processors` (entry name = processor name, value =
`module:function`), e.g. in their pyproject.toml:

    [project.entry-points."crawlproc.processors"]
    words = "mypkg.procs:words"

A plugin is usable by name (`-p words`) and listed by `crawlproc processors`.
A built-in name always wins over a plugin of the same name. Entry points are
read only when a name is not a built-in, or when listing, never at import time,
so `crawlproc --help` stays fast.
"""

from __future__ import annotations

from typing import Any

BUILTINS: dict[str, str] = {
    "linecount": "crawlproc.processors.linecount:linecount",
    "sha256": "crawlproc.processors.sha256:sha256",
    "csv-stats": "crawlproc.processors.csv_stats:csv_stats",
    "jsonl-count": "crawlproc.processors.jsonl_count:jsonl_count",
    # `crawlproc run --cmd TEMPLATE` = processor "cmd" with params["cmd"] = TEMPLATE
    "cmd": "crawlproc.processors.command:run_command",
}

ENTRY_POINT_GROUP = "crawlproc.processors"


def plugin_entry_points() -> dict[str, Any]:
    """name -> EntryPoint of the installed plugins (built-in names left out; first one wins)."""
    from importlib.metadata import entry_points

    found: dict[str, Any] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in BUILTINS and ep.name not in found:
            found[ep.name] = ep
    return found


def find_plugin(name: str) -> Any:
    """The EntryPoint of plugin `name`, or None."""
    if name in BUILTINS:
        return None
    return plugin_entry_points().get(name)


def describe_builtins() -> list[tuple[str, str, str]]:
    """(name, version, one-line description) of each built-in processor, then of each plugin."""
    from crawlproc.errors import ProcessorLoadError
    from crawlproc.processors.base import load

    rows = []
    for name in sorted(BUILTINS):
        proc = load(name)
        rows.append((name, proc.version, proc.summary_line))
    for name, ep in sorted(plugin_entry_points().items()):
        origin = f"[plugin {ep.value}" + (f" from {ep.dist.name}]" if getattr(ep, "dist", None) else "]")
        try:
            proc = load(name)
        except ProcessorLoadError as exc:
            rows.append((name, "?", f"{origin} cannot be loaded: {exc}"))
            continue
        line = proc.summary_line
        rows.append((name, proc.version, f"{line} {origin}" if line else origin))
    return rows
