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

    Creates are *booked*, not waited for: :meth:`book` hands out the time at which one create
    may go (now, or later, in booking order) and takes its token at once, going into debt, so
    that the caller can wait for its turn elsewhere (the Replicate provider waits outside the
    attempt and its capacity token) without a crowd of callers racing for the next token. A
    429 (:meth:`throttled`) clears the debt; bookings made before it are void (``throttles``
    tells them apart) and are made again.

    Concurrency: shared by every attempt of the provider; every method is sync.
    """

    def __init__(self, *, max_rate: float = MAX_CREATES_PER_S, burst: float = CREATE_BURST) -> None:
        self.max_rate = max_rate
        self.rate = max_rate
        self.burst = burst
        self.throttles = 0
        self._tokens = burst  # negative: bookings ahead of the bucket
        self._stamp = 0.0  # the time ``_tokens`` is counted at (after ``now`` while paused)
        self._paused_until = 0.0

    @property
    def paused_until(self) -> float:
        """When the pause of the latest 429 ends (in the past when none is running)."""
        return self._paused_until

    def book(self) -> float:
        """Book one create: the (Trio clock) time at which it may be sent."""
        now = trio.current_time()
        self._refill(now)
        self._tokens -= 1
        # The epsilon absorbs float rounding of the refill, which would otherwise leave a debt
        # of 1e-16 tokens and a turn that is due "now" forever.
        debt = -self._tokens if self._tokens < -_EPSILON else 0.0
        return max(now, self._stamp) + debt / self.rate

    def throttled(self, retry_after_s: float) -> None:
        """Replicate answered 429: halve the rate and pause every create for ``retry_after_s``."""
        now = trio.current_time()
        self.throttles += 1
        self.rate = max(min(MIN_CREATES_PER_S, self.max_rate), self.rate / 2)
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


class LocalPace:
    """The :class:`~actors.providers.base.CreatePace` of one process: a :class:`CreatePacer`.

    Concurrency: as the pacer's; no method waits (the port is async for paces kept elsewhere).
    """

    def __init__(self, *, max_rate: float = MAX_CREATES_PER_S, burst: float = CREATE_BURST) -> None:
        self.pacer = CreatePacer(max_rate=max_rate, burst=burst)
        self.max_rate = max_rate

    @property
    def throttles(self) -> int:
        return self.pacer.throttles

    @property
    def rate(self) -> float:
        return self.pacer.rate

    async def book(self) -> tuple[float, int]:
        return self.pacer.book(), self.pacer.throttles

    async def paused_until(self) -> float:
        return self.pacer.paused_until

    async def throttled(self, retry_after_s: float) -> None:
        self.pacer.throttled(retry_after_s)

    async def accepted(self) -> None:
        self.pacer.accepted()
