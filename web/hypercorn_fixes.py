"""Fixes to Hypercorn 0.18.0 under Trio: graceful shutdown, and no connection can end the process.

Each fix replaces one method, is pinned to the versions in constraints.txt, and has a test
(tests/web/test_hypercorn_fixes.py, tests/e2e/) that fails without it.

Shutdown:

1. The idle-connection timer. Hypercorn's trio ``TCPServer`` closes a keep-alive connection when
   it has been idle for ``keep_alive_timeout`` or when the server stops, from a timer task that
   ``TrioSingleTask.restart`` starts with ``nursery.start``. After a response, that restart is
   called from the app's own task, which quart-trio cancels as soon as the response is sent, so
   the timer died at once: idle connections were never closed, and every stop waited the whole
   ``graceful_timeout`` for them. The fix starts the timer shielded.
2. WebSocket pings. ``WSStream._send_pings`` sleeps a whole ``websocket_ping_interval`` inside
   the connection's task group, so a stop after any WebSocket waited for that sleep. The fix also
   wakes on the server's ``terminated`` event.
3. Closing a connection once the server stops. ``TCPServer._close`` runs from the app's task,
   which quart-trio cancels: ``send_eof`` raised ``Cancelled`` before ``aclose`` ran and the stop
   waited the whole ``graceful_timeout`` for a client that keeps its connection alive. The close
   is shielded and bounded (see 5).

Never down (hypercorn issue #225, and PR #228 which contained connection errors and was
reverted upstream; h11 and wsproto raise ``LocalProtocolError`` for what a peer may send):

4. Containment. Whatever one connection raises ends that connection only: ``TCPServer.run``
   catches it, closes the socket, logs one WARNING with the peer and the exception type (the
   traceback at DEBUG) and counts it in :data:`connection_errors` (``/metrics``:
   ``imagegen_connection_errors_total{kind}``). Cancellation still propagates. Without it, an
   exception escaping one connection's task group ends ``trio.serve_listeners`` and the process.
5. Sends and EOF on one socket are serialized. ``protocol_send`` writes under ``send_lock`` but
   ``_close`` called ``send_eof`` without it, so a Pong, a Ping or a response racing a close
   raised ``trio.BusyResourceError`` out of the connection (seen with keepalive-pinging
   WebSocket clients, invalid UTF-8, unknown opcodes). The EOF now takes the lock (waiting at
   most ``CLOSE_TIMEOUT_S``, then the socket is closed without it, which wakes a stuck sender
   with ``ClosedResourceError``).
6. A peer that never reads. Hypercorn's writes are shielded and unbounded: a client that stops
   reading held its connection's task, and every graceful stop, forever. A write that makes no
   progress for ``SEND_TIMEOUT_S`` (nginx's ``send_timeout`` idea) closes the connection.
7. Data before the WebSocket handshake completes (issue #225). A client that sends bytes right
   after its upgrade request made Hypercorn answer 400 while the app was already accepting; h11
   then raised ``LocalProtocolError`` and the process died. Such bytes are now held (at most
   ``EARLY_DATA_MAX_BYTES``) and handed to the WebSocket once the app accepts: pipelined frames
   work, garbage fails the WebSocket with a close frame. An app that rejects the upgrade drops
   them.
8. Frames that break RFC 6455 (invalid UTF-8, reserved bits, bad close codes, ...). wsproto
   reports them as a ``CloseConnection`` with the right code while its state stays OPEN, and
   Hypercorn then dropped the TCP connection without a close frame (the client saw 1006). The
   close frame with wsproto's code (1002, 1007, ...) is now sent first (RFC 6455 section 7.1.7).
   The WebSocket's event handling also runs under a per-stream lock, since 7 hands early data to
   it from a second task.
9. Messages for an app that has finished. Hypercorn hands a request's body chunks and a
   WebSocket's messages to the app through a channel of ``max_app_queue_size``; once the app
   returned nobody read it, so a client that kept sending (a body past the size limit, frames to
   a WebSocket the app closed, even unauthenticated) left the connection's reader blocked
   forever: its task and memory leaked, one connection at a time. The channel is now closed
   when the app returns, and what arrives later is dropped.

A peer that is gone:

10. A connection outlived its client. When the client closed or reset its socket, Hypercorn's
    reader ended but the connection's task group still waited for the keep-alive timer
    (``keep_alive_timeout``) or for the WebSocket ping task's next ping (``HEARTBEAT_S``): the
    socket sat in CLOSE_WAIT, holding its descriptor, its memory and its place in the user's
    stream cap. Under clients that drop and come back this piled up to hundreds of sockets. Now
    the reader's end stops the idle timer for good (h11 may still start a next keep-alive cycle
    after a reset it never saw: that no longer restarts it), and a WebSocket stream's close
    cancels the ping task's wait. An event stream ends through the reader too (its EOF or reset
    is the app's ``http.disconnect``); a client that vanished without either is found by the
    next heartbeat's failed write, or by 6. A reader paused by h11 (a request pipelined behind
    an answer in progress) does not read the EOF: it waited for the end of that answer, which
    never came once a failed write had closed the socket, and held the connection's task
    forever; closing the socket now ends a paused reader. No upstream report of these was found.

HTTP/1.1 requests Hypercorn takes at their word:

11. An ``Upgrade: h2c`` whose ``HTTP2-Settings`` is missing, repeated, not base64url or not a
    valid SETTINGS payload (or an HTTP/1.0 one, or one without an ``upgrade`` connection
    option). Hypercorn answered 101 and switched to HTTP/2 whatever the header held (RFC 7540
    section 3.2.1: a server MUST NOT upgrade without exactly one), and when h2 could not parse
    it, the connection failed after its 101 (contained by 4, but no answer). Such a request is
    now served in HTTP/1.1, the upgrade ignored (RFC 9110 section 7.8 lets a server ignore it;
    for HTTP/1.0 it must). Upstream, h2c upgrades in 0.18 are Hypercorn #317 and #318.
12. A request with both ``Transfer-Encoding`` and ``Content-Length`` (request smuggling: a
    proxy in front that frames it by the length sees a different next request than h11, which
    frames it by the coding). Hypercorn answered it and went on reading the connection, so the
    bytes a proxy took for the body were answered as a request of their own. Such a request is
    still answered (framed by its Transfer-Encoding), then with ``Connection: close`` the
    connection ends (RFC 9112 section 6.1: the server MUST close it), and nothing after it is
    read. A WebSocket upgrade carrying both is refused: 400 with a ``detail``, and closed.
    Upstream: Hypercorn #279 and h11 #90, both open.

Lean connections:

13. An app may be cancelled as soon as its client goes away. Hypercorn only puts
    ``http.disconnect`` (``websocket.disconnect``) in the app's channel; a framework that wants
    to stop then needs a task of its own per request reading that channel (quart-trio has one,
    and the nursery that holds it, for as long as an event stream lasts). The app now runs in a
    cancel scope, and the scope offers the ASGI extension :data:`CANCEL_ON_DISCONNECT`, whose
    ``arm()`` makes the client's disconnect cancel it, so an app (web/asgi.py) may serve a
    stream without that extra task.
14. No timer per read. ``TCPServer._read_data`` wraps every read in ``trio.fail_after(
    read_timeout or inf)``: with no ``read_timeout`` (the default) a cancel scope that never
    fires, and the generator and context manager of ``fail_after``, about 1 KiB for every
    connection waiting for its client's next bytes (every open event stream). Without a
    ``read_timeout`` the read (the one 10 wraps) is now made without them.

Bounded WebSocket input:

15. A message over ``websocket_max_message_size``. Hypercorn's ``WebsocketBuffer.extend``
    writes each piece before it checks the length, and on ``FrameTooLargeError`` its
    ``_handle_events`` sends the 1009 close and only ``break``s: the buffer is never cleared
    and the connection goes on reading (wsproto accepts data in ``LOCAL_CLOSING``), so every
    later byte of a frame that declares a huge length, or of continuation frames that never set
    FIN, was appended to the buffer until the app returned (a stream route: the job's end); the
    memory then waited for a full collection (the stream is in reference cycles). The buffer is
    now cleared and the connection failed after the close frame, as 8 does. And a put of the
    app's own task (its send found the socket closed: Hypercorn then puts the disconnect) onto
    its full channel, which only that task reads, waited forever (a route that reads no
    messages, after ``max_app_queue_size`` of them): it no longer waits, and the disconnect
    cancels the app (13) once that send returns. Upstream (Hypercorn 0.18.0,
    ``protocol/ws_stream.py`` ``_handle_events`` and ``WebsocketBuffer.extend``): no issue
    found; its author places the limit in this buffer, not in wsproto (uvicorn #306).

:data:`open_connections` counts the connections being served (``/metrics``:
``imagegen_connections_open``), which is how a leak like 9 shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.exceptions
import h11
import hyperframe.exceptions
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Body, Data, Event as StreamEvent, Response, StreamClosed
from hypercorn.protocol.ws_stream import ASGIWebsocketState, FrameTooLargeError, WSStream
from hypercorn.trio import task_group, tcp_server, worker_context
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, Scope, TaskGroup
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

logger = logging.getLogger("web.connections")

#: Bounds a shielded close (an EOF to a peer that does not read could otherwise block).
CLOSE_TIMEOUT_S = 1.0
#: A write that makes no progress for this long closes the connection (a peer not reading).
SEND_TIMEOUT_S = 30.0
#: Bytes a WebSocket client may send before its handshake completes (more: the socket closes).
EARLY_DATA_MAX_BYTES = 64 * 1024

#: The ASGI scope extension of fix 13: the server cancels the app when the client disconnects.
CANCEL_ON_DISCONNECT = "imagegen.cancel_on_disconnect"

#: Connection errors contained since the process started, by exception type (process-wide, as
#: the patched classes are).
connection_errors: Counter[str] = Counter()
#: Connections being served now (process-wide).
open_connections = 0

_original_restart = worker_context.TrioSingleTask.restart
_original_run = tcp_server.TCPServer.run
_original_protocol_send = tcp_server.TCPServer.protocol_send
_original_ws_handle = WSStream.handle
_original_ws_accept = WSStream._accept
_original_read_data = tcp_server.TCPServer._read_data
_original_check_protocol = hypercorn_h11.H11Protocol._check_protocol
_original_h11_init = hypercorn_h11.H11Protocol.__init__
_original_create_stream = hypercorn_h11.H11Protocol._create_stream
_original_stream_send = hypercorn_h11.H11Protocol.stream_send


# --- 1, 2: shutdown --------------------------------------------------------------------------


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
        with trio.move_on_after(self.config.websocket_ping_interval or 0) as wait:
            # 10: the stream's close cancels this wait (``_stop_pinging``).
            self._ping_wait = wait  # type: ignore[attr-defined]
            if not self.closed:
                await self.context.terminated.wait()
        if self.context.terminated.is_set():
            return


def _stop_pinging(stream: WSStream) -> None:
    wait: trio.CancelScope | None = getattr(stream, "_ping_wait", None)
    if wait is not None:
        wait.cancel()


# --- 4: containment --------------------------------------------------------------------------


def _peer(stream: object) -> str:
    transport = getattr(stream, "transport_stream", stream)
    try:
        host, port, *_ = transport.socket.getpeername()  # type: ignore[attr-defined]
    except (AttributeError, OSError, TypeError, ValueError):
        return "unknown peer"
    return f"{host}:{port}"


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def contain(peer: str, error: BaseException) -> None:
    """Log and count an exception that ended one connection (never re-raised)."""
    leaves = _leaves(error)
    kind = type(leaves[0]).__name__
    connection_errors[kind] += 1
    logger.warning(
        "connection error from %s: %s: %s",
        peer,
        kind,
        leaves[0],
        extra={"peer": peer, "kind": kind, "errors": [type(leaf).__name__ for leaf in leaves]},
    )
    logger.debug("connection error from %s", peer, exc_info=error)


async def _run_contained(self: tcp_server.TCPServer) -> None:
    global open_connections  # noqa: PLW0603 (a process-wide gauge, as the patch is)
    peer = _peer(self.stream)
    open_connections += 1
    try:
        await _original_run(self)
    except* Exception as group:  # noqa: BLE001 (the boundary: see 4 above)
        contain(peer, group)
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await self.stream.aclose()
    finally:
        open_connections -= 1


# --- 9: messages for an app that has finished ------------------------------------------------


async def _spawn_app(
    self: task_group.TaskGroup,
    app: AppWrapper,
    config: Config,
    scope: Scope,
    send: Callable[[ASGISendEvent | None], Awaitable[None]],
) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
    """Hypercorn's ``TaskGroup.spawn_app``, closing the app's channel when the app returns."""
    app_send, app_receive = trio.open_memory_channel[ASGIReceiveEvent](config.max_app_queue_size)
    app_task: trio.lowlevel.Task | None = None

    async def run_app() -> None:
        nonlocal app_task
        app_task = trio.lowlevel.current_task()
        with app_receive:  # closing wakes a reader blocked on a full channel
            await task_group._handle(
                app,
                config,
                scope,
                app_receive.receive,
                send,
                trio.to_thread.run_sync,
                trio.from_thread.run,
            )

    async def put(message: ASGIReceiveEvent) -> None:
        if trio.lowlevel.current_task() is app_task:
            # 15: the app's own send closed the stream; only this task reads the channel, so a
            # full one would never drain: the message is dropped (the disconnect cancels, 13).
            with contextlib.suppress(trio.BrokenResourceError, trio.WouldBlock):
                app_send.send_nowait(message)
            return
        with contextlib.suppress(trio.BrokenResourceError):  # the app returned: nobody reads
            await app_send.send(message)

    assert self._nursery is not None
    self._nursery.start_soon(run_app)
    return put


# --- 3, 5, 6: sends and closes ---------------------------------------------------------------


async def _protocol_send(self: tcp_server.TCPServer, event: Event) -> None:
    if isinstance(event, Updated) and event.idle and getattr(self, "_peer_gone", False):
        return  # 10: no idle timer for a connection whose peer is gone
    if not isinstance(event, RawData):
        await _original_protocol_send(self, event)
        return
    async with self.send_lock:
        try:
            # Shielded as Hypercorn's is (a cancelled sender must not cut a frame in half),
            # but bounded.
            with trio.move_on_after(SEND_TIMEOUT_S, shield=True) as scope:
                await self.stream.send_all(event.data)
            failed = scope.cancelled_caught
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            failed = True
        if failed:
            # Closing is what a stalled write leaves possible: part of the data may be sent.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await self.stream.aclose()
            _stop_paused_reader(self)
            await self.protocol.handle(Closed())


async def _send_eof(self: tcp_server.TCPServer) -> None:
    lock = self.send_lock
    try:
        if lock.statistics().owner is trio.lowlevel.current_task():
            await self.stream.send_eof()
        else:
            async with lock:
                await self.stream.send_eof()
    except (
        AttributeError,  # an SSLStream has no EOF of its own
        trio.BrokenResourceError,
        trio.BusyResourceError,
        trio.ClosedResourceError,
        OSError,
    ):
        pass  # the peer is gone or the socket is closed already: nothing to tell it


async def _close_serialized(self: tcp_server.TCPServer) -> None:
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await _send_eof(self)
    # Trio closes a stream even when its aclose is cancelled; the bound is for TLS's goodbye.
    with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await self.stream.aclose()
    _stop_paused_reader(self)


# --- 10: a peer that is gone --------------------------------------------------------------------


class _ReaderStopped(Exception):
    """Ends a reader paused for an answer when the connection's socket is closed."""


