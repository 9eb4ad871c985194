"""Bytes on a raw TCP socket: hand-built HTTP/1.1 requests and RFC 6455 frames, and what came back.

For the abuse suite and the fuzz, which must say things no well-behaved client library would
(bad framing, unmasked frames, a close and then more data). Every wait here is bounded: a peer
that hangs ends a read with ``ending == "timeout"``, never a hung test.
"""

from __future__ import annotations

import base64
import enum
import errno
import hashlib
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Literal

import attrs
import trio

HOST = "127.0.0.1"
RECEIVE_BYTES = 65536
#: A read stops at this many bytes (a flood of answers must not fill the test's memory).
RECEIVE_LIMIT = 4 << 20
#: RFC 6455 section 1.3's example key (any 16 bytes, base64, will do).
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
#: The masking key of the RFC's own examples (section 5.7).
MASK = b"\x37\xfa\x21\x3d"
WS_NORMAL = 1000

Ending = Literal["eof", "reset", "timeout", "limit"]


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


# --- RFC 6455 frames -----------------------------------------------------------------------------


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (one big-integer XOR: fast for megabytes)."""
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    xored = int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")
    return xored.to_bytes(len(payload), "big")


def frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length: int | None = None,
) -> bytes:
    """One frame as a client sends it (RFC 6455 section 5.2): masked unless ``mask`` is None.

    ``length`` overrides the length in the header (a frame that lies about its size); ``rsv``
    sets the three reserved bits (RSV1 = 4).
    """
    first = (0x80 if fin else 0) | (rsv & 0x7) << 4 | (opcode & 0xF)
    size = len(payload) if length is None else length
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        header = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if mask is None:
        return header + payload
    return header + mask + mask_payload(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@attrs.frozen
class Frame:
    """A frame the server sent."""

    opcode: int
    payload: bytes
    fin: bool = True

    @property
    def close_code(self) -> int | None:
        if self.opcode != Opcode.CLOSE or len(self.payload) < 2:
            return None
        code: int = struct.unpack("!H", self.payload[:2])[0]
        return code


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The whole frames at the start of ``data``, and the bytes after them."""
    frames = []
    offset = 0
    while len(data) - offset >= 2:
        first, second = data[offset], data[offset + 1]
        size, at = second & 0x7F, offset + 2
        if size == 126:
            if len(data) - at < 2:
                break
            size, at = struct.unpack("!H", data[at : at + 2])[0], at + 2
        elif size == 127:
            if len(data) - at < 8:
                break
            size, at = struct.unpack("!Q", data[at : at + 8])[0], at + 8
        key = b""
        if second & 0x80:
            key, at = data[at : at + 4], at + 4
        if len(data) - at < size:
            break
        payload = data[at : at + size]
        frames.append(
            Frame(first & 0xF, mask_payload(payload, key) if key else payload, bool(first & 0x80))
        )
        offset = at + size
    return frames, data[offset:]


# --- HTTP/1.1 requests ---------------------------------------------------------------------------


