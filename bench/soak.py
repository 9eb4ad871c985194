"""Soak: minutes of mixed, misbehaving clients against the service at its shipped defaults.

The service runs as ``python -m web`` (a subprocess, SQLite store, images stored, every setting
at its default but ``MAX_CONCURRENCY``), pointed at the fake Replicate from
``tests/fake_replicate.py`` served in this process with faults: creates answer 500 (half of
those after creating the prediction anyway) or 429, polls answer 429. For ``--minutes``:

- **creators** (``--creators``) create jobs one after another, each with a prompt of its own
  and an ``Idempotency-Key``; some first send the create and drop the connection before the
  answer, then send it again with the same key; a 429 or 503 is waited out and retried;
- for each job, **SSE followers** (``--sse``) and **WebSocket followers** (``--ws``, through
  ``httpx-ws`` with its keepalive pings every ``--ws-ping-s``: far more often than a real
  client's 20 s, so that pings meet closes often) follow it to ``done``; ``--drop`` of their
  connections are dropped at a random moment (the socket closed, or reset; on a WebSocket also
  a close frame first), and they resume after the last event they got (``Last-Event-ID``,
  ``?last_event_id=``); **flappers** (``--flappers`` WebSocket followers per job) drop nearly
  every connection within ``--flap-s`` of its handshake and come straight back, so that
  connections open and close all the time;
- a **poller** per job polls it to its end (some polls dropped before the answer), then reads
  its metrics.

Then the last jobs are followed to their end (creators stop at the deadline), the service is
left idle for ``--quiet-s``, and it is stopped with SIGTERM. ``VmRSS`` and open file
descriptors of the service are sampled every ``--sample-s``.

Pass criteria (a failed one makes the exit status 1): the service never exits during the soak;
every job ends (its followers saw ``done`` and its poller a final status); every follower's
stream is exact (across its reconnects, every event id of its job exactly once, in order); no
client saw a 5xx answer; no image is billed twice (per job, at most ``num_images`` predictions at
the fake ran to completion); RSS settles (in the last minute of load it grows by at most
``--rss-base-mib-per-min`` plus ``--rss-kib-per-job`` for each job created in that minute: finished
jobs are kept in memory for an hour) and open descriptors settle (after the quiet period no client
socket is open and, keep-alive sockets to the fake aside, at most ``--fd-slack`` more than at
the first sample). Each user (one per creator, in a ``USERS_FILE``) keeps the shipped caps on
active jobs and open streams.

    .venv/bin/python -m bench.soak --json bench/results/soak.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import h11
import httpcore
import httpx
import trio
import wsproto.utilities
from argon2 import PasswordHasher
from httpx_ws import (
    AsyncWebSocketSession,
    HTTPXWSException,
    WebSocketDisconnect,
    WebSocketNetworkError,
    WebSocketUpgradeError,
    aconnect_ws,
)

from bench import common
from tests.fake_replicate import TOKEN, FakeReplicate, run_fake_replicate

#: What a client task may meet when the service misbehaves or goes away; recorded, not raised.
CLIENT_ERRORS = (
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    h11.ProtocolError,
    httpx.HTTPError,
    httpcore.NetworkError,
    HTTPXWSException,
    # httpx-ws answers a server's ping after its own close frame (a bug of the client).
    wsproto.utilities.LocalProtocolError,
    common.BenchError,
    ValueError,
)
#: The shipped bounds of ``num_images`` (MIN_IMAGES, MAX_IMAGES).
MIN_IMAGES, MAX_IMAGES = 5, 20
TERMINAL = frozenset({"completed", "failed", "canceled"})
#: Bounds of every loop (the deadlines bound them in time as well).
MAX_CONNECTS = 5_000
MAX_READS = 100_000
MAX_POLLS = 10_000
MAX_CREATE_TRIES = 200
MAX_LIST_PAGES = 200
#: Answers of 5xx kept in full for the report (all are counted).
MAX_SAMPLES = 20
WS_NORMAL = 1000
#: A stream refused for the user's stream cap (MAX_STREAMS_PER_USER), and the shipped wait.
REFUSED = frozenset({"answered 429", "closed 1008"})
RETRY_AFTER_S = 5
#: Share of a flapper's connections that it drops.
FLAP_DROP = 0.95


# --- what the clients saw ---------------------------------------------------------------------


@attrs.define(eq=False)
class Follower:
    """One SSE or WebSocket follower of a job, across its connections."""

    transport: str
    flapper: bool = False  # drops nearly every connection within ``--flap-s``
    ids: list[int] = attrs.Factory(list)
    done: dict[str, Any] | None = None
    connects: int = 0
    dropping: bool = False  # this connection is being dropped on purpose

    @property
    def last_id(self) -> int:
        return self.ids[-1] if self.ids else 0

    def exact(self, num_images: int) -> bool:
        return self.ids == list(range(1, num_images + 2)) and self.done is not None


@attrs.define(eq=False)
class Job:
    job_id: str
    token: str  # its user's
    prompt: str
    num_images: int
    created_s: float  # since the load began
    followers: list[Follower] = attrs.Factory(list)
    polled: dict[str, Any] | None = None  # the last view the poller got

    listed: dict[str, Any] | None = None  # the service's summary once the load is over

    @property
    def ended(self) -> bool:
        """The service lists it as finished, and its poller and followers saw the end."""
        views = (self.polled or {}, self.listed or {})
        return all(view.get("status") in TERMINAL for view in views) and all(
            follower.done is not None for follower in self.followers
        )


@attrs.define(eq=False)
class Tally:
    """Counters shared by every client task (all on the Trio thread)."""

    answers: Counter[tuple[str, int]] = attrs.Factory(Counter)
    server_errors: list[str] = attrs.Factory(list)
    drops: Counter[tuple[str, str]] = attrs.Factory(Counter)
    ends: Counter[tuple[str, str]] = attrs.Factory(Counter)  # connections the server ended
    client_errors: Counter[tuple[str, str]] = attrs.Factory(Counter)
    events: int = 0
    jobs: list[Job] = attrs.Factory(list)

    def answer(self, kind: str, status: int, detail: object = "") -> None:
        self.answers[kind, status] += 1
        if status >= 500 and len(self.server_errors) < MAX_SAMPLES:
            self.server_errors.append(f"{kind} {status} {str(detail)[:300]}")

    def error(self, kind: str, group: BaseExceptionGroup[BaseException]) -> None:
        """Count every exception in ``group`` by its type."""

        def count(exc: BaseException) -> bool:
            if not isinstance(exc, BaseExceptionGroup):
                self.client_errors[kind, type(exc).__name__] += 1
            return False  # so that split() visits every nested group and leaf

        group.split(count)


@attrs.frozen
class Sample:
    at_s: float
    rss_kb: int
    fds: int
    cpu_s: float


@attrs.define(eq=False)
class Watch:
    """The service process: its samples, and whether (and when) it exited by itself."""

    samples: list[Sample] = attrs.Factory(list)
    first_fds: dict[str, int] = attrs.Factory(dict)  # by kind (fd_kinds)
    last_fds: dict[str, int] = attrs.Factory(dict)
    peak_fds: dict[str, int] = attrs.Factory(dict)  # by kind, the most at any sample
    died_at_s: float | None = None
    exit_code: int | None = None


# --- the soak ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Soak:
    args: argparse.Namespace
    server: common.Server
    tokens: list[str]  # one user per creator
    ws_client: httpx.AsyncClient
    t0: float
    load_end: float
    tally: Tally = attrs.Factory(Tally)
    job_numbers: Iterator[int] = attrs.Factory(lambda: itertools.count(1))
    client_numbers: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    @property
    def port(self) -> int:
        return self.server.port

    def rng(self) -> random.Random:
        """A random source of its own for one client task (repeatable with ``--seed``)."""
        return random.Random(self.args.seed * 1_000_003 + next(self.client_numbers))

    # --- creators ---------------------------------------------------------------------------

    async def creator(self, number: int) -> None:
        rng = random.Random(self.args.seed * 7919 + number)
        for _ in range(100_000):
            if trio.current_time() >= self.load_end:
                break
            job = await self.create(rng, self.tokens[number % len(self.tokens)])
            if job is None:
                await trio.sleep(1)
                continue
            self.tally.jobs.append(job)
            # The next job once this one is followed to its end; the last one outlives the
            # deadline (new jobs stop then, and the running ones are followed to their end).
            async with trio.open_nursery() as followers:
                kinds = [("sse", False)] * self.args.sse + [("ws", False)] * self.args.ws
                kinds += [("ws", True)] * self.args.flappers
                for transport, flapper in kinds:
                    follower = Follower(transport, flapper)
                    job.followers.append(follower)
                    followers.start_soon(self.follow, job, follower, self.rng())
                followers.start_soon(self.poll, job, self.rng())

    async def create(self, rng: random.Random, token: str) -> Job | None:
        num_images = rng.randint(MIN_IMAGES, MAX_IMAGES)
        prompt = f"soak {self.args.seed} job {next(self.job_numbers)}"
        body = {"prompt": prompt, "num_images": num_images}
        key = [("Idempotency-Key", uuid.UUID(int=rng.getrandbits(128)).hex)]
        try:
            if rng.random() < self.args.create_drop:
                mode = rng.choice(("close", "reset"))
                await self.abandoned_request(token, "POST", "/api/generate", body, key, mode, rng)
                self.tally.drops["create", mode] += 1
            async with await common.HttpClient.connect(self.port) as client:
                client.token = token
                for _ in range(MAX_CREATE_TRIES):
                    status, answer = await client.json("POST", "/api/generate", body, key)
                    self.tally.answer("create", status, answer)
                    if status == 200:
                        created_s = trio.current_time() - self.t0
                        job_id = str(answer["job_id"])
                        return Job(job_id, token, prompt, num_images, created_s)
                    if status not in {429, 503}:
                        return None
                    await trio.sleep(1)  # the active-jobs limit: wait for a job to end
        except* CLIENT_ERRORS as group:
            self.tally.error("create", group)
        return None

    async def abandoned_request(  # noqa: PLR0917 (one helper, positional reads well here)
        self,
        token: str,
        method: str,
        target: str,
        body: object,
        headers: list[tuple[str, str]],
        mode: str,
        rng: random.Random,
    ) -> None:
        """Send a request, then drop the connection before (or while) the answer comes."""
        payload = json.dumps(body).encode() if body is not None else b""
        fields = [("Host", f"127.0.0.1:{self.port}"), ("Authorization", f"Bearer {token}")]
        fields += headers
        if payload:
            fields += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        conn = h11.Connection(h11.CLIENT)
        data = conn.send(h11.Request(method=method, target=target, headers=fields)) or b""
        if payload:
            data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(data)
            with trio.move_on_after(rng.uniform(0, 0.02)):
                await stream.receive_some(common.RECEIVE_BYTES)
            drop(stream.socket, mode)

    # --- followers --------------------------------------------------------------------------

    async def follow(self, job: Job, follower: Follower, rng: random.Random) -> None:
        args = self.args
        await trio.sleep(rng.uniform(0, args.join_s))  # some join late: a replay first
        drop_share, drop_s, pause_s = args.drop, args.drop_s, args.reconnect_s
        if follower.flapper:
            drop_share, drop_s, pause_s = FLAP_DROP, args.flap_s, args.flap_s
        modes = ("close", "reset", "goodbye") if follower.transport == "ws" else ("close", "reset")
        for _ in range(MAX_CONNECTS):
            drop_after = math.inf
            mode = "none"
            if rng.random() < drop_share:
                drop_after = rng.uniform(0, drop_s)
                mode = rng.choice(modes)
            follower.connects += 1
            follower.dropping = False
            once = self.sse_once if follower.transport == "sse" else self.ws_once
            outcome = "error"
            try:
                outcome = await once(job, follower, drop_after, mode)
            except* CLIENT_ERRORS as group:
                if follower.dropping:
                    # The client library's own tasks meet the socket we just took away.
                    outcome = "dropped"
                else:
                    self.tally.error(follower.transport, group)
            if follower.done is not None:
                return
            if outcome == "dropped":
                self.tally.drops[follower.transport, mode] += 1
            elif outcome != "error":
                self.tally.ends[follower.transport, outcome] += 1
            if outcome in REFUSED:
                # The user's stream cap: wait as Retry-After (RETRY_AFTER_S) says.
                await trio.sleep(RETRY_AFTER_S)
            await trio.sleep(rng.uniform(0, pause_s))

    def received(self, follower: Follower, event_id: int, kind: str, data: Any) -> None:
        follower.ids.append(event_id)
        self.tally.events += 1
        if kind == "done":
            follower.done = data

    async def sse_once(self, job: Job, follower: Follower, drop_after: float, mode: str) -> str:
        """One SSE connection: ``dropped``, or how the server ended it."""
        headers = [
            ("Host", f"127.0.0.1:{self.port}"),
            ("Authorization", f"Bearer {job.token}"),
            ("Accept", "text/event-stream"),
        ]
        if follower.ids:
            headers.append(("Last-Event-ID", str(follower.last_id)))
        conn = h11.Connection(h11.CLIENT)
        target = f"/api/generate/{job.job_id}/stream"
        request = conn.send(h11.Request(method="GET", target=target, headers=headers)) or b""
        request += conn.send(h11.EndOfMessage()) or b""
        parser = SseParser()
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(request)
            with trio.move_on_after(drop_after):
                for _ in range(MAX_READS):
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(common.RECEIVE_BYTES))
                    elif isinstance(event, h11.Response):
                        self.tally.answer("sse", event.status_code)
                        if event.status_code != 200:
                            return f"answered {event.status_code}"
                    elif isinstance(event, h11.Data):
                        for event_id, kind, data in parser.feed(bytes(event.data)):
                            self.received(follower, event_id, kind, data)
                    elif isinstance(event, h11.EndOfMessage):
                        return "ended" if follower.done is not None else "ended before done"
                    else:
                        return "closed by the server"
                return "too many reads"
            follower.dropping = True
            drop(stream.socket, mode)
        return "dropped"

    async def ws_once(self, job: Job, follower: Follower, drop_after: float, mode: str) -> str:
        """One WebSocket connection: ``dropped``, or how the server ended it."""
        url = f"http://127.0.0.1:{self.port}/api/generate/{job.job_id}?token={job.token}"
        if follower.ids:
            url += f"&last_event_id={follower.last_id}"
        ping_s = self.args.ws_ping_s
        ws: AsyncWebSocketSession
        try:
            async with aconnect_ws(
                url,
                self.ws_client,
                keepalive_ping_interval_seconds=ping_s,
                keepalive_ping_timeout_seconds=max(10.0, 2 * ping_s),
            ) as ws:
                self.tally.answer("ws", 101)
                with trio.move_on_after(drop_after):
                    return await self.ws_read(ws, follower)
                follower.dropping = True
                if mode != "goodbye":  # else leaving the block sends a close frame (1000)
                    drop(ws.stream.get_extra_info("socket"), mode)
        except WebSocketUpgradeError as exc:
            self.tally.answer("ws", exc.response.status_code, exc.response.text)
            return f"answered {exc.response.status_code}"
        return "dropped"

    async def ws_read(self, ws: AsyncWebSocketSession, follower: Follower) -> str:
        """Read frames until the server ends the WebSocket; how it ended it."""
        for _ in range(MAX_READS):
            try:
                frame = json.loads(await ws.receive_text())
            except WebSocketDisconnect as exc:
                if exc.code == WS_NORMAL and follower.done is not None:
                    return "ended"
                return f"closed {exc.code}"
            except WebSocketNetworkError:
                return "network error"
            self.received(follower, frame["id"], frame["type"], frame["payload"])
        return "too many reads"

    # --- pollers ----------------------------------------------------------------------------

    async def poll(self, job: Job, rng: random.Random) -> None:
        target = f"/api/generate/{job.job_id}"
        try:
            async with await common.HttpClient.connect(self.port) as client:
                client.token = job.token
                for _ in range(MAX_POLLS):
                    if rng.random() < self.args.poll_drop:
                        mode = rng.choice(("close", "reset"))
                        await self.abandoned_request(job.token, "GET", target, None, [], mode, rng)
                        self.tally.drops["poll", mode] += 1
                    else:
                        status, view = await client.json("GET", target)
                        self.tally.answer("poll", status, view)
                        if status == 200:
                            job.polled = view
                            if view["status"] in TERMINAL:
                                break
                    await trio.sleep(rng.uniform(0.5, 1.5) * self.args.poll_s)
                status, metrics = await client.json("GET", f"{target}/metrics")
                self.tally.answer("job metrics", status, metrics)
        except* CLIENT_ERRORS as group:
            self.tally.error("poll", group)


class SseParser:
    """Complete SSE events out of a response body fed in pieces (comments and ``retry:`` out)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, str, Any]]:
        self._buffer += data
        *blocks, self._buffer = self._buffer.split(b"\n\n")
        events = []
        for block in blocks:
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
            if "data" in fields:
                kind = fields.get("event", "message")
                events.append((int(fields["id"]), kind, json.loads(fields["data"])))
        return events