class _ReaderGate(worker_context.EventWrapper):
    """``H11Protocol.can_read``: the reader waits on it while h11 holds a pipelined request
    until the answer in progress ends. Closing the socket opens it for good: the reader ends
    (:class:`_ReaderStopped`) instead of waiting for an answer that can no longer be sent."""

    def __init__(self) -> None:
        super().__init__()
        self._closed = False
        self._waiting: trio.CancelScope | None = None

    async def wait(self) -> None:
        if not self._closed:
            with trio.CancelScope() as self._waiting:
                await super().wait()
            self._waiting = None
        if self._closed:
            raise _ReaderStopped

    def close(self) -> None:
        self._closed = True
        if self._waiting is not None:
            self._waiting.cancel()


def _h11_init(self: hypercorn_h11.H11Protocol, *args: Any, **kwargs: Any) -> None:
    _original_h11_init(self, *args, **kwargs)
    self.can_read = _ReaderGate()


def _stop_paused_reader(server: tcp_server.TCPServer) -> None:
    protocol = getattr(getattr(server, "protocol", None), "protocol", None)
    gate = getattr(protocol, "can_read", None)  # none on HTTP/2
    if isinstance(gate, _ReaderGate):
        gate.close()


async def _read_data_then_release(self: tcp_server.TCPServer) -> None:
    """Hypercorn's reader; once it ends (EOF, reset, or the socket closed) the idle timer stops
    and is never started again, so the connection ends with its last task."""
    try:
        await _read_data_untimed(self)  # 14
    except _ReaderStopped:
        await self.protocol.handle(Closed())  # as the reader's own end does (idempotent)
    self._peer_gone = True  # type: ignore[attr-defined]
    await self.idle_task.stop()


