"""The yardstick: the same job API on the raw layers under our stack (Trio + h11 + wsproto).

No framework, and only what the benchmarks touch: a fixed token (``POST /api/auth/login``
hands it out), ``POST /api/generate`` (jobs in memory, their images made by the same
:class:`bench.provider.BenchProvider` under one FIFO ``trio.CapacityLimiter``, one attempt
each), ``GET /api/generate/{id}`` (poll JSON), ``GET /api/generate/{id}/stream`` (SSE with our
framing: ``retry:`` line, ``id``/``event``/``data``, ``done``, end of response),
``GET /api/generate/{id}?token=`` upgraded to a WebSocket (the same frames; close 1000 after
``done``) and ``GET /health``. Each event is encoded once, when it happens, and every
subscriber sends those bytes; a subscriber is one task waiting on a ``trio.Event``.

Every figure of the other benchmarks is compared to this server measured in the same run.
``python -m bench.yardstick`` itself checks that the yardstick and our service speak the same
protocol on one job (status codes, SSE framing, event ids and payload members, WebSocket
frames and close code, poll members) and times a few plain requests on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import attrs
import h11
import trio
import wsproto
import wsproto.connection
import wsproto.events
import wsproto.utilities

from actors.errors import ProviderError
from actors.providers.base import ImageProvider, ImageRequest
from bench import common
from bench.provider import prompt

TOKEN = "yardstick-token"  # noqa: S105 (a fixed token is the whole point)
SSE_RETRY_MS = 3000
MAX_BODY = 65536
_JSON = [("Content-Type", "application/json")]


def _stamp() -> str:
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


@attrs.define(eq=False)
class _Image:
    index: int
    status: str = "running"
    url: str | None = None
    error: str | None = None
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None


@attrs.frozen
class _Event:
    id: int
    sse: bytes
    ws: str


class Job:
    """One job: its images, and its events encoded once for every subscriber."""

    def __init__(self, job_id: str, prompt: str, num_images: int) -> None:
        self.job_id = job_id
        self.prompt = prompt
        self.num_images = num_images
        self.accepted = trio.current_time()
        self.created_at = _stamp()
        self.status = "pending"
        self.images = [_Image(index) for index in range(num_images)]
        self.events: list[_Event] = []
        self.done = False
        self.changed = trio.Event()
        self.ttfi_ms: int | None = None
        self.total_ms: int | None = None

    def _append(self, kind: str, payload: dict[str, Any]) -> None:
        event_id = len(self.events) + 1
        data = json.dumps(payload)
        sse = f"id: {event_id}\nevent: {kind}\ndata: {data}\n\n".encode()
        ws = json.dumps({"type": kind, "id": event_id, "payload": payload})
        self.events.append(_Event(event_id, sse, ws))
        self.changed.set()
        self.changed = trio.Event()

    def finish_image(self, index: int, url: str | None, error: str | None) -> None:
        image = self.images[index]
        image.status = "completed" if url else "failed"
        image.url, image.error, image.finished_at = url, error, _stamp()
        if url and self.ttfi_ms is None:
            self.ttfi_ms = round((trio.current_time() - self.accepted) * 1000)
        self._append(
            "progress",
            {
                "index": index,
                "status": image.status,
                "url": url,
                "error": error,
                "attempts": image.attempts,
                "started_at": image.started_at,
                "finished_at": image.finished_at,
            },
        )

    def finish(self) -> None:
        completed = sum(1 for image in self.images if image.status == "completed")
        self.status = "completed" if completed else "failed"
        self.total_ms = round((trio.current_time() - self.accepted) * 1000)
        self.done = True
        self._append(
            "done",
            {
                "status": self.status,
                "total_ms": self.total_ms,
                "ttfi_ms": self.ttfi_ms,
                "completed_count": completed,
                "failed_count": self.num_images - completed,
            },
        )

    def view(self) -> dict[str, Any]:
        counts = {"completed": 0, "failed": 0, "running": 0, "canceled": 0}
        results = []
        for image in self.images:
            counts[image.status] += 1
            results.append(
                {
                    "id": f"{self.job_id}-{image.index}",
                    "index": image.index,
                    "status": image.status,
                    "url": image.url,
                    "error": image.error,
                    "attempts": image.attempts,
                }
            )
        return {
            "job_id": self.job_id,
            "id": self.job_id,
            "prompt": self.prompt,
            "num_images": self.num_images,
            "status": self.status,
            "created_at": self.created_at,
            "ttfi_ms": self.ttfi_ms,
            "total_ms": self.total_ms,
            "results": results,
            "progress": counts | {"total": self.num_images},
        }


class Yardstick:
    """The server: jobs in memory and one connection task per client."""

    def __init__(self, provider: ImageProvider, *, capacity: int, base_url: str) -> None:
        self.provider = provider
        self.limiter = trio.CapacityLimiter(capacity)
        self.base_url = base_url
        self.jobs: dict[str, Job] = {}
        self._ids = 0
        self._nursery: trio.Nursery | None = None

    # --- jobs -------------------------------------------------------------------------------

    def create(self, prompt: str, num_images: int) -> Job:
        assert self._nursery is not None
        self._ids += 1
        job = Job(f"y{self._ids:08d}-{time.monotonic_ns()}", prompt, num_images)
        self.jobs[job.job_id] = job
        self._nursery.start_soon(self._run_job, job)
        return job

    async def _run_job(self, job: Job) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(job.num_images):
                nursery.start_soon(self._run_image, job, index)
        job.finish()

    async def _run_image(self, job: Job, index: int) -> None:
        image = job.images[index]
        async with self.limiter:
            image.attempts = 1
            image.started_at = _stamp()
            job.status = "running"
            request = ImageRequest(job_id=job.job_id, index=index, prompt=job.prompt, attempt=1)
            try:
                url = await self.provider.generate(request)
            except ProviderError as exc:
                job.finish_image(index, None, str(exc))
                return
        job.finish_image(index, self.base_url + url if url.startswith("/") else url, None)

    # --- HTTP -------------------------------------------------------------------------------

    async def serve(
        self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(partial(trio.serve_tcp, self._connection, port, host="127.0.0.1"))
            task_status.started()

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
        try:
            async with stream:
                while True:
                    request = await _read_request(conn, stream)
                    if request is None:
                        return
                    upgraded = await self._route(conn, stream, *request)
                    if upgraded or conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return

    async def _route(  # noqa: PLR0911 (one return per route)
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> bool:
        method = request.method.decode()
        path, _, query = request.target.decode().partition("?")
        headers = {name.decode(): value.decode() for name, value in request.headers}
        if path == "/health":
            await _send_json(conn, stream, 200, {"status": "ok"})
            return False
        if path == "/api/auth/login" and method == "POST":
            answer = {"access_token": TOKEN, "token_type": "bearer", "expires_in": 3600}
            await _send_json(conn, stream, 200, answer)
            return False
        prefix = "/api/generate"
        if not path.startswith(prefix):
            await _send_json(conn, stream, 404, {"detail": "Not Found"})
            return False
        args = {key: values[-1] for key, values in parse_qs(query).items()}
        websocket = headers.get("upgrade", "").lower() == "websocket"
        token = args.get("token") if websocket else headers.get("authorization", "")[7:]
        if token != TOKEN:
            await _send_json(conn, stream, 401, {"detail": "Not authenticated"})
            return False
        rest = path[len(prefix) :]
        if rest == "" and method == "POST":
            payload = json.loads(body)
            job = self.create(str(payload["prompt"]).strip(), int(payload["num_images"]))
            await _send_json(conn, stream, 200, {"job_id": job.job_id, "status": job.status})
            return False
        job_id, _, tail = rest.removeprefix("/").partition("/")
        found = self.jobs.get(job_id)
        if found is None or method != "GET" or tail not in ("", "stream"):
            await _send_json(conn, stream, 404, {"detail": "Job not found"})
            return False
        if tail == "stream":
            await _stream_sse(conn, stream, found, int(headers.get("last-event-id", "0") or 0))
            return False
        if websocket:
            await _stream_ws(conn, stream, found, headers["sec-websocket-key"])
            return True
        await _send_json(conn, stream, 200, found.view())
        return False


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request, bytes] | None:
    request: h11.Request | None = None
    body: list[bytes] = []
    for _ in range(10_000):  # a request is at most MAX_BODY bytes: far fewer events than this
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_BODY))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(body)
        else:  # ConnectionClosed, or PAUSED at a protocol switch we did not ask for
            return None
    return None


async def _send_json(
    conn: h11.Connection, stream: trio.SocketStream, status: int, payload: object
) -> None:
    body = json.dumps(payload).encode()
    headers = [*_JSON, ("Content-Length", str(len(body)))]
    data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    data += conn.send(h11.Data(data=body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def _stream_sse(
    conn: h11.Connection, stream: trio.SocketStream, job: Job, cursor: int
) -> None:
    headers = [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("X-Accel-Buffering", "no"),
    ]
    data = conn.send(h11.Response(status_code=200, headers=headers)) or b""
    data += conn.send(h11.Data(data=f"retry: {SSE_RETRY_MS}\n\n".encode())) or b""
    await stream.send_all(data)
    for _ in range(job.num_images + 2):  # every pass sends at least one event
        while len(job.events) <= cursor and not job.done:
            await job.changed.wait()
        batch = job.events[cursor:]
        if not batch:
            break
        cursor = batch[-1].id
        await stream.send_all(conn.send(h11.Data(data=b"".join(e.sse for e in batch))) or b"")
    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")


async def _stream_ws(conn: h11.Connection, stream: trio.SocketStream, job: Job, key: str) -> None:
    accept = wsproto.utilities.generate_accept_token(key.encode()).decode()
    switch = h11.InformationalResponse(
        status_code=101,
        headers=[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Accept", accept),
        ],
    )
    await stream.send_all(conn.send(switch) or b"")
    ws = wsproto.connection.Connection(wsproto.ConnectionType.SERVER)
    trailing, _ = conn.trailing_data
    if trailing:
        ws.receive_data(bytes(trailing))
    cursor = 0
    for _ in range(job.num_images + 2):
        while len(job.events) <= cursor and not job.done:
            await job.changed.wait()
        batch = job.events[cursor:]
        if not batch:
            break
        cursor = batch[-1].id
        frames = b"".join(ws.send(wsproto.events.Message(data=e.ws)) for e in batch)
        await stream.send_all(frames)
    closing = wsproto.events.CloseConnection(code=1000, reason="Job finished")
    await stream.send_all(ws.send(closing))
    with trio.move_on_after(5):  # the client answers our close; then the socket closes
        for _ in range(100):
            data = await stream.receive_some(MAX_BODY)
            if not data:
                return
            ws.receive_data(data)
            if any(isinstance(e, wsproto.events.CloseConnection) for e in ws.events()):
                return


# --- python -m bench.yardstick: same protocol as ours? -------------------------------------


def _shape(value: object) -> object:
    """The members of a JSON answer (recursively), not their values."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__ if value is not None else "null"


