"""The Quart-Trio app class: an event stream (and any request without a body, and a WebSocket)
is served in the app's own task.

quart-trio serves every HTTP request with a nursery of two tasks: one runs the handler and sends
the response, the other reads the ASGI channel (the body, then ``http.disconnect``, which cancels
the first). An open SSE stream kept both tasks, their nursery and their frames alive for as long
as it lasted. When the server can cancel the app on a disconnect by itself (Hypercorn with
web/hypercorn_fixes.py fix 13, which offers :data:`CANCEL_ON_DISCONNECT`), a request whose body
is complete in its first message (a GET, a DELETE, ...) needs neither: the handler runs and the
response is sent in the task Hypercorn started for the app, and a stream (a response without
Quart's timeout) arms the cancellation before it starts. Anything else (a body still arriving,
another server, Quart's test client) is served as quart-trio serves it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    WebsocketScope,
)
from quart.asgi import ASGIWebsocketConnection
from quart.signals import websocket_received
from quart.typing import ResponseTypes
from quart.utils import encode_headers
from quart.wrappers import Response
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection, TrioASGIWebsocketConnection

from web.hypercorn_fixes import CANCEL_ON_DISCONNECT


class InlineHTTPConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, without its two tasks where the server allows it."""

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if CANCEL_ON_DISCONNECT not in self.scope.get("extensions", {}):
            await super().__call__(receive, send)
            return
        request = self._create_request_from_scope(send)
        first = await receive()
        if first["type"] == "http.request" and not first.get("more_body", False):
            request.body.append(first.get("body", b""))
            request.body.set_complete()
            # A long response (an event stream) keeps neither the request nor (_respond) itself.
            handled = self.app.handle_request(request)
            del request
            await self._respond(await handled, send)
            return
        # A body follows (or the client left): quart-trio's way, the first message first.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.handle_messages, nursery, request, _replay(first, receive))
            nursery.start_soon(self.handle_request, nursery, request, send)

    async def _respond(self, response: ResponseTypes, send: ASGISendCallable) -> None:
        """The rest of quart-trio's ``handle_request``, in this task; a stream arms fix 13."""
        timeout = self.app.config["RESPONSE_TIMEOUT"]
        if isinstance(response, Response) and response.timeout is not Ellipsis:
            timeout = response.timeout
        if timeout is None and isinstance(response, Response):
            # A stream (Quart's RESPONSE_TIMEOUT would cut it): it ends when the client goes
            # away (at once if it has gone already), and keeps only its body while it lasts.
            self.scope["extensions"][CANCEL_ON_DISCONNECT]["arm"]()
            body = response.response
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": encode_headers(response.headers),
                }
            )
            del response
            async with body as chunks:
                async for data in chunks:
                    chunk = data.encode() if isinstance(data, str) else data
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        with trio.move_on_after(timeout):
            await self._send_response(send, response)


def _replay(
    first: ASGIReceiveEvent, receive: ASGIReceiveCallable
) -> Callable[[], Awaitable[ASGIReceiveEvent]]:
    pending = [first]

    async def replayed() -> ASGIReceiveEvent:
        if pending:
            await trio.lowlevel.checkpoint()
            return pending.pop()
        return await receive()

    return replayed


class _Messages:
    """A WebSocket's incoming messages read from the ASGI channel itself, no task in between."""

    __slots__ = ("asgi_receive",)

    def __init__(self, asgi_receive: ASGIReceiveCallable) -> None:
        self.asgi_receive = asgi_receive

    async def receive(self) -> bytes | str:
        while True:
            event = await self.asgi_receive()
            if event["type"] == "websocket.receive":
                message = event.get("bytes") or event.get("text") or ""
                await websocket_received.send_async(message)
                return message
            if event["type"] == "websocket.disconnect":
                await trio.sleep_forever()  # armed: the disconnect cancels this handler


class InlineWebsocketConnection(TrioASGIWebsocketConnection):
    """quart-trio's WebSocket connection, without its two tasks where the server allows it: the
    handler runs in the app's task, reads messages from the ASGI channel when it asks for one,
    and is cancelled by the client's disconnect (fix 13)."""

    def __init__(self, app: QuartTrio, scope: WebsocketScope) -> None:
        self.app = app
        self.scope = scope
        self._accepted = False
        self._closed = False

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        extension = self.scope.get("extensions", {}).get(CANCEL_ON_DISCONNECT)
        if extension is None:
            # quart-trio's own way, with the channel its reader task feeds
            super().__init__(self.app, self.scope)  # type: ignore[arg-type]
            await super().__call__(receive, send)
            return
        extension["arm"]()
        self.receive_channel = _Messages(receive)  # type: ignore[assignment]
        websocket = self._create_websocket_from_scope(send)
        await ASGIWebsocketConnection.handle_websocket(self, websocket, send)


class App(QuartTrio):
    """QuartTrio with :class:`InlineHTTPConnection` and :class:`InlineWebsocketConnection`."""

    asgi_http_class = InlineHTTPConnection
    asgi_websocket_class = InlineWebsocketConnection