# --- 11: an h2c upgrade that cannot be taken --------------------------------------------------

#: ``token68`` in base64url with its padding left out (RFC 7540 section 3.2.1); a settings
#: payload is 6 bytes a setting, so a valid one never needs padding.
_H2C_SETTINGS = re.compile(rb"[A-Za-z0-9_-]+")


def _header_values(request: h11.Request, name: bytes) -> list[bytes]:
    return [value for key, value in request.headers if key == name]


def _tokens(request: h11.Request, name: bytes) -> set[bytes]:
    return {
        token.strip().lower()
        for value in _header_values(request, name)
        for token in value.split(b",")
    }


def _h2c_upgrade_acceptable(request: h11.Request) -> bool:
    """Whether Hypercorn may switch this ``Upgrade: h2c`` request to HTTP/2: HTTP/1.1, an
    ``upgrade`` connection option, and exactly one ``HTTP2-Settings`` that h2 accepts."""
    settings = _header_values(request, b"http2-settings")
    if (
        request.http_version != b"1.1"
        or b"upgrade" not in _tokens(request, b"connection")
        or len(settings) != 1
        or not _H2C_SETTINGS.fullmatch(settings[0])
    ):
        return False
    try:  # what Hypercorn will do with it, on a connection of its own
        probe = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        probe.initiate_upgrade_connection(settings[0])
    except (ValueError, h2.exceptions.H2Error, hyperframe.exceptions.HyperframeError):
        return False
    return True