async def _protocol_of(kind: str, work_dir: Path, requests: int) -> dict[str, Any]:
    async with common.spawn_server(kind, work_dir, capacity=10) as server:
        token = await common.login(server.port)
        run = await common.run_gated_job(server, token, sse=1, ws=1, num_images=5, gap_ms=10)
        sse, ws = run.sse[0], run.ws[0]
        async with await common.HttpClient.connect(server.port) as client:
            client.token = token
            job_id = await client.create(prompt(), 5)
            status, view = await client.json("GET", f"/api/generate/{job_id}")
            create_ms, poll_ms = [], []
            for _ in range(requests):
                t0 = time.perf_counter()
                job_id = await client.create(prompt(), 5)
                t1 = time.perf_counter()
                await client.request("GET", f"/api/generate/{job_id}")
                create_ms.append((t1 - t0) * 1000)
                poll_ms.append((time.perf_counter() - t1) * 1000)
        lines = (await _first_lines(server.port, token, job_id))[:6]
    return {
        "sse_first_lines": lines,
        "sse_events": [(event.id, event.type) for event in sse],
        "sse_progress_members": sorted(sse[0].data),
        "sse_done_members": sorted(sse[-1].data),
        "ws_frames": [(event.id, event.type) for event in ws],
        "ws_progress_members": sorted(ws[0].data),
        "poll_status": status,
        "poll_shape": _shape(view),
        "delivery_ms": common.summarize(run.delivery_ms(run.sse + run.ws)),
        "create_ms": common.summarize(create_ms),
        "poll_ms": common.summarize(poll_ms),
    }


