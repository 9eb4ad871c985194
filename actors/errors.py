"""Errors raised by the actor system.

Hierarchy::

    ActorError
    ├── JobNotFound          unknown job, or a job that belongs to someone else
    ├── LimitExceeded        a per-user limit is hit (retry after ``retry_after_s``)
    ├── Overloaded           the service-wide queue is full (retry after ``retry_after_s``)
    ├── IdempotencyConflict  an Idempotency-Key reused for a different request
    ├── ShuttingDown         the supervisor no longer admits work
    ├── StoreUnavailable     the job store cannot write now (disk full, file unreadable, ...)
    └── LimitsUnavailable    the Redis holding limits shared across processes does not answer

    ProviderError            raised by an ``ImageProvider``
    ├── TransientProviderError   worth another attempt (5xx, 429, transport errors, timeouts)
    │   └── NotStartedError      ... and nothing was started for the image (429, a create that
    │                            created nothing, the provider unreachable, create pacing)
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
    contradicts what is stored): trying it again is pointless. ``fenced`` (refused too) says
    another node of a cluster holds the job's lease now: this node must stop running the job
    without writing anything more of it.
    """

    retry_after_s = 5

    def __init__(self, message: str, *, refused: bool = False, fenced: bool = False) -> None:
        super().__init__(message)
        self.refused = refused or fenced
        self.fenced = fenced


class LimitsUnavailable(ActorError):
    """The Redis holding the limits shared by several processes did not answer (a request that
    needs them gets 503; waits for a slot go on waiting)."""

    retry_after_s = 5


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


class NotStartedError(TransientProviderError):
    """Nothing was started for the image: the provider refused or deferred it (a 429, its own
    pacing), or a create failed and certainly created nothing (a 5xx with no prediction to show
    for it, a connection that was never made).

    Another try costs nothing at the provider, so it does not use up one of the image's attempts
    (as BullMQ's rate-limit error does not); it draws on a budget of its own instead
    (:meth:`actors.retry.RetryPolicy.free_retry_delay`). Raised after the provider's call has
    done no waiting of its own: the worker waits ``retry_after_s`` out without holding capacity.
    """


class PermanentProviderError(ProviderError):
    """A failure that another attempt would repeat; the image ends ``failed``."""


class WebhookRejected(Exception):
    """A webhook whose signature, timestamp or body does not hold; nothing was changed."""