async def _check_protocol(self: hypercorn_h11.H11Protocol, event: h11.Request) -> None:
    upgrade = _header_values(event, b"upgrade")
    if upgrade and upgrade[-1].strip().lower() == b"h2c" and not _h2c_upgrade_acceptable(event):
        return  # served in HTTP/1.1, the upgrade ignored (RFC 9110 section 7.8)
    await _original_check_protocol(self, event)


# --- 12: a request with both Transfer-Encoding and Content-Length -----------------------------

_SMUGGLING_DETAIL = json.dumps(
    {"detail": "A request with both Transfer-Encoding and Content-Length cannot open a WebSocket"}
).encode()


async def _create_stream(self: hypercorn_h11.H11Protocol, request: h11.Request) -> None:
    if not (
        _header_values(request, b"transfer-encoding") and _header_values(request, b"content-length")
    ):
        await _original_create_stream(self, request)
        return
    # A front proxy may have framed this request by its Content-Length where h11 frames it by
    # its Transfer-Encoding: the rest of the connection is not to be trusted.
    self._close_after_response = True  # type: ignore[attr-defined]
    if request.method == b"GET" and b"websocket" in _tokens(request, b"upgrade"):
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_SMUGGLING_DETAIL)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=400, headers=headers))
        await self._send_h11_event(h11.Data(data=_SMUGGLING_DETAIL))
        await self._send_h11_event(h11.EndOfMessage())
        await self.send(Closed())
        return
    await _original_create_stream(self, request)


