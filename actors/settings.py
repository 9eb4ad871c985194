"""Settings of the actor system (the web layer builds them from the environment)."""

from __future__ import annotations

import attrs

from actors.retry import RetryPolicy


@attrs.frozen(kw_only=True)
class SupervisorSettings:
    """Limits and timings of the supervisor and everything under it.

    Args:
        capacity: Image attempts in flight at once, across every job (``MAX_CONCURRENCY``).
        retry: Attempts and backoff per image.
        attempt_timeout_s: Time one provider call may take, not counting the wait for capacity.
        max_active_jobs_per_user: Unfinished jobs one user may have (more: ``LimitExceeded``).
        max_queued_images: Unfinished images across all jobs (more: ``Overloaded``).
        retry_after_s: What ``LimitExceeded`` and ``Overloaded`` advise.
        job_retention_s: How long a finished job stays readable.
        max_retained_jobs: How many finished jobs are kept at most (oldest forgotten first).
        provider_cancel_s: Time a provider gets to stop remote work, shielded from cancellation.
        max_streams_per_user: Event streams (SSE and WebSocket together) one user may have open
            at once (more: ``LimitExceeded``).
    """

    capacity: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    retry: RetryPolicy = attrs.Factory(RetryPolicy)
    attempt_timeout_s: float = attrs.field(default=120.0, validator=attrs.validators.gt(0))
    max_active_jobs_per_user: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    max_queued_images: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    retry_after_s: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    job_retention_s: float = attrs.field(default=3600.0, validator=attrs.validators.gt(0))
    max_retained_jobs: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    provider_cancel_s: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    max_streams_per_user: int = attrs.field(default=50, validator=attrs.validators.ge(1))
