"""A lean HTTP/2 client for the benchmarks: SSE streams multiplexed on one TLS connection.

The counterpart of :func:`bench.common.record_sse` (one HTTP/1.1 connection per stream): it opens
``count`` streams of the same ``target`` on one connection (ALPN ``h2``, parsed with the ``h2``
package, as lean as the h11 client) and keeps every DATA frame of each with its arrival time.
Flow-control credit is given back as data arrives, so no stream ever waits for a window.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

RECEIVE_BYTES = 65536
#: The window the client grants: far above what an SSE stream has in flight.
WINDOW = 2**24
#: What a recording starts with, so that ``parse_sse`` reads an HTTP/2 stream's body as it reads
#: an HTTP/1.1 response without chunking; stamped 0, it never completes an event.
SYNTHETIC_HEAD = (0, b"HTTP/1.1 200 OK\r\n\r\n")


class StreamError(RuntimeError):
    """A stream was refused or reset, or the connection ended early."""


async def record_sse_streams(
    port: int,
    target: str,
    token: str,
    count: int,
    *,
    ssl_context: ssl.SSLContext,
    on_ready: Callable[[], None],
    max_reads: int = 1_000_000,
) -> list[list[tuple[int, bytes]]]:
    """Open ``count`` SSE streams on one HTTP/2 connection; each one's reads until it ends.

    ``on_ready`` is called once per stream, when its ``retry:`` line is in. Each recording starts
    with :data:`SYNTHETIC_HEAD`.
    """
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context)
    async with stream:
        await stream.do_handshake()
        if stream.selected_alpn_protocol() != "h2":
            raise StreamError(f"the server chose {stream.selected_alpn_protocol()!r}, not h2")
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        conn.increment_flow_control_window(WINDOW)
        headers = [
            (b":method", b"GET"),
            (b":path", target.encode()),
            (b":scheme", b"https"),
            (b":authority", f"127.0.0.1:{port}".encode()),
            (b"authorization", f"Bearer {token}".encode()),
            (b"accept", b"text/event-stream"),
        ]
        recording = _Recording(conn, on_ready)
        for _ in range(count):
            stream_id = conn.get_next_available_stream_id()
            conn.send_headers(stream_id, headers, end_stream=True)
            recording.reads[stream_id] = [SYNTHETIC_HEAD]
        await stream.send_all(conn.data_to_send())
        for _ in range(max_reads):
            data = await stream.receive_some(RECEIVE_BYTES)
            now = time.monotonic_ns()
            if not data:
                raise StreamError(f"the connection ended with {len(recording.ended)} streams done")
            for event in conn.receive_data(bytes(data)):
                recording.handle(event, now)
            if outgoing := conn.data_to_send():
                await stream.send_all(outgoing)
            if len(recording.ended) == count:
                break
        return list(recording.reads.values())


class _Recording:
    """The streams of one connection: each one's reads, and which are ready and ended."""

    def __init__(self, conn: h2.connection.H2Connection, on_ready: Callable[[], None]) -> None:
        self.conn = conn
        self.on_ready = on_ready
        self.reads: dict[int, list[tuple[int, bytes]]] = {}
        self.ready: set[int] = set()
        self.ended: set[int] = set()

    def handle(self, event: h2.events.Event, now: int) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            status = dict(event.headers or []).get(b":status")
            if status != b"200":
                raise StreamError(f"stream {event.stream_id} answered {status!r}")
        elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
            data = bytes(event.data or b"")
            self.reads[event.stream_id].append((now, data))
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            if event.stream_id not in self.ready and b"retry:" in data:
                self.ready.add(event.stream_id)
                self.on_ready()
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
            raise StreamError(f"the server ended a stream or the connection: {event}")