async def _stream_send(self: hypercorn_h11.H11Protocol, event: StreamEvent) -> None:
    if (
        isinstance(event, Response)
        and event.status_code >= 200
        and getattr(self, "_close_after_response", False)
    ):
        # h11 then ends the connection after this answer: what follows is never read.
        event = dataclasses.replace(event, headers=[*event.headers, (b"connection", b"close")])
    await _original_stream_send(self, event)


# --- 7, 8: WebSocket early data and protocol errors ------------------------------------------


def _early_data(stream: WSStream) -> bytearray:
    early: bytearray | None = getattr(stream, "_early_data", None)
    if early is None:
        early = bytearray()
        stream._early_data = early  # type: ignore[attr-defined]
    return early


def _events_lock(stream: WSStream) -> trio.Lock:
    lock: trio.Lock | None = getattr(stream, "_events_lock", None)
    if lock is None:
        lock = stream._events_lock = trio.Lock()  # type: ignore[attr-defined]
    return lock


async def _ws_handle(self: WSStream, event: StreamEvent) -> None:
    if self.closed or not isinstance(event, Body | Data) or self.handshake.accepted:
        await _original_ws_handle(self, event)
        if isinstance(event, StreamClosed):
            _stop_pinging(self)
        return
    if self.state is not ASGIWebsocketState.HANDSHAKE:
        return  # the app rejected the upgrade: its HTTP answer ends the connection
    early = _early_data(self)
    early.extend(event.data)
    if len(early) > EARLY_DATA_MAX_BYTES:
        early.clear()
        await _original_ws_handle(self, StreamClosed(stream_id=self.stream_id))
        await self.send(StreamClosed(stream_id=self.stream_id))


