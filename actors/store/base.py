"""The seam between the actors and where jobs are kept: records, write operations, the protocol.

Writes are *operations* queued with :meth:`JobStore.write`; a backend commits whatever is
queued in one transaction (one fsync for a burst of events from many jobs) and then tells every
waiter. Operations are idempotent upserts, so a batch that failed can be written again whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

import attrs

from actors.messages import ImageCopy, ImageSnapshot, JobEvent, JobStatus
from actors.providers.base import Commit, RemoteWork

# --- records -----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class JobRecord:
    """A job as stored; ``seq`` orders a user's jobs (newest has the largest)."""

    job_id: str
    seq: int
    owner: str
    prompt: str
    num_images: int
    idempotency_key: str | None
    status: JobStatus
    created_at: datetime
    finished_at: datetime | None = None
    ttfi_ms: int | None = None
    total_ms: int | None = None


@attrs.frozen(kw_only=True)
class StoredJob:
    """Everything stored about one job, as :meth:`JobStore.load` returns it."""

    job: JobRecord
    images: tuple[ImageSnapshot, ...]
    events: tuple[JobEvent, ...]
    remote: tuple[RemoteWork, ...] = ()
    #: Copies of provider outputs not (known to be) made yet: pending, or failed for good.
    copies: tuple[ImageCopy, ...] = ()


# --- operations --------------------------------------------------------------------------------


@attrs.frozen
class PutJob:
    """Insert or replace the job's row."""

    record: JobRecord


@attrs.frozen
class PutImages:
    """Insert or replace these images' rows (their journaled remote work is kept)."""

    job_id: str
    images: tuple[ImageSnapshot, ...]


@attrs.frozen
class AppendEvent:
    """Store one event of the job's log (ids are 1, 2, 3, ... per job)."""

    job_id: str
    event: JobEvent


@attrs.frozen
class SetRemote:
    """Journal an image's remote work (both fields are set exactly as given)."""

    job_id: str
    index: int
    remote_id: str | None
    pending_since: datetime | None


@attrs.frozen
class SetCopy:
    """Journal the copy of an image's output (replacing the image's earlier one)."""

    copy: ImageCopy

    @property
    def job_id(self) -> str:
        return self.copy.job_id


@attrs.frozen
class DeleteJob:
    """Forget the job, its images and its events."""

    job_id: str


Operation = PutJob | PutImages | AppendEvent | SetRemote | SetCopy | DeleteJob


def job_of(operation: Operation) -> str:
    """The job an operation writes to."""
    return operation.record.job_id if isinstance(operation, PutJob) else operation.job_id


def one_job_of(operations: tuple[Operation, ...]) -> str:
    """The one job ``operations`` write to.

    Raises:
        ValueError: They write to none, or to several.
    """
    jobs = {job_of(operation) for operation in operations}
    if len(jobs) != 1:
        raise ValueError(f"a held write belongs to exactly one job, not {sorted(jobs)}")
    return jobs.pop()


@attrs.frozen(kw_only=True)
class StoreHealth:
    """Whether the store works now, and if not, why (for ``GET /health``)."""

    ok: bool
    detail: str


# --- the protocol ------------------------------------------------------------------------------


#: What a store reports about itself for ``GET /api/status`` and ``/metrics`` (flat).
StoreStatistics = Mapping[str, int | float | str | None]


class JobStore(Protocol):
    """Where jobs, their images, their events and their providers' journal are kept.

    ``resumable`` says whether a later process finds what this one stored (SQLite: yes; the
    in-memory store: no), which decides what stopping means: a resumable store leaves unfinished
    jobs for the next start, anything else cancels them.
    """

    @property
    def name(self) -> str: ...

    @property
    def resumable(self) -> bool: ...

    async def load(self) -> tuple[StoredJob, ...]:
        """Every stored job, oldest first (``seq`` order).

        Raises:
            StoreUnavailable: The store cannot be read.
        """
        ...

    def write(self, *operations: Operation) -> Commit:
        """Queue ``operations`` to be stored together, in order, after everything queued before."""
        ...

    def write_with_next(self, *operations: Operation) -> Commit:
        """Queue ``operations`` (all of one job) to be stored with that job's next
        :meth:`write`, in its transaction: not before it (a backend without transactions may
        store them at once), and on closing if no write comes.

        Raises:
            ValueError: The operations are not all of one job.
        """
        ...

    async def check(self) -> StoreHealth:
        """Probe the store now (a read, and the outcome of the last write)."""
        ...

    def statistics(self) -> StoreStatistics: ...


@runtime_checkable
class ClaimsRemoteWork(Protocol):
    """A store shared by several processes (Redis), where each claims the remote work it takes
    for an image, so that no two processes give one prediction to two images. A store of one
    process needs none: that process's provider knows every prediction it has given out."""

    async def claim_remote(self, remote_id: str, job_id: str, index: int) -> bool:
        """Take ``remote_id`` for the image: ``True`` if it is the image's (now, or already),
        ``False`` if another image's.

        Raises:
            StoreUnavailable: The store cannot tell now.
        """
        ...


async def commit(store: JobStore, *operations: Operation) -> None:
    """Write ``operations`` and wait until they are stored (raises ``StoreUnavailable``)."""
    await store.write(*operations).wait()