def drop(sock: trio.socket.SocketType, mode: str) -> None:
    """End a connection abruptly: ``close`` (FIN, no goodbye) or ``reset`` (RST)."""
    if mode == "reset":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- the service ------------------------------------------------------------------------------


async def sample(server: common.Server, watch: Watch, t0: float, every_s: float) -> None:
    for _ in range(1_000_000):
        if server.process.returncode is not None:
            return
        try:
            watch.samples.append(
                Sample(
                    at_s=round(trio.current_time() - t0, 2),
                    rss_kb=server.rss_kb(),
                    fds=common.open_fds(server.pid),
                    cpu_s=server.cpu_s(),
                )
            )
            watch.last_fds = fd_kinds(server.pid, server.port)
            watch.first_fds = watch.first_fds or watch.last_fds
            for kind, count in watch.last_fds.items():
                watch.peak_fds[kind] = max(watch.peak_fds.get(kind, 0), count)
        except (OSError, common.BenchError):
            return  # the process is gone
        await trio.sleep(every_s)


def fd_kinds(pid: int, service_port: int) -> dict[str, int]:
    """Process ``pid``'s open descriptors by kind; its TCP sockets by whom they connect to
    (``clients``: accepted on ``service_port``; ``outbound``: to other servers, the fake)."""
    inodes: dict[str, str] = {}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            listening = fields[3] == "0A"
            kind = "listening" if listening else "outbound"
            if local_port == service_port and not listening:
                # CLOSE_WAIT: the client has closed its end; the service has not closed its own.
                kind = "clients (closed by the client)" if fields[3] == "08" else "clients"
            inodes[fields[9]] = kind
    kinds: Counter[str] = Counter()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inode = target.removeprefix("socket:[").removesuffix("]")
            # Not in the TCP tables: a socketpair, or a TCP socket reset by its peer.
            kinds[f"tcp {inodes[inode]}" if inode in inodes else "socket (other)"] += 1
        elif target.startswith(("pipe:", "anon_inode:")):
            kinds[target.split(":")[0].split("[")[0]] += 1
        else:
            kinds["file"] += 1
    return dict(sorted(kinds.items()))


