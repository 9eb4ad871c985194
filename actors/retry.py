"""Retry policy: which failures are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs
import trio

from actors.errors import TransientProviderError

#: More attempts than this per image is a configuration mistake, not resilience.
MAX_ATTEMPTS = 100

#: ``uniform(low, high)``: where the jitter comes from (``random.uniform`` unless a test pins it).
Uniform = Callable[[float, float], float]


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter"): the wait before attempt ``n + 1`` is uniform in ``[0, min(max, base * 2**(n-1))]``.

    Args:
        attempts: Attempts per image, the first one included (at least 1).
        base_delay_s: Cap of the first backoff.
        max_delay_s: Cap of every backoff.
    """

    attempts: int = attrs.field(
        default=3, validator=[attrs.validators.ge(1), attrs.validators.le(MAX_ATTEMPTS)]
    )
    base_delay_s: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_delay_s: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))

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


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed where ``exc`` failed."""
    return isinstance(exc, TransientProviderError | trio.TooSlowError)
