"""How many tasks go in the next batch, and batch ids that are never handed out twice.

Batches adapt to the executor's target time (about 0.1 s of work locally, 0.5 s
on Dask where each batch costs a scheduler round trip): the first ones are
small, so slow tasks are spread before their speed is known; near the end, what
is left is split over everything that runs batches, so no worker idles while
another holds a long tail.
"""

from __future__ import annotations

from collections import deque
from typing import Any

MAX_BATCH_BYTES = 64 << 20  # a batch also stops at about this much input (a big file goes alone)
DEFAULT_MAX_BATCH = 512
FIRST_BATCH_SIZE = 4
BATCH_ID_BLOCK = 1000  # batch ids reserved in the ledger at a time (see BatchIds)


class BatchSizer:
    def __init__(self, target_seconds: float, parallelism: int, cap: int | None) -> None:
        self.target_seconds = target_seconds
        self.parallelism = max(1, parallelism)
        self.cap = cap or DEFAULT_MAX_BATCH
        self.avg_task_seconds: float | None = None
        self.pending_left: int | None = None  # known once a full scan is over: balances the tail

    def size(self) -> int:
        if self.avg_task_seconds is None:
            size = FIRST_BATCH_SIZE  # until a report tells how long a task takes
        else:
            size = int(self.target_seconds / max(self.avg_task_seconds, 1e-6))
        if self.pending_left is not None:  # the tail: split what is left over all workers
            size = min(size, -(-self.pending_left // (2 * self.parallelism)))
        return max(1, min(size, self.cap))

    def learn(self, elapsed: list[float]) -> None:
        """A moving average of task times: each task weighs 10%, as if they came one by one."""
        if not elapsed:
            return
        mean = sum(elapsed) / len(elapsed)
        avg = self.avg_task_seconds
        keep = 0.9 ** len(elapsed)
        self.avg_task_seconds = mean if avg is None else avg * keep + mean * (1 - keep)

    def claimed(self, n: int) -> None:
        if self.pending_left is not None:
            self.pending_left = max(0, self.pending_left - n)

    def handed_back(self, n: int) -> None:
        if self.pending_left is not None:
            self.pending_left += n


class ReadyTasks:
    """Tasks the scan recorded already claimed (see Ledger.reconcile), waiting for a batch."""

    def __init__(self) -> None:
        self._tasks: deque[tuple] = deque()

    def __len__(self) -> int:
        return len(self._tasks)

    def extend(self, tasks: list[tuple]) -> None:
        self._tasks.extend(tasks)

    def take(self, limit: int, max_bytes: int = MAX_BATCH_BYTES) -> list[tuple]:
        """Up to `limit` tasks, stopping near `max_bytes` of input (one at least)."""
        tasks: list[tuple] = []
        total = 0
        ready = self._tasks
        while ready and len(tasks) < limit:
            task = ready[0]
            total += task[3] if task[3] is not None else task[4]  # length, or size for a whole file
            if tasks and total > max_bytes:
                break
            tasks.append(ready.popleft())
        return tasks

    def drain(self) -> list[tuple]:
        tasks = list(self._tasks)
        self._tasks.clear()
        return tasks


class BatchIds:
    """Batch ids, unique across runs of an OUT.

    A result file is named after its batch id. A batch of a run that died may
    still write its file later (on a Dask cluster, a task outlives the client
    that submitted it), so a later run must never hand out that id again: ids
    are reserved in the ledger, a block at a time, in the transaction that
    claims the batch, before the batch is sent.
    """

    def __init__(self, ledger: Any) -> None:
        self._ledger = ledger
        self._next: int | None = None
        self._reserved = 0  # ids below this are recorded as reserved

    def peek(self) -> int | None:
        """The next id to be handed out, if ids were read yet."""
        return self._next

    def take(self, conn: Any) -> int:
        if self._next is None:
            self._next = self._ledger.next_batch_id()
            self._reserved = self._next
        if self._next >= self._reserved:
            self._reserved = self._next + BATCH_ID_BLOCK
            self._ledger.reserve_batch_ids(conn, self._reserved)
        batch_id = self._next
        self._next += 1
        return batch_id