async def watch_process(
    server: common.Server, watch: Watch, t0: float, load: trio.CancelScope
) -> None:
    """Note when the service exits by itself, and stop the load then."""
    await server.process.wait()
    watch.died_at_s = round(trio.current_time() - t0, 2)
    watch.exit_code = server.process.returncode
    load.cancel()


def last_traceback(log: Path, max_lines: int = 150) -> list[str]:
    """The service log's last outermost traceback, from the line that logged it; else its end."""
    lines = log.read_text(errors="replace").splitlines()
    starts = [
        i
        for i, line in enumerate(lines)
        if line.startswith(("Traceback", "  + Exception Group Traceback"))
    ]
    start = starts[-1] - 1 if starts else len(lines) - 20
    return lines[max(0, start) :][:max_lines]


async def final_checks(soak: Soak) -> dict[str, Any]:
    """What the service says once the load is over: status, metrics, every user's jobs."""
    result: dict[str, Any] = {}
    tally = soak.tally
    listed: list[dict[str, Any]] = []
    async with await common.HttpClient.connect(soak.port) as client:
        client.token = soak.tokens[0]
        status, view = await client.json("GET", "/api/status")
        tally.answer("status", status, view)
        result["status"] = view
        code, raw = await client.request("GET", "/metrics")
        tally.answer("metrics", code, raw[:300])
        result["metrics_text"] = raw.decode(errors="replace")
        for token in soak.tokens:
            client.token = token
            cursor: str | None = None
            for _ in range(MAX_LIST_PAGES):
                target = "/api/generate?limit=100" + (f"&cursor={cursor}" if cursor else "")
                code, page = await client.json("GET", target)
                tally.answer("list", code, page)
                if code != 200:
                    break
                listed += page["results"]
                cursor = page["next_cursor"]
                if cursor is None:
                    break
    result["listed"] = listed
    return result


