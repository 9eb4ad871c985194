"""Pacing of Replicate prediction creates: a token bucket whose rate follows AIMD."""

from __future__ import annotations

import trio

#: Replicate's documented limit is 600 creates per minute.
MAX_CREATES_PER_S = 10.0
MIN_CREATES_PER_S = 0.1
#: Creates that may go at once before the rate applies ("short bursts above these are tolerated").
CREATE_BURST = 10.0
#: Additive increase of the create rate per accepted create, in creates per second.
RATE_STEP = 1.0
_EPSILON = 1e-9


class CreatePacer:
    """Process-wide pacing of prediction creates: a token bucket whose rate follows AIMD.

    Up to ``burst`` creates go at once (Replicate tolerates short bursts), then ``rate`` per
    second. A 429 halves the rate and pauses every create for the ``Retry-After``, after which
    one create goes and the bucket refills from empty; every accepted create adds ``RATE_STEP``
    back, up to ``max_rate``.

    Concurrency: shared by every attempt of the provider; ``acquire`` queues FIFO behind a
    ``trio.Lock``; ``throttled`` and ``accepted`` are sync.
    """

    def __init__(self, *, max_rate: float = MAX_CREATES_PER_S, burst: float = CREATE_BURST) -> None:
        self.max_rate = max_rate
        self.rate = max_rate
        self.burst = burst
        self.throttles = 0
        self._tokens = burst
        self._stamp = 0.0
        self._paused_until = 0.0
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = trio.current_time()
                self._refill(now)
                # The epsilon absorbs float rounding of the refill, which would otherwise leave
                # 0.999... tokens and a wake-up that is due "now" forever.
                if now >= self._paused_until and self._tokens >= 1 - _EPSILON:
                    self._tokens = max(0.0, self._tokens - 1)
                    return
                # Sleep until a token is due (a 429 meanwhile moves the target: look again).
                due = now + max(0.0, 1 - self._tokens) / self.rate
                await trio.sleep_until(max(due, self._paused_until))

    def throttled(self, retry_after_s: float) -> None:
        """Replicate answered 429: halve the rate and pause every create for ``retry_after_s``."""
        now = trio.current_time()
        self.throttles += 1
        self.rate = max(MIN_CREATES_PER_S, self.rate / 2)
        self._paused_until = max(self._paused_until, now + retry_after_s)
        # No burst after the pause: one create when it ends, then the (halved) rate.
        self._tokens = 1.0
        self._stamp = self._paused_until

    def accepted(self) -> None:
        self.rate = min(self.max_rate, self.rate + RATE_STEP)

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
