"""Frozen values that cross task boundaries: statuses, worker reports, events, snapshots."""

from __future__ import annotations

import enum
from datetime import datetime

import attrs


class JobStatus(enum.Enum):
    """A job's status; the values are the API's strings."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED_JOB


_FINISHED_JOB = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED})


class ImageStatus(enum.Enum):
    """One image's status; ``running`` covers waiting for capacity and in flight."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


class Transport(enum.Enum):
    """How a subscriber follows a job's events."""

    SSE = "sse"
    WEBSOCKET = "websocket"


# --- worker -> job reports -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AttemptStarted:
    """A worker got capacity and is calling the provider (attempt numbers start at 1)."""

    index: int
    attempt: int
    at: datetime
    waited_s: float


@attrs.frozen(kw_only=True)
class ImageCopy:
    """The copy of an image's provider output into the image directory (``/files/{name}``).

    Journaled with the image that hands out ``/files/{name}``, so that a restart finishes a copy
    that was pending; until the copy exists, ``/files/{name}`` redirects to ``source``.
    """

    job_id: str
    index: int
    #: The file's name, ``{job_id}-{index}.{ext}``: fixed before the copy is made.
    name: str
    #: The provider's URL of the image.
    source: str
    #: Every attempt failed: ``/files/{name}`` keeps redirecting to ``source``.
    failed: bool = False


@attrs.frozen(kw_only=True)
class ImageOutcome:
    """A worker's final word on its image."""

    index: int
    status: ImageStatus
    url: str | None
    error: str | None
    attempts: int
    finished_at: datetime
    provider_s: float
    #: The copy that ``url`` (``/files/...``) waits for, stored with the image.
    copy: ImageCopy | None = None


WorkerReport = AttemptStarted | ImageOutcome


# --- events (one job's log) --------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ProgressEvent:
    """An image finished (completed, failed or canceled)."""

    id: int
    index: int
    status: ImageStatus
    url: str | None
    error: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime


@attrs.frozen(kw_only=True)
class DoneEvent:
    """The job finished; always the last event of a log."""

    id: int
    status: JobStatus
    total_ms: int
    ttfi_ms: int | None
    completed_count: int
    failed_count: int


JobEvent = ProgressEvent | DoneEvent


# --- snapshots ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ImageSnapshot:
    """One image as the job sees it now."""

    id: str
    index: int
    status: ImageStatus
    url: str | None
    error: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    wait_ms: int
    provider_ms: int


@attrs.frozen(kw_only=True)
class JobSnapshot:
    """One job as its actor sees it now."""

    job_id: str
    owner: str
    prompt: str
    num_images: int
    status: JobStatus
    created_at: datetime
    ttfi_ms: int | None
    total_ms: int | None
    images: tuple[ImageSnapshot, ...]

    def count(self, status: ImageStatus) -> int:
        return sum(1 for image in self.images if image.status is status)

    @property
    def attempts(self) -> int:
        return sum(image.attempts for image in self.images)


@attrs.frozen(kw_only=True)
class CapacityStatistics:
    """The shared capacity limiter, as ``trio.CapacityLimiter.statistics()`` plus fairness."""

    total: int
    in_use: int
    waiting: int
    jobs_waiting: int


@attrs.frozen(kw_only=True)
class SupervisorStatistics:
    """The supervisor's view, for ``GET /api/status``."""

    uptime_s: float
    shutting_down: bool
    jobs_by_status: tuple[tuple[JobStatus, int], ...]
    jobs_retained: int
    images_queued: int
    capacity: CapacityStatistics
    attempts_total: int
    retries_total: int
    images_completed_total: int
    images_failed_total: int
    #: Jobs ended by a bug of their own (their first write, a fold, their store writes, ...).
    jobs_crashed_total: int
    #: Background loops (retention, a cluster node's, the shared capacity's) that raised (a
    #: bug) and were started again (actors/tasks.py).
    tasks_failed_total: int
    subscribers: tuple[tuple[Transport, int], ...]
    #: Streams refused since the start because their user had too many open.
    subscribers_refused: tuple[tuple[Transport, int], ...]
