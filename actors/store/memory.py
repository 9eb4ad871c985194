"""The in-memory store: nothing outlives the process (``STORE=memory``, and the tests)."""

from __future__ import annotations

from datetime import datetime

import attrs
import trio

from actors.errors import StoreUnavailable
from actors.messages import ImageCopy, ImageSnapshot, JobEvent
from actors.providers.base import Commit, RemoteWork
from actors.store.base import (
    AppendEvent,
    DeleteJob,
    JobRecord,
    Operation,
    PutImages,
    PutJob,
    SetCopy,
    SetRemote,
    StoredJob,
    StoreHealth,
    StoreStatistics,
    one_job_of,
)


@attrs.define(eq=False)
class _Job:
    record: JobRecord
    images: dict[int, ImageSnapshot] = attrs.Factory(dict)
    events: dict[int, JobEvent] = attrs.Factory(dict)
    remote: dict[int, tuple[str | None, datetime | None]] = attrs.Factory(dict)
    copies: dict[int, ImageCopy] = attrs.Factory(dict)


class MemoryStore:
    """Keeps records in dicts and applies every write at once.

    Args:
        resumable: Pretend to outlive the process, so that a test can stop a supervisor and
            start another on the same store (a restart on virtual time).

    Concurrency: sync and single-threaded; :meth:`write` applies the operations before it
    returns and settles the commit, so a waiter only checkpoints. ``broken`` (a test's switch)
    makes every write and check fail as a full disk would.
    """

    name = "memory"

    def __init__(self, *, resumable: bool = False) -> None:
        self.resumable = resumable
        self.broken: str | None = None
        self._jobs: dict[str, _Job] = {}
        self._writes = 0
        self._failures = 0

    async def load(self) -> tuple[StoredJob, ...]:
        await trio.lowlevel.checkpoint()
        if self.broken is not None:
            raise StoreUnavailable(self.broken)
        jobs = sorted(self._jobs.values(), key=lambda job: job.record.seq)
        return tuple(self._stored(job) for job in jobs)

    def write(self, *operations: Operation) -> Commit:
        commit = Commit()
        if self.broken is not None:
            self._failures += 1
            commit.settle(StoreUnavailable(self.broken))
            return commit
        missing = self._missing_job(operations)
        if missing is not None:
            # As SQLite's foreign keys do: the whole write is refused, nothing changes.
            commit.settle(StoreUnavailable(f"no job {missing!r} to write to"))
            return commit
        for operation in operations:
            self._apply(operation)
        self._writes += 1
        commit.settle()
        return commit

    def write_with_next(self, *operations: Operation) -> Commit:
        """Stored at once: with no transactions, nothing is gained by waiting for the next."""
        one_job_of(operations)
        return self.write(*operations)

    def _missing_job(self, operations: tuple[Operation, ...]) -> str | None:
        added: set[str] = set()
        deleted: set[str] = set()
        for operation in operations:
            if isinstance(operation, PutJob):
                added.add(operation.record.job_id)
                deleted.discard(operation.record.job_id)
            elif isinstance(operation, DeleteJob):
                deleted.add(operation.job_id)
                added.discard(operation.job_id)
            elif operation.job_id in deleted or (
                operation.job_id not in added and operation.job_id not in self._jobs
            ):
                return operation.job_id
        return None

    async def check(self) -> StoreHealth:
        await trio.lowlevel.checkpoint()
        if self.broken is not None:
            return StoreHealth(ok=False, detail=self.broken)
        return StoreHealth(ok=True, detail="ok")

    def statistics(self) -> StoreStatistics:
        return {
            "backend": self.name,
            "jobs": len(self._jobs),
            "commits": self._writes,
            "failed_commits": self._failures,
        }

    def _apply(self, operation: Operation) -> None:
        match operation:
            case PutJob(record):
                job = self._jobs.get(record.job_id)
                if job is None:
                    self._jobs[record.job_id] = _Job(record)
                else:
                    job.record = record
            case PutImages(job_id, images):
                for image in images:
                    self._jobs[job_id].images[image.index] = image
            case AppendEvent(job_id, event):
                self._jobs[job_id].events[event.id] = event
            case SetRemote(job_id, index, remote_id, pending_since):
                self._jobs[job_id].remote[index] = (remote_id, pending_since)
            case SetCopy(copy):
                self._jobs[copy.job_id].copies[copy.index] = copy
            case DeleteJob(job_id):
                self._jobs.pop(job_id, None)

    @staticmethod
    def _stored(job: _Job) -> StoredJob:
        remote = tuple(
            RemoteWork(
                job_id=job.record.job_id,
                index=index,
                prompt=job.record.prompt,
                remote_id=remote_id,
                pending_since=pending,
            )
            for index, (remote_id, pending) in sorted(job.remote.items())
        )
        return StoredJob(
            job=job.record,
            images=tuple(image for _, image in sorted(job.images.items())),
            events=tuple(event for _, event in sorted(job.events.items())),
            remote=remote,
            copies=tuple(copy for _, copy in sorted(job.copies.items())),
        )
