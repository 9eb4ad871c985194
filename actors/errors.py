"""Errors raised by the actor system.

Hierarchy::

    ActorError
    ├── JobNotFound          unknown job, or a job that belongs to someone else
    ├── LimitExceeded        a per-user limit is hit (retry after ``retry_after_s``)
    ├── Overloaded           the service-wide queue is full (retry after ``retry_after_s``)
    ├── IdempotencyConflict  an Idempotency-Key reused for a different request
    ├── ShuttingDown         the supervisor no longer admits work
    └── StoreUnavailable     the job store cannot write now (disk full, file unreadable, ...)

    ProviderError            raised by an ``ImageProvider``
    ├── TransientProviderError   worth another attempt (5xx, 429, transport errors, timeouts)
    └── PermanentProviderError   never worth another attempt (bad input, rejected token, ...)

    WebhookRejected          a provider's webhook whose signature or timestamp does not hold
"""

from __future__ import annotations


class ActorError(Exception):
    """Base class of every error the actor API raises on purpose."""


class JobNotFound(ActorError):
    """The job does not exist, or it is not the caller's (existence is not leaked)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job not found: {job_id!r}")
        self.job_id = job_id


class LimitExceeded(ActorError):
    """A per-user limit was hit."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ActorError):
    """The service has too much queued work to accept more now."""

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdempotencyConflict(ActorError):
    """An ``Idempotency-Key`` was reused with a different request."""


class ShuttingDown(ActorError):
    """The supervisor is shutting down and admits no new work."""

    retry_after_s = 5


class StoreUnavailable(ActorError):
    """The job store failed to read or write; nothing the request asked for was changed.

    ``refused`` says the store works but will never take this write (it cannot be bound, or it
    contradicts what is stored): trying it again is pointless.
    """

    retry_after_s = 5

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ProviderError(Exception):
    """Base class of errors an image provider raises."""


class TransientProviderError(ProviderError):
    """A failure that another attempt may not repeat.

    Args:
        message: What went wrong, in words a user understands.
        retry_after_s: The provider's own hint for the earliest retry, if it gave one.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentProviderError(ProviderError):
    """A failure that another attempt would repeat; the image ends ``failed``."""


class WebhookRejected(Exception):
    """A webhook whose signature, timestamp or body does not hold; nothing was changed."""
