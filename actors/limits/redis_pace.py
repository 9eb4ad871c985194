"""The Replicate create pace shared by every process on one Redis prefix.

One Replicate account has one rate limit, whatever the number of processes creating on it, so
the token bucket of :class:`~actors.providers.pacing.CreatePacer` is kept in Redis (a hash,
changed by the Lua scripts of :mod:`actors.limits.scripts`, on Redis's clock): a booking by
any process takes the next turn of all of them, and a 429 seen by one halves the rate and
pauses the creates of all (additive increase with every accepted create, as in one process).

Times cross processes as "seconds from now" and become times on this process's Trio clock.

Redis down: :meth:`RedisPace.book` waits for it (a create needs its turn), the others are
skipped (logged); the latest rate and 429 count seen stay readable.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

import coredis
import trio

from actors.errors import LimitsUnavailable
from actors.limits import scripts
from actors.limits.calls import RedisCalls
from actors.providers.pacing import CREATE_BURST, MAX_CREATES_PER_S, MIN_CREATES_PER_S, RATE_STEP


class RedisPace:
    """A :class:`~actors.providers.base.CreatePace` kept in Redis under ``prefix``.

    Args:
        client: An entered ``coredis.Redis`` with ``decode_responses=True``.
        prefix: The start of the pace's key (e.g. ``imagegen:limits:``).
        max_rate: Creates per second at most (the processes sharing it should agree).
        burst: Creates that may go at once before the rate applies.

    Concurrency: any number of tasks at once; each call is one script run.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        *,
        prefix: str,
        max_rate: float = MAX_CREATES_PER_S,
        burst: float = CREATE_BURST,
    ) -> None:
        self.key = f"{prefix}pace"
        self.max_rate = max_rate
        self.burst = burst
        self._calls = RedisCalls(client, "create pace")
        self._book = client.register_script(scripts.PACE_BOOK)
        self._throttled = client.register_script(scripts.PACE_THROTTLED)
        self._accepted = client.register_script(scripts.PACE_ACCEPTED)
        self._read = client.register_script(scripts.PACE_READ)
        self._throttles = 0
        self._rate = max_rate
        self._paused_until = 0.0

    @property
    def throttles(self) -> int:
        return self._throttles

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def _base(self) -> list[str]:
        return [self.key, repr(self.max_rate), repr(self.burst)]

    def _args(self, *extra: str) -> list[str]:
        return [*self._base, repr(MIN_CREATES_PER_S), repr(RATE_STEP), *extra]

    def _seen(self, answer: list[Any]) -> float:
        """Take in a script's answer; returns its time as a time on the Trio clock."""
        at = trio.current_time() + float(answer[0])
        self._throttles = int(answer[1])
        self._rate = float(answer[2])
        return at

    async def book(self) -> tuple[float, int]:
        args = self._args()
        answer: list[Any] = await self._calls.until_done(
            "booking a create", lambda: self._book(keys=[], args=args)
        )
        return self._seen(answer), self._throttles

    async def paused_until(self) -> float:
        await self._call_once("reading the pace", self._read, self._args())
        return self._paused_until

    async def throttled(self, retry_after_s: float) -> None:
        # Until Redis says otherwise, this process pauses on its own.
        self._paused_until = max(self._paused_until, trio.current_time() + retry_after_s)
        await self._call_once(
            "noting a 429", self._throttled, self._args(repr(float(retry_after_s)))
        )

    async def accepted(self) -> None:
        await self._call_once("noting an accepted create", self._accepted, self._args())

    async def _call_once(self, what: str, script: Any, args: list[str]) -> None:
        """Run ``script`` once and take the pace it answers; Redis away: this process's own."""
        with suppress(LimitsUnavailable):
            answer: list[Any] = await self._calls.once(what, lambda: script(keys=[], args=args))
            self._paused_until = self._seen(answer)
