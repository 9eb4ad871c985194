"""Retry policy: which failures are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
import trio

from actors.errors import TransientProviderError

#: More attempts than this per image is a configuration mistake, not resilience.
MAX_ATTEMPTS = 100
#: Retries of work that never started (``NotStartedError``) an image gets besides its attempts.
FREE_RETRIES = 30
#: ... and none of them begins later than this after the image's first such failure.
FREE_RETRY_WINDOW_S = 300.0

#: ``uniform(low, high)``: where the jitter comes from (``random.uniform`` unless a test pins it).
Uniform = Callable[[float, float], float]


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter"): the wait before attempt ``n + 1`` is uniform in ``[0, min(max, base * 2**(n-1))]``,
    or the provider's retry-after hint if that is longer.

    Two budgets per image. ``attempts`` counts the provider calls that failed after work may have
    started (a 5xx that may have created something, a prediction that failed, a timeout in the
    middle of a generation). A failure that certainly started nothing (``NotStartedError``: a
    429, a create that created nothing, the provider unreachable, its own create pacing) costs
    no attempt: it is retried for free, with the same backoff counted from its own first retry,
    up to ``free_retries`` times and while a retry would begin within ``free_retry_window_s`` of
    the image's first such failure. Past that budget such failures count as attempts again, so an
    image never retries forever.

    Worst case per image at the defaults (3 attempts, 30 free retries within 300 s): 34 provider
    calls (the first, 30 free retries, 3 counted attempts), each cut at the attempt timeout
    (``ATTEMPT_TIMEOUT_S``, 120 s). Every free one made at most one create request, which created
    nothing (plus one read of the list of recent predictions after a 5xx), and the free retries
    all begin within 300 s of the first not-started failure. Waits after counted failures are at
    most 8 s, or a retry-after hint (Replicate's are capped at 60 s). So at most about
    300 s + 120 s (the last free call) + 3 x 120 s + 2 x 60 s = 15 minutes and 34 create
    requests, of which at most 3 may have created a prediction (each reconciled before anything
    is created again: never billed twice). Typical faults cost seconds.

    Args:
        attempts: Attempts per image, the first one included (at least 1).
        base_delay_s: Cap of the first backoff.
        max_delay_s: Cap of every backoff.
        free_retries: Retries of not-started failures an image gets besides its attempts.
        free_retry_window_s: Time from an image's first not-started failure after which no free
            retry begins.
    """

    attempts: int = attrs.field(
        default=3, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_ATTEMPTS)]
    )
    base_delay_s: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay_s: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))
    free_retries: int = attrs.field(
        default=FREE_RETRIES, validator=[attrs.validators.ge(0), attrs.validators.le(1000)]
    )
    free_retry_window_s: float = attrs.field(
        default=FREE_RETRY_WINDOW_S, validator=attrs.validators.ge(0)
    )

    def backoff_cap(self, attempt: int) -> float:
        """The largest wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))

    def delay(
        self,
        attempt: int,
        exc: BaseException,
        *,
        uniform: Uniform = random.uniform,
    ) -> float:
        """The wait after failed attempt ``attempt``, honouring a provider's ``retry_after_s``."""
        wait = uniform(0.0, self.backoff_cap(attempt))
        hint = getattr(exc, "retry_after_s", None)
        if isinstance(hint, int | float) and hint > wait:
            wait = float(hint)
        return wait

    def free_retry_delay(
        self,
        retry: int,
        elapsed_s: float,
        exc: BaseException,
        *,
        uniform: Uniform = random.uniform,
    ) -> float | None:
        """The wait before free retry number ``retry`` (1-based) of a not-started failure, or
        ``None`` once the free budget is spent: past ``free_retries``, or when the retry would
        begin later than ``free_retry_window_s`` after the image's first not-started failure
        (``elapsed_s`` ago)."""
        if retry > self.free_retries:
            return None
        wait = self.delay(retry, exc, uniform=uniform)
        if elapsed_s + wait > self.free_retry_window_s:
            return None
        return wait


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed where ``exc`` failed."""
    return isinstance(exc, TransientProviderError | trio.TooSlowError)
