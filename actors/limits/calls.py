"""Bounded calls to the Redis that holds the limits, and waiting out a Redis that is down."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import coredis
import coredis.exceptions
import trio

from actors.errors import LimitsUnavailable
from actors.tasks import uncancelled

logger = logging.getLogger("actors.limits")

T = TypeVar("T")

#: How long one call may take before it counts as failed.
CALL_TIMEOUT_S = 5.0
#: Waits between tries while Redis does not answer: doubling from the first to the second.
RETRY_S = (0.1, 2.0)

#: What a call can raise when Redis is unreachable, restarting, or answers an error.
REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.BrokenResourceError, EOFError)


class RedisCalls:
    """Calls to one Redis client, each bounded by ``timeout_s``; failures logged once per outage.

    Concurrency: shared by every task of a limit; sync bookkeeping only.
    """

    def __init__(self, client: coredis.Redis[str], what: str) -> None:
        self.client = client
        self.what = what
        self.timeout_s = CALL_TIMEOUT_S
        self.calls = 0
        self.failing: str | None = None

    async def once(self, purpose: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()`` within :attr:`timeout_s`.

        Raises:
            LimitsUnavailable: Redis failed, answered an error, or did not answer in time.
        """
        self.calls += 1
        try:
            with trio.fail_after(self.timeout_s):
                result = await uncancelled(call)  # (coredis loses a slot to a cancellation)
        except trio.TooSlowError:
            # A connection whose answer is late would delay every later call on it: start afresh.
            self.client.connection_pool.disconnect()
            raise self._failed(
                f"Redis did not answer {purpose} within {self.timeout_s:g} s"
            ) from None
        except REDIS_ERRORS as exc:
            raise self._failed(
                f"Redis failed {purpose}: {str(exc) or type(exc).__name__}"
            ) from None
        if self.failing is not None:
            logger.info("%s: Redis answers again", self.what)
            self.failing = None
        return result

    async def until_done(self, purpose: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, tried again (with growing waits) until Redis answers it."""
        delay = RETRY_S[0]
        while True:
            try:
                return await self.once(purpose, call)
            except LimitsUnavailable:
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_S[1])

    def _failed(self, detail: str) -> LimitsUnavailable:
        if self.failing is None:
            logger.warning("%s: %s (waiting for it)", self.what, detail)
        self.failing = detail
        return LimitsUnavailable(f"{self.what}: {detail}")
