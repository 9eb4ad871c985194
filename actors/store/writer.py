"""One writer task per store: whatever was queued while a batch was written goes into the next."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from actors.errors import StoreUnavailable
from actors.providers.base import Commit
from actors.store.base import Operation

logger = logging.getLogger(__name__)

#: Writes ``operations`` all or nothing; returns the error that failed them, if any.
Transaction = Callable[[Sequence[Operation]], Awaitable[StoreUnavailable | None]]


class BatchWriter:
    """The queue of a store's writes and the task that commits them in batches.

    A batch is everything queued when the previous one ended, written by ``transaction`` as one
    unit. If a batch is refused (a write the store will never take), each write in it is tried
    alone, so one bad write cannot fail another job's; if the store fails (locked, full,
    unreachable), the whole batch fails at once, without a try per write.

    Concurrency: :meth:`write` is sync and only queues; :meth:`run` is the one task that calls
    ``transaction``. The queue is trimmed only after a transaction, so a cancellation before it
    leaves everything queued for :meth:`close`.
    """

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction
        self.queue: list[tuple[Sequence[Operation], Commit]] = []
        self._wake = trio.Event()
        self._commits = 0
        self._failures = 0
        self._batch_max = 0

    def write(self, *operations: Operation) -> Commit:
        commit = Commit()
        self.queue.append((operations, commit))
        self._wake.set()
        return commit

    def statistics(self) -> dict[str, int]:
        return {
            "commits": self._commits,
            "failed_commits": self._failures,
            "largest_batch": self._batch_max,
            "queued": len(self.queue),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled."""
        task_status.started()
        while True:
            if not self.queue:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            await self._write_queued()

    async def _write_queued(self) -> None:
        batch = list(self.queue)
        self._batch_max = max(self._batch_max, len(batch))
        error = await self._transaction([operation for ops, _ in batch for operation in ops])
        # Only a refused write is worth isolating: a store that is down would fail each write of
        # the batch alike (and a timeout would cost its wait once per write).
        if error is None or not error.refused or len(batch) == 1:
            del self.queue[: len(batch)]
            for _, commit in batch:
                self._settle(commit, error)
            return
        for operations, commit in batch:
            error = await self._transaction(operations)
            del self.queue[0]
            self._settle(commit, error)

    def _settle(self, commit: Commit, error: StoreUnavailable | None) -> None:
        if error is None:
            self._commits += 1
        else:
            self._failures += 1
        commit.settle(error)

    async def flush(self) -> None:
        """Write everything queued now (the writer task may be gone: closing does this)."""
        while self.queue:
            await self._write_queued()

    def fail_queued(self) -> None:
        """Fail what is still queued (closing, once :meth:`flush` had its time)."""
        if self.queue:
            logger.error("store: %d writes were not stored before closing", len(self.queue))
            for _, commit in self.queue:
                commit.settle(StoreUnavailable("the store closed before this write"))
            self.queue.clear()
