"""The Hypercorn fixes that keep one connection from ending the process (web/hypercorn_fixes.py,
4 to 9), each against the failure it fixes and the race it could cause.

Byte-level cases run a small ASGI app under the real ``hypercorn.trio.serve`` on 127.0.0.1 with
the fixes installed, on the real clock (every wait bounded by ``trio.fail_after``); the send and
close fixes are driven directly on a ``TCPServer`` with a scripted stream on virtual time. The
whole service under abuse is tests/e2e/test_abuse.py.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.protocol import h11 as hypercorn_h11
from hypercorn.protocol.events import Data
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from web import hypercorn_fixes

WAIT_S = 10
UPGRADE = (
    b"GET /early HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: bKdPyn3u98cTfZJSh4TNeQ==\r\n\r\n"
)


@attrs.define
class Early:
    """Holds the app's WebSocket accept until the test has seen its early bytes arrive."""

    data_seen: trio.Event = attrs.Factory(trio.Event)
    accept: trio.Event = attrs.Factory(trio.Event)


async def echo_app(early: Early, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts every WebSocket (``/early`` once ``early.accept`` is set) and echoes text;
    answers HTTP with ``ok``."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": message["type"] + ".complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    message = await receive()
    assert message["type"] == "websocket.connect"
    if scope["path"] == "/closes":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1008})
        return
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


@pytest.fixture
async def port(nursery: trio.Nursery, early: Early) -> AsyncIterator[int]:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.websocket_ping_interval = None
    shutdown = trio.Event()
    with trio.fail_after(WAIT_S):
        binds = await nursery.start(
            partial(serve, partial(echo_app, early), config, shutdown_trigger=shutdown.wait)
        )
    yield int(binds[0].rsplit(":", 1)[1])
    early.accept.set()
    shutdown.set()


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
