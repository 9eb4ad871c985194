"""Background loops that outlive their own bugs.

A process's background loops (a cluster node's lease renewal and job reader, the supervisor's
retention, the shared capacity's grants reader, ...) each wait out the failures they expect
(Redis down, a store that cannot write). An exception one lets through is a bug, or an answer
this release cannot read: were it to end the loop's nursery, it would end the process and every
job and stream in it. :func:`keep_running` logs it with its traceback, counts it, and starts the
loop again after a growing wait.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import attrs
import outcome
import trio

T = TypeVar("T")

#: Before a loop that failed starts again: the first wait, and the longest.
RETRY_S = (1.0, 30.0)


@attrs.define
class TaskFailures:
    """The failures of a component's background loops since the start."""

    total: int = 0
    #: The latest: ``"<loop name>: <exception repr>"``.
    last: str | None = None


async def keep_running(
    name: str,
    loop: Callable[[], Awaitable[None]],
    failures: TaskFailures,
    *,
    log: logging.Logger,
) -> None:
    """Run ``loop`` until it returns or is cancelled, starting it again (after 1 s, doubling
    up to 30 s) whenever it raises an ``Exception``; each one is logged on ``log`` and counted
    in ``failures``. Cancellation and ``BaseException`` pass through."""
    delay = RETRY_S[0]
    while True:
        try:
            await loop()
            return
        except Exception as exc:
            failures.total += 1
            failures.last = f"{name}: {exc!r}"
            log.exception("the %s failed; started again in %g s", name, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, RETRY_S[1])


async def uncancelled(call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` in a task of its own that no cancellation of the caller reaches: a caller
    cancelled (its client gone, its own timeout) stops waiting, and the call goes on to its end.

    For coredis 6.9.0's calls: its pool hands out a connection slot, and a cancellation that
    reaches the call while it opens a new connection (the HELLO handshake) loses that slot
    for good (``ConnectionPool.get_connection`` returns it only on a ``RedisError``); after
    ``max_connections`` (64) of them every call waits forever. Its own timeouts (connect,
    stream) end a call as a ``RedisError``, so a call left to run ends and gives its slot back.
    (Seen: about 200 SSE requests reset 2 ms after they were sent left a node's every Redis
    call waiting; no upstream issue was found for it.) The task is a system task: it outlives
    the caller's nursery, and only the end of the run cancels it.
    """
    done = trio.Event()
    result: list[outcome.Outcome[T]] = []

    async def run() -> None:
        result.append(await outcome.acapture(call))
        done.set()

    trio.lowlevel.spawn_system_task(run, name="uncancelled call")
    await done.wait()
    return result[0].unwrap()
