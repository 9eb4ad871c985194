"""Throttling of failed logins: the port, this process's own, and one shared through Redis."""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict, deque
from contextlib import suppress
from typing import Protocol

import coredis
import trio

from actors.errors import LimitsUnavailable
from actors.limits.calls import RedisCalls

# Login attempts are remembered for at most this many (client, email) pairs.
_MAX_TRACKED_LOGINS = 10_000

#: A (client address, email) pair: what failures are counted by.
LoginKey = tuple[str, str]


class LoginLimiter(Protocol):
    """Counts failed logins per (client, email) in a sliding window of ``window_s``; once
    ``max_failures`` are in it, the pair waits until the oldest leaves it."""

    async def retry_after_s(self, key: LoginKey) -> int | None:
        """Seconds until ``key`` may try again, or ``None`` if it may try now.

        Raises:
            LimitsUnavailable: The shared count cannot be read (a 503).
        """
        ...

    async def failed(self, key: LoginKey) -> None: ...

    async def succeeded(self, key: LoginKey) -> None: ...


def _whole_seconds(left_s: float) -> int:
    """A ``Retry-After`` for ``left_s`` seconds: whole seconds, rounded up past the end."""
    return max(1, int(left_s) + 1)


class LoginThrottle:
    """:class:`LoginLimiter` of one process, in memory.

    Concurrency: used from request handlers on the Trio thread; no method awaits anything but a
    checkpoint. Memory is bounded by ``_MAX_TRACKED_LOGINS`` keys of at most ``max_failures``
    stamps each.
    """

    def __init__(self, *, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: OrderedDict[LoginKey, deque[float]] = OrderedDict()

    async def retry_after_s(self, key: LoginKey) -> int | None:
        await trio.lowlevel.checkpoint()
        stamps = self._recent(key)
        if len(stamps) < self.max_failures:
            return None
        return _whole_seconds(stamps[0] + self.window_s - trio.current_time())

    async def failed(self, key: LoginKey) -> None:
        await trio.lowlevel.checkpoint()
        stamps = self._recent(key)
        stamps.append(trio.current_time())
        while len(stamps) > self.max_failures:
            stamps.popleft()
        self._failures[key] = stamps
        self._failures.move_to_end(key)
        while len(self._failures) > _MAX_TRACKED_LOGINS:
            self._failures.popitem(last=False)

    async def succeeded(self, key: LoginKey) -> None:
        await trio.lowlevel.checkpoint()
        self._failures.pop(key, None)

    def _recent(self, key: LoginKey) -> deque[float]:
        stamps = self._failures.get(key, deque())
        horizon = trio.current_time() - self.window_s
        while stamps and stamps[0] <= horizon:
            stamps.popleft()
        return stamps


#: ARGV: the key, the window (ms), the most failures kept, a unique suffix. Notes a failure.
_FAILED = r"""#!lua
local key, window, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
redis.call('ZADD', key, now, now .. ':' .. ARGV[4])
local excess = redis.call('ZCARD', key) - most
if excess > 0 then redis.call('ZREMRANGEBYRANK', key, 0, excess - 1) end
redis.call('PEXPIRE', key, window)
return 1
"""

#: ARGV: the key, the window (ms), the failures that throttle. Returns -1 (may try now), or
#: the ms until the oldest failure leaves the window.
_RETRY_AFTER = r"""#!lua
local key, window, most = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < most then return -1 end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return tonumber(oldest[2]) + window - now
"""


class RedisLoginThrottle:
    """:class:`LoginLimiter` shared by every process on one Redis prefix.

    Each (client, email) pair is a sorted set of failure times (Redis's clock) under
    ``prefix`` + a hash of the pair, expiring with the window. Redis down: ``retry_after_s`` and
    ``failed`` raise ``LimitsUnavailable`` (the login answers 503: a throttle that cannot count
    does not let guesses through); a success that cannot clear the count is logged, and the
    login goes ahead.

    Concurrency: any number of request handlers at once.
    """

    def __init__(
        self, client: coredis.Redis[str], *, prefix: str, max_failures: int, window_s: float
    ) -> None:
        self.prefix = prefix
        self.max_failures = max_failures
        self.window_s = window_s
        self._calls = RedisCalls(client, "login throttle")
        self._failed = client.register_script(_FAILED)
        self._retry_after = client.register_script(_RETRY_AFTER)

    def _key(self, key: LoginKey) -> str:
        digest = hashlib.sha256("\0".join(key).encode("utf-8", "surrogatepass")).hexdigest()
        return f"{self.prefix}{digest[:40]}"

    @property
    def _window_ms(self) -> str:
        return str(max(1, round(self.window_s * 1000)))

    async def retry_after_s(self, key: LoginKey) -> int | None:
        args = [self._key(key), self._window_ms, str(self.max_failures)]
        left_ms: int = await self._calls.once(
            "reading failed logins", lambda: self._retry_after(keys=[], args=args)
        )
        if left_ms < 0:
            return None
        return _whole_seconds(left_ms / 1000)

    async def failed(self, key: LoginKey) -> None:
        args = [self._key(key), self._window_ms, str(self.max_failures), secrets.token_hex(4)]
        await self._calls.once("noting a failed login", lambda: self._failed(keys=[], args=args))

    async def succeeded(self, key: LoginKey) -> None:
        redis_key = self._key(key)
        with suppress(LimitsUnavailable):  # logged by the calls
            await self._calls.once(
                "clearing failed logins", lambda: self._calls.client.delete([redis_key])
            )
