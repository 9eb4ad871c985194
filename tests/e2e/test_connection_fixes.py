"""The Hypercorn fixes that keep one connection from ending the process or outliving its peer
(web/hypercorn_fixes.py, 4 to 12), each against the failure it fixes and the race it could cause.

Byte-level cases run a small ASGI app under the real ``hypercorn.trio.serve`` on 127.0.0.1 with
the fixes installed, on the real clock (every wait bounded by ``trio.fail_after``); the send and
close fixes are driven directly on a ``TCPServer`` with a scripted stream on virtual time. The
whole service under abuse is tests/e2e/test_abuse.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Data
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from web import hypercorn_fixes

WAIT_S = 10
#: How often ``/stream`` writes a heartbeat (the writes that find a vanished client).
HEARTBEAT_S = 0.05
UPGRADE = (
    b"GET /early HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: bKdPyn3u98cTfZJSh4TNeQ==\r\n\r\n"
)


@attrs.define
class Early:
    """Holds the app's WebSocket accept until the test has seen its early bytes arrive, and
    ``/slow``'s answer until the test lets it go."""

    data_seen: trio.Event = attrs.Factory(trio.Event)
    accept: trio.Event = attrs.Factory(trio.Event)
    slow_started: trio.Event = attrs.Factory(trio.Event)
    answer: trio.Event = attrs.Factory(trio.Event)


async def echo_app(early: Early, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts every WebSocket (``/early`` once ``early.accept`` is set) and echoes text;
    answers HTTP with ``ok`` (``/slow`` once ``early.answer`` is set; ``/stream``: a body that
    goes on until the client disconnects, like an event stream)."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        if scope["path"] == "/slow":
            early.slow_started.set()
            await early.answer.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["path"] == "/stream":
            await send({"type": "http.response.body", "body": b": hello\n\n", "more_body": True})
            while True:
                with trio.move_on_after(HEARTBEAT_S):
                    if (await receive())["type"] == "http.disconnect":
                        return
                    continue
                await send({"type": "http.response.body", "body": b": ping\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    message = await receive()
    assert message["type"] == "websocket.connect"
    if scope["path"] == "/closes":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1008})
        return
    if scope["path"] == "/deaf":
        # Like the stream route: cancelled by the disconnect, writes, never reads.
        scope["extensions"][hypercorn_fixes.CANCEL_ON_DISCONNECT]["arm"]()
        await send({"type": "websocket.accept"})
        while True:
            await trio.sleep(HEARTBEAT_S)
            await send({"type": "websocket.send", "text": "beat"})
    if scope["path"] == "/early":
        await early.accept.wait()
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": message["text"]})


@pytest.fixture
def early(monkeypatch: pytest.MonkeyPatch) -> Early:
    """Sets ``data_seen`` once a WebSocket got bytes before its handshake completed."""
    hypercorn_fixes.install()
    early = Early()
    handle = WSStream.handle

    async def spy(self: WSStream, event: Any) -> None:
        await handle(self, event)
        if isinstance(event, Data) and not self.handshake.accepted:
            early.data_seen.set()

    monkeypatch.setattr(WSStream, "handle", spy)
    return early


async def serving(nursery: trio.Nursery, early: Early, config: Config) -> AsyncIterator[int]:
    config.bind = ["127.0.0.1:0"]
    shutdown = trio.Event()
    with trio.fail_after(WAIT_S):
        binds = await nursery.start(
            partial(serve, partial(echo_app, early), config, shutdown_trigger=shutdown.wait)
        )
    yield int(binds[0].rsplit(":", 1)[1])
    early.accept.set()
    early.answer.set()
    shutdown.set()


@pytest.fixture
async def port(nursery: trio.Nursery, early: Early) -> AsyncIterator[int]:
    config = Config()
    config.websocket_ping_interval = None
    async for bound in serving(nursery, early, config):
        yield bound


#: Far longer than any wait of these tests: a connection held until one of them fires is seen.
LINGER_S = 600


@pytest.fixture
async def lingering_port(nursery: trio.Nursery, early: Early) -> AsyncIterator[int]:
    """A server whose WebSocket pings and keep-alive timeout would hold a connection for
    ``LINGER_S`` after its peer left (Hypercorn's defaults: 5 s, and the service's 15 s)."""
    config = Config()
    config.websocket_ping_interval = LINGER_S
    config.keep_alive_timeout = LINGER_S
    async for bound in serving(nursery, early, config):
        yield bound


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head += bytes([0x80 | length])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", length)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def read_until(stream: trio.SocketStream, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in ``data``."""
    frames = []
    while len(data) >= 2:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        offset = 2
        if length == 126:
            (length,) = struct.unpack("!H", data[2:4])
            offset = 4
        frames.append((opcode, data[offset : offset + length]))
        data = data[offset + length :]
    return frames


async def still_serving(port: int) -> None:
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_all(stream)).startswith(b"HTTP/1.1 200")


