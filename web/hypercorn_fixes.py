"""Three fixes to Hypercorn 0.18.0 under Trio that a graceful shutdown needs.

1. The idle-connection timer. Hypercorn's trio ``TCPServer`` closes a keep-alive connection when
it has been idle for ``keep_alive_timeout`` or when the server stops, from a timer task that
``TrioSingleTask.restart`` starts with ``nursery.start``. After a response, that restart is called
from the app's own task, which quart-trio cancels as soon as the response is sent. ``start`` runs
the new task in the caller's cancel context until it reports ``started``, so the timer dies at
once: idle connections are then never closed, neither after ``keep_alive_timeout`` nor on
shutdown, where Hypercorn waits the whole ``graceful_timeout`` for them (seen with hypercorn
0.18.0, quart-trio 0.12.0: 3 s per stop with one idle keep-alive client).

The fix starts the timer shielded, so it reaches ``started`` and lives in the connection's nursery
as intended.

2. WebSocket pings. ``WSStream._send_pings`` sleeps a whole ``websocket_ping_interval`` before it
looks at anything, inside the connection's task group, so a stop after any WebSocket (even one
closed seconds ago) waits for that sleep or for the graceful timeout, whichever is first. The fix
also wakes on the server's ``terminated`` event.

3. Closing a connection once the server stops. When a response ends while Hypercorn is shutting
down, ``H11Protocol._maybe_recycle`` closes the connection through ``TCPServer._close``, again from
the app's task, which quart-trio cancels: ``send_eof`` raises ``Cancelled`` before ``aclose`` runs,
the socket stays open, and the stop waits the whole ``graceful_timeout`` for a client that keeps
its connection alive (seen: every SIGTERM during a shutdown grace with an SSE client, 3.1 s instead
of 0.1 s). The fix closes shielded, bounded by a second.

All are pinned to the versions in constraints.txt; a test of each (tests/e2e) fails if an
upgrade changes the behaviour they rely on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import tcp_server, worker_context
from hypercorn.typing import TaskGroup
from wsproto.events import Ping

_original_restart = worker_context.TrioSingleTask.restart
_original_close = tcp_server.TCPServer._close
#: Bounds a shielded close (an EOF to a peer that does not read could otherwise block).
CLOSE_TIMEOUT_S = 1.0


async def _restart_shielded(
    self: worker_context.TrioSingleTask,
    task_group: TaskGroup,
    action: Callable[[], Awaitable[None]],
) -> None:
    with trio.CancelScope(shield=True):
        await _original_restart(self, task_group, action)


async def _send_pings_until_stopped(self: WSStream) -> None:
    while not self.closed:
        await self._send_wsproto_event(Ping())
        with trio.move_on_after(self.config.websocket_ping_interval or 0):
            await self.context.terminated.wait()
        if self.context.terminated.is_set():
            return


async def _close_shielded(self: tcp_server.TCPServer) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await _original_close(self)


def install() -> None:
    """Apply the three fixes (idempotent)."""
    worker_context.TrioSingleTask.restart = _restart_shielded  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings_until_stopped  # type: ignore[method-assign]
    tcp_server.TCPServer._close = _close_shielded  # type: ignore[method-assign]
