"""crawlproc: run one function over every file of a directory tree, resumably.

The public API is small: `processor` to declare a processor, `Task` for what it
receives. Everything else is reached through the `crawlproc` command.
"""

from __future__ import annotations

__version__ = "0.1.0"

from crawlproc.processors.base import Processor, processor
from crawlproc.task import Task

__all__ = ["Processor", "Task", "processor", "__version__"]