async def test_trailing_bytes_after_an_upgrade_fail_the_websocket_not_the_server(
    port: int, early: Early
) -> None:
    """Hypercorn issue #225: this request ended the process with h11's LocalProtocolError."""
    before = sum(hypercorn_fixes.connection_errors.values())
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(UPGRADE + b"x\r\n")
            await early.data_seen.wait()
            early.accept.set()
            data = await read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    # 'x' is a frame with reserved bits set: a close frame with 1002 (protocol error).
    (opcode, payload), *_ = server_frames(body)
    assert opcode == 0x8
    assert struct.unpack("!H", payload[:2])[0] == 1002
    assert sum(hypercorn_fixes.connection_errors.values()) == before
    await still_serving(port)


async def test_frames_sent_with_the_upgrade_reach_the_app(port: int, early: Early) -> None:
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(UPGRADE + frame(0x1, b"early") + frame(0x1, b"bird"))
            await early.data_seen.wait()
            early.accept.set()
            data = await read_until(stream, b"bird")
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101")
            assert server_frames(body)[:2] == [(0x1, b"early"), (0x1, b"bird")]
            await stream.send_all(frame(0x8, struct.pack("!H", 1000)))
            closing = server_frames(await read_all(stream))
    assert closing == [(0x8, struct.pack("!H", 1000))]


async def test_too_much_early_data_closes_the_connection(port: int) -> None:
    """The accept never comes: the bytes held for it are bounded."""
    junk = b"\x81" * (hypercorn_fixes.EARLY_DATA_MAX_BYTES + 1)
    before = sum(hypercorn_fixes.connection_errors.values())
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(UPGRADE + junk)
            data = await read_all(stream)
    assert b"\x81" * 2 not in data  # nothing echoed; the socket was closed
    assert sum(hypercorn_fixes.connection_errors.values()) == before
    await still_serving(port)


@pytest.mark.parametrize(
    ("client_frame", "code"),
    [
        (frame(0x1, b"\xff\xfe"), 1007),  # invalid UTF-8
        (frame(0x1, b"x", rsv=0b100), 1002),  # reserved bit, no extension
        (frame(0x3, b"x"), 1002),  # unknown opcode
        (frame(0x8, struct.pack("!H", 999)), 1002),  # invalid close code
        (frame(0x9, b"x", fin=False), 1002),  # fragmented control frame
    ],
    ids=["invalid-utf8", "reserved-bit", "unknown-opcode", "close-code-999", "fragmented-ping"],
)
async def test_a_broken_frame_gets_a_close_frame_with_its_code(
    port: int, client_frame: bytes, code: int
) -> None:
    before = sum(hypercorn_fixes.connection_errors.values())
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(UPGRADE.replace(b"/early", b"/ws"))
            await read_until(stream, b"\r\n\r\n")
            await stream.send_all(client_frame)
            frames = server_frames(await read_all(stream))
    assert frames[-1][0] == 0x8
    assert struct.unpack("!H", frames[-1][1][:2])[0] == code
    assert sum(hypercorn_fixes.connection_errors.values()) == before
    await still_serving(port)


