"""One writer task per store: whatever was queued while a batch was written goes into the next."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from actors.errors import StoreUnavailable
from actors.providers.base import Commit
from actors.store.base import Operation, job_of, one_job_of

logger = logging.getLogger(__name__)

#: Writes ``operations`` all or nothing; returns the error that failed them, if any.
Transaction = Callable[[Sequence[Operation]], Awaitable[StoreUnavailable | None]]


@attrs.frozen
class _Held:
    """A write held for its job's next one: its operations and the commit it settles."""

    job_id: str
    operations: Sequence[Operation]
    commit: Commit


@attrs.frozen
class _Write:
    """A queued write and the held writes it carries (stored first, in its transaction)."""

    own: Sequence[Operation]
    commit: Commit
    carried: tuple[_Held, ...] = ()

    @property
    def operations(self) -> list[Operation]:
        return [operation for held in self.carried for operation in held.operations] + [*self.own]


class BatchWriter:
    """The queue of a store's writes and the task that commits them in batches.

    A batch is everything queued when the previous one ended, written by ``transaction`` as one
    unit. If a batch is refused (a write the store will never take), each write in it is tried
    alone, so one bad write cannot fail another job's; if the store fails (locked, full,
    unreachable), the whole batch fails at once, without a try per write.

    :meth:`write_with_next` holds a write back until its job's next :meth:`write`, which carries
    it: one transaction for both. A carrier that fails because the store does (not refused)
    hands what it carried back to be held again, so the job's next try carries it too.

    Concurrency: :meth:`write` and :meth:`write_with_next` are sync and only queue; :meth:`run`
    is the one task that calls ``transaction``. The queue is trimmed only after a transaction,
    so a cancellation before it leaves everything queued for :meth:`close`.
    """

    def __init__(self, transaction: Transaction) -> None:
        self._transaction = transaction
        self.queue: list[_Write] = []
        self._held: dict[str, list[_Held]] = {}
        self._wake = trio.Event()
        self._commits = 0
        self._failures = 0
        self._batch_max = 0

    def write(self, *operations: Operation) -> Commit:
        carried: tuple[_Held, ...] = ()
        if self._held:
            for job_id in dict.fromkeys(job_of(operation) for operation in operations):
                carried += tuple(self._held.pop(job_id, ()))
        write = _Write(operations, Commit(), carried)
        self.queue.append(write)
        self._wake.set()
        return write.commit

    def write_with_next(self, *operations: Operation) -> Commit:
        """Hold ``operations`` (all of one job) until that job's next :meth:`write`, and store
        them in its transaction, before its own operations; or at :meth:`flush`."""
        held = _Held(one_job_of(operations), operations, Commit())
        self._held.setdefault(held.job_id, []).append(held)
        return held.commit

    def statistics(self) -> dict[str, int]:
        return {
            "commits": self._commits,
            "failed_commits": self._failures,
            "largest_batch": self._batch_max,
            "queued": len(self.queue),
            "held": sum(map(len, self._held.values())),
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
        error = await self._transaction([op for write in batch for op in write.operations])
        # Only a refused write is worth isolating: a store that is down would fail each write of
        # the batch alike (and a timeout would cost its wait once per write).
        if error is None or not error.refused or len(batch) == 1:
            del self.queue[: len(batch)]
            for write in batch:
                self._settle(write, error)
            return
        for write in batch:
            error = await self._transaction(write.operations)
            del self.queue[0]
            self._settle(write, error)

    def _settle(self, write: _Write, error: StoreUnavailable | None) -> None:
        carried = write.carried
        if error is not None and not error.refused and carried:
            # The store failed, not the write: held again (ahead of anything held since), so
            # that the job's next try carries them.
            for held in reversed(carried):
                self._held.setdefault(held.job_id, []).insert(0, held)
            carried = ()
        for commit in (write.commit, *(held.commit for held in carried)):
            if error is None:
                self._commits += 1
            else:
                self._failures += 1
            commit.settle(error)

    def release_held(self) -> None:
        """Queue the held writes on their own: closing, or handing jobs over (no write of
        theirs comes after)."""
        for held_writes in self._held.values():
            self.queue.extend(_Write(held.operations, held.commit) for held in held_writes)
        self._held.clear()

    async def flush(self) -> None:
        """Write everything queued or held now (the writer task may be gone: closing does
        this)."""
        self.release_held()
        while self.queue:
            await self._write_queued()

    def fail_queued(self) -> None:
        """Fail what is still queued or held (closing, once :meth:`flush` had its time)."""
        self.release_held()
        if self.queue:
            logger.error("store: %d writes were not stored before closing", len(self.queue))
            closed = StoreUnavailable("the store closed before this write")
            for write in self.queue:
                for commit in (write.commit, *(held.commit for held in write.carried)):
                    commit.settle(closed)
            self.queue.clear()