def users_file(path: Path, count: int) -> list[dict[str, str]]:
    """Write a ``USERS_FILE`` of ``count`` users; their credentials."""
    hasher = PasswordHasher()
    users = [
        {"email": f"soak-{n}@example.com", "password": f"soak-password-{n}"} for n in range(count)
    ]
    lines = [f"{user['email']}:{hasher.hash(user['password'])}\n" for user in users]
    path.write_text("".join(lines))
    return users


_SAMPLE = re.compile(r"^(imagegen_[a-z_]+?)(\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


def connection_metrics(metrics_text: str | None) -> dict[str, Any]:
    """``imagegen_connection_errors_total`` by its labels (``None`` when the service does not
    export it; ``{}`` when it does, with no error yet) and ``imagegen_connections_open``."""
    text = metrics_text or ""
    errors: dict[str, float] | None = None
    if re.search(r"^# TYPE imagegen_connection_errors(_total)? counter", text, re.MULTILINE):
        errors = {}
    opened: float | None = None
    for name, labels, value in _SAMPLE.findall(text):
        if name == "imagegen_connection_errors_total":
            errors = (errors or {}) | {labels or "": float(value)}
        elif name == "imagegen_connections_open":
            opened = float(value)
    return {"connection_errors_total": errors, "connections_open": opened}


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(seconds, value)`` points, per minute."""
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60 * sum((t - mean_t) * (v - mean_v) for t, v in points) / var


def resource_figures(
    args: argparse.Namespace, watch: Watch, load_s: float, jobs: list[Job]
) -> dict[str, Any]:
    """RSS and open descriptors: first, peak, last, the last minute of load's slope, and
    whether they settle (see the module docstring)."""
    samples = watch.samples
    if not samples:
        return {}
    last_minute = [s for s in samples if load_s - 60 <= s.at_s <= load_s]
    rss_slope = slope_per_min([(s.at_s, s.rss_kb / 1024) for s in last_minute])
    fd_slope = slope_per_min([(s.at_s, s.fds) for s in last_minute])
    new_jobs = sum(load_s - 60 <= job.created_s <= load_s for job in jobs)
    rss_budget = args.rss_base_mib_per_min + new_jobs * args.rss_kib_per_job / 1024
    cpu = [s for s in samples if s.at_s <= load_s]
    cpu_share = None
    if len(cpu) >= 2 and cpu[-1].at_s > cpu[0].at_s:
        cpu_share = (cpu[-1].cpu_s - cpu[0].cpu_s) / (cpu[-1].at_s - cpu[0].at_s)
    first, last = samples[0].fds, samples[-1].fds
    # Keep-alive connections to the fake are the provider's pools (bounded), not a leak.
    outbound = watch.last_fds.get("tcp outbound", 0) - watch.first_fds.get("tcp outbound", 0)
    return {
        "samples": len(samples),
        "rss_mib": {
            "first": round(samples[0].rss_kb / 1024, 1),
            "peak": round(max(s.rss_kb for s in samples) / 1024, 1),
            "last": round(samples[-1].rss_kb / 1024, 1),
            "last_minute_slope_per_min": None if rss_slope is None else round(rss_slope, 2),
            "jobs_created_in_last_minute": new_jobs,
            "allowed_slope_per_min": round(rss_budget, 2),
            "settled": rss_slope is not None and rss_slope <= rss_budget,
        },
        "fds": {
            "first": first,
            "peak": max(s.fds for s in samples),
            "last": last,
            "last_minute_slope_per_min": None if fd_slope is None else round(fd_slope, 1),
            "first_by_kind": watch.first_fds,
            "last_by_kind": watch.last_fds,
            "peak_by_kind": dict(sorted(watch.peak_fds.items())),
            "settled": not any(kind.startswith("tcp clients") for kind in watch.last_fds)
            and last - max(0, outbound) <= first + args.fd_slack,
        },
        "cpu_share_under_load": None if cpu_share is None else round(cpu_share, 2),
        "series": [attrs.asdict(s) for s in samples],
    }


def billing(fake: FakeReplicate, jobs: dict[str, int]) -> dict[str, Any]:
    """Predictions at the fake per job (prompt): duplicates and predictions that ran to the end.

    A job's images share one input, so which image a prediction served cannot be told; a job
    is billed twice when more of its predictions ran to completion than it has images.
    """
    fake.statuses()  # brings every prediction's status up to date
    made: Counter[str] = Counter()
    ran: Counter[str] = Counter()
    for prediction in fake.predictions.values():
        prompt = str(prediction.input.get("prompt"))
        made[prompt] += 1
        if prediction.status in {"succeeded", "failed"}:
            ran[prompt] += 1
    foreign = sum(count for prompt, count in made.items() if prompt not in jobs)
    duplicates = {p: made[p] - n for p, n in jobs.items() if made[p] > n}
    twice = {p: ran[p] - n for p, n in jobs.items() if ran[p] > n}
    return {
        "predictions": len(fake.predictions),
        "ran_to_completion": sum(ran.values()),
        "canceled_or_running": len(fake.predictions) - sum(ran.values()),
        "create_requests": fake.create_requests,
        "predictions_of_unknown_prompts": foreign,
        "duplicate_predictions": sum(duplicates.values()),
        "jobs_with_duplicates": len(duplicates),
        "double_billed_images": sum(twice.values()),
        "double_billed_jobs": dict(itertools.islice(twice.items(), MAX_SAMPLES)),
    }


# --- the run ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    fake = FakeReplicate(latency_s=args.latency, seed=args.seed)
    fake.faults.create_500 = args.create_500
    fake.faults.create_429 = args.create_429
    fake.faults.get_429 = args.get_429
    fake.faults.retry_after_s = 1
    watch = Watch()
    final: dict[str, Any] = {}
    common.raise_nofile()
    async with run_fake_replicate(fake) as fake_url:
        users = users_file(work_dir / "users", args.creators)
        env = {
            "REPLICATE_API_TOKEN": TOKEN,
            "REPLICATE_BASE_URL": fake_url,
            "USERS_FILE": str(work_dir / "users"),
        }
        command = [sys.executable, "-m", "web"]
        async with (
            common.spawn_server(
                "service", work_dir, env=env, capacity=args.capacity, command=command
            ) as server,
            httpx.AsyncClient(
                timeout=httpx.Timeout(10), limits=httpx.Limits(max_connections=None)
            ) as ws_client,
        ):
            tokens = []
            async with await common.HttpClient.connect(server.port) as client:
                for user in users:
                    status, answer = await client.json("POST", "/api/auth/login", user)
                    if status != 200:
                        raise common.BenchError(f"login answered {status}: {answer}")
                    tokens.append(str(answer["access_token"]))
            t0 = trio.current_time()
            load_s = args.minutes * 60
            soak = Soak(args, server, tokens, ws_client, t0, t0 + load_s)
            soak.tally.answers["login", 200] += len(tokens)
            wall_start = time.time()
            async with trio.open_nursery() as outer:
                load = trio.CancelScope(deadline=t0 + load_s + args.drain_s)
                outer.start_soon(sample, server, watch, t0, args.sample_s)
                outer.start_soon(watch_process, server, watch, t0, load)
                with load:
                    async with trio.open_nursery() as creators:
                        for number in range(args.creators):
                            creators.start_soon(soak.creator, number)
                drained_s = trio.current_time() - t0 - load_s
                if watch.died_at_s is None:
                    try:
                        with trio.fail_after(30):
                            final = await final_checks(soak)
                    except* (*CLIENT_ERRORS, trio.TooSlowError) as group:
                        soak.tally.error("final checks", group)
                    with trio.move_on_after(args.quiet_s):
                        await server.process.wait()
                outer.cancel_scope.cancel()
            alive_at_end = server.process.returncode is None
        stop_code = server.process.returncode
        traceback = last_traceback(server.log_path) if not alive_at_end else []
    return summarize(
        args,
        soak,
        fake,
        watch,
        final,
        {
            "load_s": load_s,
            "drain_s": round(drained_s, 1) if watch.died_at_s is None else None,
            "wall_s": round(time.time() - wall_start, 1),
            "alive_at_end": alive_at_end,
            "exit_code_on_sigterm": stop_code if alive_at_end else None,
            "traceback": traceback,
            "log": str(server.log_path),
        },
    )


def summarize(  # noqa: PLR0917 (one call site)
    args: argparse.Namespace,
    soak: Soak,
    fake: FakeReplicate,
    watch: Watch,
    final: dict[str, Any],
    process: dict[str, Any],
) -> dict[str, Any]:
    tally = soak.tally
    jobs = tally.jobs
    followers = [(job, f) for job in jobs for f in job.followers]
    inexact = [
        {"job_id": job.job_id, "transport": f.transport, "ids": f.ids[:60], "done": f.done}
        for job, f in followers
        if not f.exact(job.num_images)
    ]
    listed = {view["job_id"]: view for view in final.get("listed", [])}
    for job in jobs:
        job.listed = listed.get(job.job_id)
    known = {job.job_id for job in jobs}
    unknown = [view for job_id, view in listed.items() if job_id not in known]
    unfinished_listed = [job_id for job_id, v in listed.items() if v["status"] not in TERMINAL]
    completed = failed = 0
    for job in jobs:
        progress = (job.listed or job.polled or {}).get("progress") or {}
        completed += progress.get("completed", 0)
        failed += progress.get("failed", 0)
    prompts = {job.prompt: job.num_images for job in jobs}
    prompts |= {j["prompt"]: j["num_images"] for j in unknown}
    bill = billing(fake, prompts)
    resources = resource_figures(args, watch, process["load_s"], jobs)
    server_errors = sum(n for (_, status), n in tally.answers.items() if status >= 500)
    checks = {
        "process never died": watch.died_at_s is None and process["alive_at_end"],
        "every job ended": bool(jobs)
        and all(job.ended for job in jobs)
        and not unfinished_listed
        and watch.died_at_s is None,
        "every stream exact": bool(followers) and not inexact,
        "no 5xx answer": server_errors == 0,
        "no double billing": bill["double_billed_images"] == 0,
        "RSS settles": resources.get("rss_mib", {}).get("settled", False),
        "open fds settle": resources.get("fds", {}).get("settled", False),
    }
    statuses: Counter[int] = Counter()
    for (_, status), count in tally.answers.items():
        statuses[status] += count
    status_view = final.get("status") or {}
    return {
        "passed": all(checks.values()),
        "checks": checks,
        "process": process | {"died_at_s": watch.died_at_s, "exit_code": watch.exit_code},
        "jobs": {
            "created": len(jobs),
            "ended": sum(job.ended for job in jobs),
            "unknown_to_clients": len(unknown),
            "unfinished_listed": unfinished_listed[:MAX_SAMPLES],
        },
        "images": {
            "requested": sum(job.num_images for job in jobs),
            "completed": completed,
            "failed": failed,
        },
        "streams": {
            "followers": len(followers),
            "sse": sum(f.transport == "sse" for _, f in followers),
            "ws": sum(f.transport == "ws" for _, f in followers),
            "exact": len(followers) - len(inexact),
            "inexact": inexact[:MAX_SAMPLES],
            "events_delivered": tally.events,
            "connections": sum(f.connects for _, f in followers),
            "reconnects": sum(max(0, f.connects - 1) for _, f in followers),
        },
        "drops": {f"{kind} {mode}": n for (kind, mode), n in sorted(tally.drops.items())},
        "server_ended": {f"{kind} {how}": n for (kind, how), n in sorted(tally.ends.items())},
        "client_errors": {
            f"{kind} {name}": n for (kind, name), n in sorted(tally.client_errors.items())
        },
        "requests_by_status": {str(status): n for status, n in sorted(statuses.items())},
        "requests_by_kind": {
            f"{kind} {status}": n for (kind, status), n in sorted(tally.answers.items())
        },
        "server_errors": server_errors,
        "server_error_samples": tally.server_errors,
        "billing": bill,
        "fake_faults": {
            "create_500": args.create_500,
            "create_500_creates": 0.5,
            "create_429": args.create_429,
            "get_429": args.get_429,
        },
        "provider": status_view.get("provider"),
        **connection_metrics(final.get("metrics_text")),
        "resources": resources,
        "settings": vars(args) | {"json": None},
        "machine": common.machine(),
    }


def report(result: dict[str, Any]) -> None:
    """The figures as a table on stdout (the JSON line follows)."""
    proc = result["process"]
    jobs, images, streams = result["jobs"], result["images"], result["streams"]
    bill, res = result["billing"], result["resources"]
    rss, fds = res.get("rss_mib", {}), res.get("fds", {})
    died = proc["died_at_s"]
    rows: list[list[object]] = [
        [
            "service process",
            "died" if died is not None else "alive",
            f"exited {proc['exit_code']} at {died} s"
            if died is not None
            else f"SIGTERM exit code {proc['exit_code_on_sigterm']}",
        ],
        ["load / drain / wall (s)", "", f"{proc['load_s']} / {proc['drain_s']} / {proc['wall_s']}"],
        ["jobs created / ended", "", f"{jobs['created']} / {jobs['ended']}"],
        ["jobs the clients never saw created", "", jobs["unknown_to_clients"]],
        [
            "images requested / completed / failed",
            "",
            f"{images['requested']} / {images['completed']} / {images['failed']}",
        ],
        [
            "followers exact / all (SSE, WS)",
            "",
            f"{streams['exact']} / {streams['followers']} ({streams['sse']}, {streams['ws']})",
        ],
        ["events delivered", "", streams["events_delivered"]],
        ["connections / reconnects", "", f"{streams['connections']} / {streams['reconnects']}"],
        ["drops", "", _pairs(result["drops"])],
        ["connections the server ended early", "", _pairs(result["server_ended"]) or "0"],
        ["client errors", "", _pairs(result["client_errors"]) or "0"],
        ["requests by status", "", _pairs(result["requests_by_status"])],
        ["5xx answers", "", result["server_errors"]],
        [
            "predictions / ran to completion / creates",
            "",
            f"{bill['predictions']} / {bill['ran_to_completion']} / {bill['create_requests']}",
        ],
        [
            "duplicate predictions (jobs) / double billed",
            "",
            f"{bill['duplicate_predictions']} ({bill['jobs_with_duplicates']}) / "
            f"{bill['double_billed_images']}",
        ],
        [
            "RSS MiB first / peak / last",
            "",
            f"{rss.get('first')} / {rss.get('peak')} / {rss.get('last')}",
        ],
        [
            "RSS last-minute slope (allowed: new jobs)",
            "",
            f"{rss.get('last_minute_slope_per_min')} MiB/min "
            f"({rss.get('allowed_slope_per_min')}: {rss.get('jobs_created_in_last_minute')})",
        ],
        [
            "open fds first / peak / last; last-minute slope",
            "",
            f"{fds.get('first')} / {fds.get('peak')} / {fds.get('last')}; "
            f"{fds.get('last_minute_slope_per_min')} /min",
        ],
        ["open fds at the end, by kind", "", _pairs(fds.get("last_by_kind", {}))],
        ["open fds at their peak, by kind", "", _pairs(fds.get("peak_by_kind", {}))],
        ["service CPU under load (cores)", "", res.get("cpu_share_under_load")],
        [
            "imagegen_connection_errors_total",
            "",
            "absent" if (errors := result["connection_errors_total"]) is None else errors or 0,
        ],
        ["imagegen_connections_open at the end", "", result["connections_open"]],
    ]
    common.print_table(["figure", "", "value"], rows)
    sys.stdout.write("\n")
    common.print_table(
        ["pass criterion", "met"],
        [[name, "yes" if ok else "NO"] for name, ok in result["checks"].items()],
    )
    if proc["traceback"]:
        sys.stdout.write("\nthe service's log ends with:\n" + "\n".join(proc["traceback"]) + "\n")
    for sample in result["server_error_samples"]:
        sys.stdout.write(f"5xx: {sample}\n")
    sys.stdout.write(f"\n{'PASS' if result['passed'] else 'FAIL'}\n")


def _pairs(mapping: dict[str, Any]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in mapping.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--minutes", type=float, default=3.0, help="how long new jobs are created")
    add("--json", type=Path, help="also write the figures here")
    add("--creators", type=int, default=10, help="jobs in flight at once, one user each")
    add("--sse", type=int, default=2, help="SSE followers per job")
    add("--ws", type=int, default=3, help="WebSocket followers per job")
    add("--flappers", type=int, default=2, help="WebSocket followers per job that flap")
    add("--flap-s", type=float, default=0.1, help="a flapper drops within this, then pauses")
    add("--drop", type=float, default=0.5, help="share of stream connections dropped")
    add("--drop-s", type=float, default=3.0, help="a drop comes within this many seconds")
    add("--join-s", type=float, default=2.0, help="followers join within this many seconds")
    add("--reconnect-s", type=float, default=0.3, help="pause before a reconnect, at most")
    add("--ws-ping-s", type=float, default=0.1, help="httpx-ws keepalive ping interval")
    add("--poll-s", type=float, default=1.0, help="mean time between polls")
    add("--poll-drop", type=float, default=0.1, help="share of polls dropped")
    add("--create-drop", type=float, default=0.1, help="share of creates first dropped")
    add("--latency", type=float, default=1.0, help="seconds per prediction at the fake")
    add("--create-500", type=float, default=0.10)
    add("--create-429", type=float, default=0.05)
    add("--get-429", type=float, default=0.05)
    add("--capacity", type=int, default=50, help="MAX_CONCURRENCY")
    add("--drain-s", type=float, default=240.0, help="time for the last jobs to end")
    add("--quiet-s", type=float, default=20.0, help="idle time after the load, sampled")
    add("--sample-s", type=float, default=5.0, help="RSS and fds every this many seconds")
    add("--rss-base-mib-per-min", type=float, default=1.0, help="RSS growth allowed anyway")
    add("--rss-kib-per-job", type=float, default=128, help="and per job retained")
    add("--fd-slack", type=int, default=8, help="fds allowed above the first sample at the end")
    add("--seed", type=int, default=7)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    result = trio.run(run, args, work)
    report(result)
    common.emit(result, args.json)
    if result["passed"]:
        shutil.rmtree(work)
        sys.exit(0)
    sys.stdout.write(f"kept for a look: {work} (the service's log, database and images)\n")
    sys.exit(1)


if __name__ == "__main__":
    main()