async def test_an_exception_in_one_connection_ends_only_that_connection(
    port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever escapes a connection (here a planted bug) is logged, counted and contained."""
    original = hypercorn_h11.H11Protocol._create_stream

    async def buggy(self: hypercorn_h11.H11Protocol, request: Any) -> None:
        if request.target == b"/boom":
            raise RuntimeError("planted")
        await original(self, request)

    monkeypatch.setattr(hypercorn_h11.H11Protocol, "_create_stream", buggy)
    before = hypercorn_fixes.connection_errors["RuntimeError"]
    with trio.fail_after(WAIT_S):
        bystander = await trio.open_tcp_stream("127.0.0.1", port)
        async with bystander:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
                assert await read_all(stream) == b""  # closed, nothing answered
            # A connection opened before the failure is served after it.
            await bystander.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_all(bystander)).startswith(b"HTTP/1.1 200")
    assert hypercorn_fixes.connection_errors["RuntimeError"] == before + 1
    warnings = [r for r in caplog.records if r.name == "web.connections"]
    assert [r.levelno for r in warnings if r.levelno >= logging.WARNING] == [logging.WARNING]
    assert "127.0.0.1:" in warnings[0].getMessage()
    assert "RuntimeError" in warnings[0].getMessage()
    await still_serving(port)


async def wait_for_open_connections(count: int) -> None:
    """Polls the gauge (real clock, bounded): a leaked connection never gets back to ``count``."""
    with trio.fail_after(WAIT_S):
        while hypercorn_fixes.open_connections != count:  # noqa: ASYNC110 (a gauge, no event)
            await trio.sleep(0.01)


@pytest.mark.parametrize(
    "request_bytes",
    [
        UPGRADE.replace(b"/early", b"/closes") + frame(0x1, b"x") * 50,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 50,
    ],
    ids=["websocket-closed-by-the-app", "body-the-app-never-read"],
)
async def test_a_client_sending_to_a_finished_app_does_not_leak_its_connection(
    port: int, request_bytes: bytes
) -> None:
    """The reader blocked forever on the finished app's full channel (task and memory leak)."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes)
            await read_all(stream)
    await wait_for_open_connections(0)
    await still_serving(port)


async def test_a_client_that_left_an_app_that_never_reads_does_not_leak_its_connection(
    port: int,
) -> None:
    """15: with the app's channel full, the write that found the client gone put the disconnect
    on that channel from the app's own task, and waited for it forever."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(UPGRADE.replace(b"/early", b"/deaf"))
        data = await read_until(stream, b"\r\n\r\n")
        await stream.send_all(frame(0x1, b"x") * 50)  # far more than max_app_queue_size (10)
        data = data.partition(b"\r\n\r\n")[2]
        while data.count(b"beat") < 3:  # the server read the frames while it wrote these
            data += await stream.receive_some(65536)
        await reset(stream)
    await wait_for_open_connections(0)
    await still_serving(port)


# --- 10: a peer that is gone ----------------------------------------------------------------


async def open_connection(port: int, kind: str, seen: Seen) -> trio.SocketStream:
    """A connection the server holds for the client: idle after a response, in the middle of
    an endless body, or an accepted WebSocket."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    if kind == "keep-alive":
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_until(stream, b"0\r\n\r\n")
        await seen.idle.wait()  # the keep-alive timer runs (else the close could come first)
    elif kind == "event-stream":
        await stream.send_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_until(stream, b": hello")
    else:
        await stream.send_all(UPGRADE.replace(b"/early", b"/ws"))
        await read_until(stream, b"\r\n\r\n")
    return stream


async def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@attrs.define
class Seen:
    """What the server did, as a connection's tasks saw it."""

    idle: trio.Event = attrs.Factory(trio.Event)
    reader_ended: trio.Event = attrs.Factory(trio.Event)


@pytest.fixture
def seen(early: Early, monkeypatch: pytest.MonkeyPatch) -> Seen:
    """``idle``: a connection went idle after a response (its keep-alive timer was started);
    ``reader_ended``: a connection's reader returned (its peer is gone)."""
    seen = Seen()
    read_data, protocol_send = TCPServer._read_data, TCPServer.protocol_send

    async def spy_read(self: TCPServer) -> None:
        await read_data(self)
        seen.reader_ended.set()

    async def spy_send(self: TCPServer, event: Event) -> None:
        await protocol_send(self, event)
        if isinstance(event, Updated) and event.idle:
            seen.idle.set()

    monkeypatch.setattr(TCPServer, "_read_data", spy_read)
    monkeypatch.setattr(TCPServer, "protocol_send", spy_send)
    return seen


@pytest.mark.parametrize("ending", ["close", "reset"])
@pytest.mark.parametrize("kind", ["keep-alive", "event-stream", "websocket"])
async def test_a_connection_whose_client_left_ends_at_once(
    lingering_port: int, seen: Seen, kind: str, ending: str
) -> None:
    """Hypercorn held it (and its socket, in CLOSE_WAIT) until the keep-alive timer fired or the
    WebSocket's next ping: here ``LINGER_S``, far past the wait below."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await open_connection(lingering_port, kind, seen)
    assert hypercorn_fixes.open_connections == 1
    if ending == "reset":
        await reset(stream)
    else:
        await stream.aclose()
    await wait_for_open_connections(0)
    await still_serving(lingering_port)


async def test_a_stream_whose_client_vanished_ends_with_its_reader_paused(
    lingering_port: int,
) -> None:
    """A request pipelined behind an endless body pauses the reader (h11 holds the next
    request until this answer ends), so the client's reset is not read: the next heartbeat's
    write fails and closes the socket. The paused reader then waited forever for an answer that
    would never end, and the connection's task with it."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", lingering_port)
        await stream.send_all(
            b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        await read_until(stream, b": hello")
        await reset(stream)
    await wait_for_open_connections(0)
    await still_serving(lingering_port)


async def test_a_request_pipelined_behind_a_slow_answer_is_answered_after_it(
    lingering_port: int, early: Early
) -> None:
    """The paused reader's ordinary way on: the answer ends, the next request is read."""
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", lingering_port)
        async with stream:
            await stream.send_all(
                b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n"
                b"Connection: close\r\n\r\n"
            )
            await early.slow_started.wait()
            early.answer.set()
            data = await read_all(stream)
    assert data.count(b"HTTP/1.1 200") == 2, data
    await wait_for_open_connections(0)


async def test_a_websocket_the_app_closed_ends_while_its_client_stays(lingering_port: int) -> None:
    """The ping task's wait outlived the stream: the server closed the socket, but the
    connection's task stayed until the next ping."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", lingering_port)
        async with stream:
            await stream.send_all(UPGRADE.replace(b"/early", b"/closes"))
            frames = server_frames((await read_all(stream)).partition(b"\r\n\r\n")[2])
            assert (0x8, struct.pack("!H", 1008)) in frames
            await wait_for_open_connections(0)  # the client has not closed its end


async def test_a_reset_during_a_request_does_not_restart_the_idle_timer(
    lingering_port: int, early: Early, seen: Seen
) -> None:
    """The race: the reader has seen the reset, then the app answers and h11 (which never saw
    an EOF) starts the next keep-alive cycle: the idle timer must not start again."""
    await wait_for_open_connections(0)
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", lingering_port)
        await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await early.slow_started.wait()
        await reset(stream)
        await seen.reader_ended.wait()
        early.answer.set()
    await wait_for_open_connections(0)
    await still_serving(lingering_port)


async def test_a_half_closed_client_still_gets_its_answer(
    lingering_port: int, early: Early, seen: Seen
) -> None:
    """A client may send its request and shut its side (RFC 9112 section 9.6): the reader's
    end must not cut the answer."""
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", lingering_port)
        async with stream:
            await stream.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await early.slow_started.wait()
            await stream.send_eof()
            await seen.reader_ended.wait()
            early.answer.set()
            data = await read_all(stream)
    assert data.startswith(b"HTTP/1.1 200"), data
    assert data.endswith(b"2\r\nok\r\n0\r\n\r\n"), data
    await wait_for_open_connections(0)


# --- 11: an h2c upgrade that cannot be taken -------------------------------------------------

#: A valid HTTP2-Settings: SETTINGS_MAX_CONCURRENT_STREAMS 100, INITIAL_WINDOW_SIZE 2^30,
#: ENABLE_PUSH 0 (base64url, no padding).
H2C_SETTINGS = "AAMAAABkAARAAAAAAAIAAAAA"


def h2c_request(
    *settings: str, version: bytes = b"HTTP/1.1", connection: str = "Upgrade, HTTP2-Settings"
) -> bytes:
    head = b"GET / " + version + b"\r\nHost: x\r\nConnection: " + connection.encode()
    head += b"\r\nUpgrade: h2c\r\n"
    head += b"".join(b"HTTP2-Settings: " + value.encode() + b"\r\n" for value in settings)
    return head + b"\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        h2c_request(),
        h2c_request("!!!not-base64"),
        h2c_request("AAMAAABkAA"),  # base64url that needs padding: not 6 bytes a setting
        h2c_request("AAMAAA"),  # 4 bytes: not a whole setting
        h2c_request("AAIAAAAC"),  # ENABLE_PUSH = 2 (only 0 or 1)
        h2c_request("AAQAAAAAAAA"),  # padding-free but not a multiple of 6 bytes
        h2c_request(H2C_SETTINGS, H2C_SETTINGS),
        h2c_request(H2C_SETTINGS.replace("A", "+")),  # base64, not base64url
        h2c_request(H2C_SETTINGS, version=b"HTTP/1.0"),
        h2c_request(H2C_SETTINGS, connection="HTTP2-Settings"),
    ],
    ids=[
        "no-settings",
        "not-base64",
        "needs-padding",
        "partial-setting",
        "invalid-value",
        "odd-length",
        "two-settings-headers",
        "plain-base64",
        "http-1.0",
        "no-upgrade-option",
    ],
)
async def test_an_h2c_upgrade_that_cannot_be_taken_is_served_in_http_1_1(
    port: int, request_bytes: bytes
) -> None:
    """Hypercorn answered 101 and spoke HTTP/2 whatever HTTP2-Settings held (or failed the
    connection after its 101 when h2 could not parse it)."""
    before = sum(hypercorn_fixes.connection_errors.values())
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes)
            if b"HTTP/1.0" in request_bytes:
                data = await read_all(stream)
                assert data.startswith(b"HTTP/1.1 200"), data
                assert data.endswith(b"\r\n\r\nok"), data
            else:  # the connection stays in HTTP/1.1, kept alive
                data = await read_until(stream, b"\r\n0\r\n\r\n")
                assert data.startswith(b"HTTP/1.1 200"), data
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                again = await read_until(stream, b"\r\n0\r\n\r\n")
                assert again.startswith(b"HTTP/1.1 200"), again
    assert sum(hypercorn_fixes.connection_errors.values()) == before
    await still_serving(port)


async def test_a_valid_h2c_upgrade_still_switches(port: int) -> None:
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(h2c_request(H2C_SETTINGS))
            data = await read_until(stream, b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 101"), data
    assert b"upgrade: h2c" in data.lower()


# --- 12: Transfer-Encoding and Content-Length --------------------------------------------------

#: What a proxy that frames by Content-Length takes for the body, h11 (by the chunked coding)
#: for an empty body and a second request.
SMUGGLED = b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


def with_body(method: bytes, headers: list[bytes], body: bytes) -> bytes:
    return (
        method
        + b" / HTTP/1.1\r\nHost: x\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
        + body
    )


CHUNKED = b"Transfer-Encoding: chunked"
LENGTH = b"Content-Length: %d" % len(SMUGGLED)


@pytest.mark.parametrize(
    "request_bytes",
    [
        with_body(b"POST", [CHUNKED, LENGTH], SMUGGLED),
        with_body(b"POST", [LENGTH, CHUNKED], SMUGGLED),
        with_body(b"GET", [CHUNKED, LENGTH], SMUGGLED),
        with_body(b"POST", [CHUNKED, b"Content-Length: 0"], SMUGGLED),
        with_body(b"POST", [b"Transfer-Encoding: Chunked", LENGTH, LENGTH], SMUGGLED),
        with_body(b"POST", [CHUNKED, LENGTH], b"3\r\nabc\r\n" + SMUGGLED),
    ],
    ids=["te-cl", "cl-te", "get", "cl-zero", "two-lengths", "body-then-smuggled"],
)
async def test_a_request_with_both_framings_is_answered_then_the_connection_ends(
    port: int, request_bytes: bytes
) -> None:
    """Hypercorn answered the request, then the bytes a proxy took for its body as a second
    request (RFC 9112 section 6.1: the server MUST close the connection after answering)."""
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request_bytes)
            data = await read_all(stream)
    assert data.count(b"HTTP/1.1 ") == 1, data
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200"), data
    assert b"connection: close" in head, data
    await still_serving(port)


async def test_a_websocket_upgrade_with_both_framings_is_refused(port: int) -> None:
    upgrade = UPGRADE.replace(b"/early", b"/ws").removesuffix(b"\r\n")
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(upgrade + CHUNKED + b"\r\n" + LENGTH + b"\r\n\r\n" + SMUGGLED)
            data = await read_all(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data
    assert b"connection: close" in head.lower()
    assert b"Transfer-Encoding" in json.loads(body)["detail"].encode()
    await still_serving(port)


async def test_an_answer_before_the_body_still_ends_the_connection(port: int) -> None:
    """The race: the app answers before the body came; the connection ends with the answer,
    so what the client sends after it is never read as a request."""
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(with_body(b"POST", [CHUNKED, LENGTH], b""))
            data = await read_all(stream)
            assert data.count(b"HTTP/1.1 ") == 1, data
            assert b"connection: close" in data.lower(), data
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(SMUGGLED)
            assert await read_all(stream) == b""
    await still_serving(port)


@pytest.mark.parametrize("framing", [CHUNKED, b"Content-Length: 5"])
async def test_a_request_with_one_framing_keeps_its_connection(port: int, framing: bytes) -> None:
    with trio.fail_after(WAIT_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            body = b"5\r\nhello\r\n0\r\n\r\n" if framing == CHUNKED else b"hello"
            await stream.send_all(with_body(b"POST", [framing], body))
            first = await read_until(stream, b"\r\n0\r\n\r\n")
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            second = await read_until(stream, b"\r\n0\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), first
    assert b"connection: close" not in first.lower()
    assert second.startswith(b"HTTP/1.1 200"), second


# --- sends and closes on a scripted stream (virtual time) ------------------------------------


class ScriptedStream:
    """A stream whose sends take ``send_s`` (forever if None) and that records what happened."""

    def __init__(self, send_s: float | None) -> None:
        self.send_s = send_s
        self.log: list[str] = []

    async def send_all(self, data: bytes) -> None:
        self.log.append("send")
        await trio.sleep(self.send_s if self.send_s is not None else float("inf"))
        self.log.append("sent")

    async def send_eof(self) -> None:
        self.log.append("eof")
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.log.append("close")
        await trio.lowlevel.checkpoint()


class RecordingProtocol:
    def __init__(self) -> None:
        self.events: list[object] = []

    async def handle(self, event: object) -> None:
        self.events.append(event)
        await trio.lowlevel.checkpoint()


def tcp_server(stream: ScriptedStream) -> TCPServer:
    hypercorn_fixes.install()
    server = TCPServer.__new__(TCPServer)
    server.stream = stream  # type: ignore[assignment]
    server.send_lock = trio.Lock()
    server.protocol = RecordingProtocol()  # type: ignore[assignment]
    return server


async def test_eof_waits_for_the_send_in_progress(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A close racing a send raised BusyResourceError on a real socket (EOF during a send)."""
    stream = ScriptedStream(send_s=hypercorn_fixes.CLOSE_TIMEOUT_S / 2)
    server = tcp_server(stream)
    nursery.start_soon(server.protocol_send, RawData(data=b"pong"))
    await trio.testing.wait_all_tasks_blocked()
    await server._close()
    assert stream.log == ["send", "sent", "eof", "close"]


async def test_a_send_stuck_past_the_close_timeout_is_cut_by_the_close(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    stream = ScriptedStream(send_s=None)
    server = tcp_server(stream)
    nursery.start_soon(server.protocol_send, RawData(data=b"data"))
    await trio.testing.wait_all_tasks_blocked()
    start = trio.current_time()
    await server._close()
    assert trio.current_time() - start == hypercorn_fixes.CLOSE_TIMEOUT_S
    assert stream.log == ["send", "close"]  # no EOF in the middle of a send


async def test_a_peer_that_never_reads_loses_its_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Hypercorn's shielded send waited forever (and so did every graceful stop)."""
    stream = ScriptedStream(send_s=None)
    server = tcp_server(stream)
    start = trio.current_time()
    with trio.fail_after(hypercorn_fixes.SEND_TIMEOUT_S * 2):
        await server.protocol_send(RawData(data=b"data"))
    assert trio.current_time() - start == hypercorn_fixes.SEND_TIMEOUT_S
    assert stream.log == ["send", "close"]
    assert isinstance(server.protocol.events[-1], Closed)  # type: ignore[attr-defined]
