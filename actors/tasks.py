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

import attrs
import trio

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
