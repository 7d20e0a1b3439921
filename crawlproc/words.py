"""Counts in messages for people: "1 task", "2 tasks"."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """`count` and `noun`, with an s unless the count is one ("1 file", "0 files", "3 failed tasks")."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