def request(
    method: str = "GET",
    target: str = "/health",
    *,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: bool = True,
) -> bytes:
    """A request as bytes (``Host: x`` first unless ``host`` is false; no header added for
    ``body``: say its framing in ``headers``)."""
    lines = [f"{method} {target} {version}".encode()]
    if host:
        lines.append(b"Host: x")
    lines.extend(f"{name}: {value}".encode() for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def upgrade_request(
    path: str, *, key: bytes = WS_KEY, extra: Sequence[tuple[str, str]] = ()
) -> bytes:
    """A WebSocket opening handshake (RFC 6455 section 4.1) for ``path`` (with its query)."""
    return request(
        "GET",
        path,
        headers=[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", key.decode()),
            *extra,
        ],
    )


_STATUS_LINE = re.compile(rb"(?:^|\n)HTTP/1\.[01] (\d{3})")


def statuses(data: bytes) -> list[int]:
    """The status code of every response in ``data`` (bodies here are JSON, never status lines)."""
    return [int(code) for code in _STATUS_LINE.findall(data)]


def login_body() -> bytes:
    return b'{"email": "test@example.com", "password": "password123"}'


def ws_accept_key(key: bytes = WS_KEY) -> bytes:
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()  # noqa: S324
    return base64.b64encode(digest)


# --- sockets -------------------------------------------------------------------------------------


@attrs.frozen
class Received:
    """What a peer read before the connection ended, and how it ended."""

    data: bytes
    ending: Ending

    @property
    def closed(self) -> bool:
        """The server ended the connection (rather than the read timing out)."""
        return self.ending in ("eof", "reset")


async def connect(port: int, *, wait_s: float = 5) -> trio.SocketStream:
    with trio.fail_after(wait_s):
        return await trio.open_tcp_stream(HOST, port)


async def send(stream: trio.SocketStream, data: bytes, *, wait_s: float = 5) -> bool:
    """Send ``data``; false if the server had already closed, or did not read it in time."""
    with trio.move_on_after(wait_s):
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        return True
    return False


async def _receive_some(stream: trio.SocketStream) -> bytes | Literal["eof", "reset"]:
    """One read: the bytes, or how the server ended the connection."""
    try:
        chunk = await stream.receive_some(RECEIVE_BYTES)
    except trio.BrokenResourceError:
        return "reset"
    return bytes(chunk) if chunk else "eof"


async def receive_until_closed(
    stream: trio.SocketStream,
    *,
    wait_s: float = 5,
    limit: int = RECEIVE_LIMIT,
    until: bytes | None = None,
) -> Received:
    """Read until the server closes, ``wait_s`` passes, ``limit`` bytes came, or ``until``
    appears in what was read."""
    chunks = bytearray()
    ending: Ending = "timeout"
    with trio.move_on_after(wait_s):
        while True:
            chunk = await _receive_some(stream)
            if isinstance(chunk, str):
                ending = chunk
                break
            chunks += chunk
            if len(chunks) >= limit:
                ending = "limit"
                break
            if until is not None and until in chunks:
                ending = "limit"
                break
    return Received(bytes(chunks), ending)


def shut_write(stream: trio.SocketStream) -> None:
    """Half-close: the server reads EOF, and may still answer."""
    try:
        stream.socket.shutdown(socket.SHUT_WR)
    except OSError as exc:  # the server already reset it
        if exc.errno not in (errno.ENOTCONN, errno.ECONNRESET, errno.EPIPE):
            raise


async def reset(stream: trio.SocketStream) -> None:
    """Close with an RST instead of a FIN (SO_LINGER on, timeout 0)."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def exchange(
    port: int,
    data: bytes,
    *,
    wait_s: float = 5,
    half_close: bool = False,
    limit: int = RECEIVE_LIMIT,
    until: bytes | None = None,
) -> Received:
    """Send ``data`` on a new connection (then half-close it if asked), read until the end
    (or until ``until`` came)."""
    stream = await connect(port)
    async with stream:
        await send(stream, data)
        if half_close:
            shut_write(stream)
        return await receive_until_closed(stream, wait_s=wait_s, limit=limit, until=until)


async def first_status(port: int, data: bytes, *, wait_s: float = 5) -> int | None:
    """The status of the first answer to ``data`` on a new connection (``None``: no answer)."""
    received = await exchange(port, data, wait_s=wait_s, until=b"\r\n\r\n")
    answers = statuses(received.data)
    return answers[0] if answers else None


# --- a WebSocket spoken by hand ------------------------------------------------------------------


@attrs.define
class RawWebSocket:
    """An upgraded connection: frames in, bytes out, nothing checked on our side."""

    stream: trio.SocketStream
    #: Bytes after the 101's headers not yet parsed into frames.
    pending: bytes = b""

    async def send(self, data: bytes, *, wait_s: float = 5) -> bool:
        return await send(self.stream, data, wait_s=wait_s)

    async def frames_until_closed(
        self, *, wait_s: float = 5, limit: int = RECEIVE_LIMIT
    ) -> tuple[list[Frame], Ending]:
        received = await receive_until_closed(self.stream, wait_s=wait_s, limit=limit)
        frames, self.pending = parse_frames(self.pending + received.data)
        return frames, received.ending

    async def frames_until(self, opcode: int, *, wait_s: float = 5) -> tuple[list[Frame], Ending]:
        """Frames until one with ``opcode`` came, or the connection ended, or ``wait_s``."""
        frames: list[Frame] = []
        ending: Ending = "timeout"
        with trio.move_on_after(wait_s):
            while True:
                parsed, self.pending = parse_frames(self.pending)
                frames += parsed
                if any(item.opcode == opcode for item in parsed):
                    return frames, "limit"
                chunk = await _receive_some(self.stream)
                if isinstance(chunk, str):
                    ending = chunk
                    break
                self.pending += chunk
        parsed, self.pending = parse_frames(self.pending)
        return frames + parsed, ending


async def open_websocket(
    port: int, path: str, *, wait_s: float = 5
) -> tuple[RawWebSocket | None, bytes]:
    """The opening handshake on a new connection: the socket once the server answered 101
    (``None`` if it answered anything else), and the answer's head."""
    stream = await connect(port)
    await send(stream, upgrade_request(path))
    received = await receive_until_closed(stream, wait_s=wait_s, until=b"\r\n\r\n")
    head, _, rest = received.data.partition(b"\r\n\r\n")
    if statuses(head) != [101]:
        await stream.aclose()
        return None, head
    assert ws_accept_key() in head, head
    return RawWebSocket(stream, rest), head
