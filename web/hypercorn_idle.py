"""Keep Hypercorn's idle-connection timer alive under Quart-Trio.

Hypercorn's trio ``TCPServer`` closes a keep-alive connection when it has been idle for
``keep_alive_timeout`` or when the server stops, from a timer task that
``TrioSingleTask.restart`` starts with ``nursery.start``. After a response, that restart is called
from the app's own task, which quart-trio cancels as soon as the response is sent. ``start`` runs
the new task in the caller's cancel context until it reports ``started``, so the timer dies at
once: idle connections are then never closed, neither after ``keep_alive_timeout`` nor on
shutdown, where Hypercorn waits the whole ``graceful_timeout`` for them (seen with hypercorn
0.18.0, quart-trio 0.12.0: 3 s per stop with one idle keep-alive client).

The fix starts the timer shielded, so it reaches ``started`` and lives in the connection's nursery
as intended. It changes nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.trio import worker_context
from hypercorn.typing import TaskGroup

_original_restart = worker_context.TrioSingleTask.restart


async def _restart_shielded(
    self: worker_context.TrioSingleTask,
    task_group: TaskGroup,
    action: Callable[[], Awaitable[None]],
) -> None:
    with trio.CancelScope(shield=True):
        await _original_restart(self, task_group, action)


def install() -> None:
    """Apply the fix (idempotent)."""
    worker_context.TrioSingleTask.restart = _restart_shielded  # type: ignore[method-assign]
