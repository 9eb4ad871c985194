"""Random bytes for the raw socket of ``python -m web``: hypothesis strategies and one example's
run, shared by the CI fuzz (tests/e2e/test_fuzz.py) and the long one (``bench/fuzz.py``).

Three shapes of input: bytes at random; valid HTTP/1.1 requests (and a WebSocket upgrade) with a
few random mutations; and a valid WebSocket session (a real upgrade, answered 101) followed by
random frames, valid frames, or valid frames mutated. Nothing about the answers is asserted here:
the callers check that the process lives and ``/health`` answers after every example.
"""

from __future__ import annotations

import attrs
import trio
from hypothesis import strategies as st

from tests.e2e.raw_socket import (
    Opcode,
    close_payload,
    connect,
    frame,
    login_body,
    receive_until_closed,
    request,
    send,
    shut_write,
    statuses,
    upgrade_request,
)

#: Bounds one example's read: most answers come at once; a peer left waiting costs this.
READ_S = 1.0
MAX_BYTES = 4096


@attrs.frozen
class Example:
    """What one connection sends: ``opening``; or, for ``websocket`` (a key of the target's
    paths), an upgrade then ``after_upgrade``: once answered 101, or with the request itself
    (``pipelined``: the frames arrive before the handshake completes)."""

    opening: bytes
    after_upgrade: bytes = b""
    websocket: str | None = None
    pipelined: bool = False


@attrs.frozen
class Target:
    """Where the examples go: the port, and the WebSocket paths worth upgrading to."""

    port: int
    ws_paths: dict[str, str]


def seed_requests(paths: dict[str, str]) -> list[bytes]:
    """Valid requests to mutate (every route family, and both body framings)."""
    body = login_body()
    return [
        request(),
        request("GET", "/metrics", headers=[("Accept", "*/*")]),
        request(
            "POST",
            "/api/auth/login",
            headers=[("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            body=body,
        ),
        request(
            "POST",
            "/api/auth/login",
            headers=[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
            body=f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        ),
        request("GET", "/files/x.png"),
        request("GET", "/api/generate?limit=2&cursor=abc"),
        *(upgrade_request(path) for path in paths.values()),
    ]


def _mutate(data: bytes, draw: st.DrawFn) -> bytes:
    """One random edit: flip, insert, append, delete, duplicate, truncate or poison a byte."""
    buffer = bytearray(data)
    kinds = ["flip", "insert", "append", "delete", "duplicate", "truncate", "poison"]
    kind = draw(st.sampled_from(kinds))
    at = draw(st.integers(0, max(0, len(buffer) - 1)))
    if kind == "flip" and buffer:
        buffer[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "append":  # bytes after a whole request: pipelining, or early WebSocket data
        buffer += draw(st.binary(min_size=1, max_size=64))
    elif kind == "insert":
        buffer[at:at] = draw(st.binary(min_size=1, max_size=64))
    elif kind == "delete":
        del buffer[at : at + draw(st.integers(1, 64))]
    elif kind == "duplicate":
        buffer[at:at] = buffer[at : at + draw(st.integers(1, 256))]
    elif kind == "truncate":
        del buffer[at:]
    elif buffer:
        buffer[at] = draw(st.sampled_from(b"\x00\r\n: \t\x7f\xff"))
    return bytes(buffer[:MAX_BYTES])


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = draw(st.sampled_from(seeds))
    for _ in range(draw(st.integers(1, 4))):
        data = _mutate(data, draw)
    return data


@st.composite
def any_frame(draw: st.DrawFn) -> bytes:
    """A frame with every header field at random (opcode, FIN, RSV, mask, length)."""
    payload = draw(st.binary(max_size=200))
    length = draw(st.one_of(st.none(), st.integers(0, (1 << 64) - 1)))
    return frame(
        draw(st.integers(0, 15)),
        payload,
        fin=draw(st.booleans()),
        rsv=draw(st.integers(0, 7)),
        mask=draw(st.one_of(st.none(), st.binary(min_size=4, max_size=4))),
        length=length,
    )


@st.composite
def valid_frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["text", "binary", "ping", "pong", "close"]))
    if kind == "text":
        return frame(Opcode.TEXT, draw(st.text(max_size=100)).encode())
    if kind == "binary":
        return frame(Opcode.BINARY, draw(st.binary(max_size=300)))
    if kind in ("ping", "pong"):
        opcode = Opcode.PING if kind == "ping" else Opcode.PONG
        return frame(opcode, draw(st.binary(max_size=125)))
    return frame(Opcode.CLOSE, close_payload(draw(st.sampled_from([1000, 1001, 3000, 4000]))))


@st.composite
def websocket_session(draw: st.DrawFn, paths: list[str]) -> Example:
    frames = draw(st.lists(st.one_of(any_frame(), valid_frame()), min_size=1, max_size=8))
    data = b"".join(frames)
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 3))):
            data = _mutate(data, draw)
    return Example(
        b"",
        data[:MAX_BYTES],
        websocket=draw(st.sampled_from(paths)),
        pipelined=draw(st.booleans()),
    )


def examples(target: Target) -> st.SearchStrategy[Example]:
    """Every shape of input, about a third each."""
    seeds = seed_requests(target.ws_paths)
    return st.one_of(
        st.binary(min_size=1, max_size=MAX_BYTES).map(Example),
        mutated(seeds).map(Example),
        websocket_session(sorted(target.ws_paths)),
    )


async def run_example(target: Target, example: Example) -> str:
    """Send ``example`` on a new connection, half-close, read (bounded), close. How it ended."""
    stream = await connect(target.port)
    async with stream:
        if example.websocket is not None and example.pipelined:
            upgrade = upgrade_request(target.ws_paths[example.websocket])
            await send(stream, upgrade + example.after_upgrade, wait_s=READ_S)
        elif example.websocket is not None:
            await send(stream, upgrade_request(target.ws_paths[example.websocket]))
            head = await receive_until_closed(stream, wait_s=READ_S, until=b"\r\n\r\n")
            if statuses(head.data) != [101]:
                return f"upgrade refused: {head.data[:40]!r}"
            await send(stream, example.after_upgrade, wait_s=READ_S)
        else:
            await send(stream, example.opening, wait_s=READ_S)
        shut_write(stream)
        received = await receive_until_closed(stream, wait_s=READ_S)
    return received.ending


def run_example_sync(target: Target, example: Example) -> str:
    return trio.run(run_example, target, example)