async def _ws_accept(self: WSStream, message: object) -> None:
    await _original_ws_accept(self, message)  # type: ignore[arg-type]
    early = _early_data(self)
    if early:
        self.connection.receive_data(bytes(early))
        early.clear()
        self.task_group.spawn(self._handle_events)


async def _ws_handle_events(self: WSStream) -> None:
    """Hypercorn's ``WSStream._handle_events``, locked, failing broken frames and messages over
    the limit (15) with a close."""
    async with _events_lock(self):
        for event in self.connection.events():
            if isinstance(event, Message):
                try:
                    self.buffer.extend(event)
                except FrameTooLargeError:
                    # 15: Hypercorn kept the buffer and went on reading into it.
                    self.buffer.clear()
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    await self.send(StreamClosed(stream_id=self.stream_id))
                    break
                if event.message_finished:
                    assert self.app_put is not None
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                elif self.connection.state is ConnectionState.OPEN:
                    # Not a close frame from the peer: a frame wsproto could not accept.
                    reason = (event.reason or "").encode()[:120].decode(errors="ignore")
                    await self._send_wsproto_event(CloseConnection(code=event.code, reason=reason))
                await self.send(StreamClosed(stream_id=self.stream_id))
                break


# --- 13: the app is cancelled when its client goes away ---------------------------------------

_DISCONNECTS = frozenset({"http.disconnect", "websocket.disconnect"})


class _CancellableApp:
    """An app wrapper running the app in a cancel scope that a disconnect cancels once armed.

    Until the app arms it (``scope["extensions"][CANCEL_ON_DISCONNECT]["arm"]()``, for a
    response that lasts: an event stream), a disconnect cancels nothing: a client that
    half-closes its socket after its request still gets its answer. A disconnect that comes
    while the app is sending (its last body message ends the stream, or the socket broke under
    it) cancels once that send has returned: Hypercorn may still be recycling the connection
    inside it.
    """

    __slots__ = ("app", "armed", "cancel_scope", "disconnected", "send", "sending")

    def __init__(self, app: AppWrapper) -> None:
        self.app = app
        self.armed = False
        self.cancel_scope = trio.CancelScope()
        self.disconnected = False
        self.send: Callable[[ASGISendEvent], Awaitable[None]] | None = None
        self.sending = 0

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[ASGIReceiveEvent]],
        send: Callable[[ASGISendEvent], Awaitable[None]],
        sync_spawn: Callable[..., object],
        call_soon: Callable[..., object],
    ) -> None:
        self.send = send
        with self.cancel_scope:
            await self.app(scope, receive, self._send, sync_spawn, call_soon)

    async def _send(self, message: ASGISendEvent) -> None:
        assert self.send is not None
        self.sending += 1
        try:
            await self.send(message)
        finally:
            self.sending -= 1
        self._maybe_cancel()

    def _maybe_cancel(self) -> None:
        if self.armed and self.disconnected and not self.sending:
            self.cancel_scope.cancel()

    def arm(self) -> None:
        """From now on the client's disconnect cancels the app (at once if it has gone)."""
        self.armed = True
        self._maybe_cancel()

    def disconnect(self) -> None:
        self.disconnected = True
        self._maybe_cancel()

    def __deepcopy__(self, memo: dict[int, object]) -> _CancellableApp:
        """Itself: a live handle on one request, not data. Hypercorn's ``ProxyFixMiddleware``
        (web/proxy.py, behind a trusted proxy) deep-copies the scope, and so the ``arm`` of
        :data:`CANCEL_ON_DISCONNECT`; copying the cancel scope failed on its lock (a 500)."""
        return self