async def _first_lines(port: int, token: str, job_id: str) -> list[str]:
    """The first lines of a finished job's SSE body, ids and payloads elided."""

    def ready() -> None:
        pass

    target = f"/api/generate/{job_id}/stream"
    reads: list[tuple[int, bytes]] = []
    for _ in range(100):  # the job has no latency: it is done within a few polls
        reads = await common.record_sse(port, target, token, on_ready=ready)
        events = common.parse_sse(reads)
        if events and events[-1].type == "done":
            break
        await trio.sleep(0.05)
    raw = b"".join(chunk for _, chunk in reads)
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    lines = [line for line in body.split("\r\n") if not _is_hex(line)]
    text = "".join(lines).split("\n")
    return [line if not line.startswith("data: ") else "data: {...}" for line in text]


def _is_hex(line: str) -> bool:
    return bool(line) and all(c in "0123456789abcdefABCDEF" for c in line)


async def _compare(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    ours = await _protocol_of("ours", work_dir, args.requests)
    yardstick = await _protocol_of("yardstick", work_dir, args.requests)
    return {"ours": ours, "yardstick": yardstick}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="create+poll pairs timed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-yardstick-") as work:
        result = trio.run(_compare, args, Path(work))
    ours, yard = result["ours"], result["yardstick"]
    checks: list[tuple[str, Callable[[dict[str, Any]], object]]] = [
        ("SSE body starts", lambda r: r["sse_first_lines"][0]),
        ("SSE event (id, type)s", lambda r: r["sse_events"]),
        ("SSE progress members", lambda r: r["sse_progress_members"]),
        ("SSE done members", lambda r: r["sse_done_members"]),
        ("WS frame (id, type)s", lambda r: r["ws_frames"]),
        ("WS progress members", lambda r: r["ws_progress_members"]),
        ("poll status", lambda r: r["poll_status"]),
        ("poll members", lambda r: sorted(r["poll_shape"])),
        ("poll result members", lambda r: sorted(r["poll_shape"]["results"][0])),
        ("poll progress members", lambda r: sorted(r["poll_shape"]["progress"])),
    ]
    rows: list[list[object]] = []
    same = True
    for name, get in checks:
        a, b = get(ours), get(yard)
        same &= a == b
        rows.append([name, "same" if a == b else "DIFFERENT", str(a)[:60]])
    common.print_table(["check", "ours vs yardstick", "value (ours)"], rows)
    sys.stdout.write("\n")
    figures = []
    for label, key in [
        ("create (POST) ms", "create_ms"),
        ("poll (GET) ms", "poll_ms"),
        ("delivery ms (1 SSE + 1 WS)", "delivery_ms"),
    ]:
        for stat in ("p50", "p99"):
            a, b = ours[key].get(stat), yard[key].get(stat)
            figures.append([f"{label} {stat}", a, b, common.ratio(a, b)])
    common.print_table(["figure", "ours", "yardstick", "ratio"], figures)
    result["same_protocol"] = same
    result["machine"] = common.machine()
    common.emit(result, args.json)


if __name__ == "__main__":
    main()