_AppPut = Callable[[ASGIReceiveEvent], Awaitable[None]]


def _spawn_app_cancelled_on_disconnect(
    spawn_app: Callable[..., Awaitable[_AppPut]],
) -> Callable[..., Awaitable[_AppPut]]:
    async def spawn(
        self: task_group.TaskGroup, app: AppWrapper, *config_scope_send: Any
    ) -> _AppPut:
        """``spawn_app(app, config, scope, send)`` with ``app`` in a :class:`_CancellableApp`."""
        cancellable = _CancellableApp(app)
        scope = config_scope_send[1]
        scope.setdefault("extensions", {})[CANCEL_ON_DISCONNECT] = {"arm": cancellable.arm}
        put = await spawn_app(self, cancellable, *config_scope_send)

        async def put_or_cancel(message: ASGIReceiveEvent) -> None:
            if message["type"] in _DISCONNECTS:
                cancellable.disconnect()  # before a put that could wait on a full channel
            await put(message)

        return put_or_cancel

    spawn.cancels_on_disconnect = True  # type: ignore[attr-defined]
    return spawn


# --- 14: no timer per read ------------------------------------------------------------------


async def _read_data_untimed(self: tcp_server.TCPServer) -> None:
    """Hypercorn's ``TCPServer._read_data`` without its never-firing timer (its own with a
    ``read_timeout``)."""
    if self.config.read_timeout:
        await _original_read_data(self)
        return
    while True:
        try:
            data = await self.stream.receive_some(tcp_server.MAX_RECV)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            break
        await self.protocol.handle(RawData(bytes(data)))
        if data == b"":
            break
    await self.protocol.handle(Closed())


def install() -> None:
    """Apply every fix (idempotent)."""
    worker_context.TrioSingleTask.restart = _restart_shielded  # type: ignore[method-assign]
    WSStream._send_pings = _send_pings_until_stopped  # type: ignore[method-assign]
    tcp_server.TCPServer.run = _run_contained  # type: ignore[method-assign]
    tcp_server.TCPServer.protocol_send = _protocol_send  # type: ignore[method-assign]
    tcp_server.TCPServer._close = _close_serialized  # type: ignore[method-assign]
    tcp_server.TCPServer._read_data = _read_data_then_release  # type: ignore[method-assign]
    hypercorn_h11.H11Protocol.__init__ = _h11_init  # type: ignore[method-assign]
    hypercorn_h11.H11Protocol._check_protocol = _check_protocol  # type: ignore[method-assign]
    hypercorn_h11.H11Protocol._create_stream = _create_stream  # type: ignore[method-assign]
    hypercorn_h11.H11Protocol.stream_send = _stream_send  # type: ignore[method-assign]
    WSStream.handle = _ws_handle  # type: ignore[method-assign]
    WSStream._accept = _ws_accept  # type: ignore[method-assign]
    WSStream._handle_events = _ws_handle_events  # type: ignore[method-assign]
    task_group.TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
    _install_cancel_on_disconnect()


def _install_cancel_on_disconnect() -> None:
    """Fix 13, around whatever ``spawn_app`` the fixes above installed (once)."""
    current = task_group.TaskGroup.spawn_app
    if not getattr(current, "cancels_on_disconnect", False):
        fixed = _spawn_app_cancelled_on_disconnect(current)
        task_group.TaskGroup.spawn_app = fixed  # type: ignore[method-assign,assignment]
