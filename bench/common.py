"""What the benchmarks share: server processes, a lean HTTP client, stream recorders, figures.

Every server runs as a subprocess on ``127.0.0.1`` (``python -m bench.server``: our service or
the yardstick, both with :class:`bench.provider.BenchProvider`), so that its CPU time and RSS
can be read from ``/proc`` and it has a core of its own; the clients run in the bench's process.
Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import os
import re
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bench import h2client
from bench.provider import finished_ns, prompt
from tests.e2e.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-0123456789-0123456789-0123456789"  # noqa: S105 (a local run's)
CREDENTIALS = {"email": "test@example.com", "password": "password123"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGESIZE") // 1024
RECEIVE_BYTES = 65536
#: A keep-alive connection idle this long is opened again (hypercorn closes them after 5 s).
IDLE_S = 4.0


class BenchError(RuntimeError):
    """The bench could not measure what it set out to (a server misbehaved or timed out)."""


# --- figures ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Count, min, p50, p95, p99, max and mean of ``values`` (rounded to 0.01)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "min": round(min(values), 2),
        "p50": round(percentile(values, 0.50), 2),
        "p95": round(percentile(values, 0.95), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values), 2),
        "mean": round(statistics.fmean(values), 2),
    }


def ratio(ours: float | None, yardstick: float | None) -> float | None:
    if ours is None or yardstick is None or yardstick == 0:
        return None
    return round(ours / yardstick, 2)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[fmt(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    sys.stdout.write("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + "\n")
    sys.stdout.write("  ".join("-" * w for w in widths) + "\n")
    for row in cells:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + "\n")


def emit(result: Mapping[str, Any], json_path: Path | None) -> None:
    """Write ``result`` to ``json_path`` (if given) and print it as one JSON line."""
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(json.dumps(result) + "\n")


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d"),
    }


def run_in_work_dir(
    run: Callable[[Any, Path], Awaitable[dict[str, Any]]], args: Any, prefix: str
) -> dict[str, Any]:
    """``trio.run(run, args, work_dir)`` in a fresh temporary directory, with the open-files
    limit raised; its figures with the settings and the machine added."""
    raise_nofile()
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        result = trio.run(run, args, Path(work))
    result["settings"] = vars(args) | {"json": None}
    result["machine"] = machine()
    return result


def raise_nofile() -> int:
    """Raise the open-files limit to its hard limit (inherited by the servers); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int) -> int:
    """``VmRSS`` of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` has open (sockets, files, pipes)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cpu_cgroup_root() -> tuple[Path, bool]:
    """Where a CPU quota can be set: (the cgroup root, whether it is cgroup v2)."""
    if "cpu" in _read(CGROUP_ROOT / "cgroup.controllers").split():
        return CGROUP_ROOT, True
    for name in ("cpu", "cpu,cpuacct"):
        if (CGROUP_ROOT / name / "cpu.cfs_quota_us").exists():
            return CGROUP_ROOT / name, False
    raise BenchError("no cgroup CPU controller under /sys/fs/cgroup: a CPU limit needs one")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


@contextmanager
def cpu_limit(pid: int, cores: float, period_us: int = 10_000) -> Iterator[None]:
    """Hold process ``pid`` (all its threads) to ``cores`` of CPU for the block, as a
    container's CPU limit does: a CFS quota of ``cores * period_us`` per ``period_us`` in a
    cgroup of its own (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``; needs root). A short period
    keeps each throttled stretch short (Kubernetes uses 100 ms)."""
    root, v2 = _cpu_cgroup_root()
    group = root / f"bench-cpu-{pid}"
    quota = max(1000, round(cores * period_us))
    try:
        group.mkdir()
        if v2:
            (root / "cgroup.subtree_control").write_text("+cpu")
            (group / "cpu.max").write_text(f"{quota} {period_us}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(period_us))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise BenchError(f"cannot limit process {pid} to {cores} cores: {exc}") from exc
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # the process may be gone: its cgroup is then empty
            (root / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            group.rmdir()


# --- server processes ----------------------------------------------------------------------


@attrs.define(eq=False)
class Server:
    """A server subprocess (``python -m bench.server`` or ``python -m web``)."""

    kind: str
    process: trio.Process
    port: int
    log_path: Path
    gates: int = 0
    #: The server serves HTTPS (``TLS_CERTFILE``): HTTP/1.1 clients trust it with this context,
    #: HTTP/2 clients with ``h2_context`` (each offers its own protocol by ALPN).
    ssl_context: ssl.SSLContext | None = None
    h2_context: ssl.SSLContext | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def next_gate(self) -> int:
        """The gate number a job created now should wait for (see :meth:`open_gate`)."""
        return self.gates + 1

    def open_gate(self) -> None:
        """Release the images waiting for gate :meth:`next_gate` (``SIGUSR1``)."""
        self.gates += 1
        self.process.send_signal(signal.SIGUSR1)


_GC_LINE = re.compile(r"gc: generation 2 took ([0-9.]+) ms")


def full_gc_pauses(server: Server) -> dict[str, Any]:
    """Full collections of over 5 ms the server logged so far (``--gc-log``): count, max, sum."""
    pauses = [float(m.group(1)) for m in _GC_LINE.finditer(server.log_path.read_text())]
    return {
        "count": len(pauses),
        "max_ms": round(max(pauses, default=0.0), 1),
        "total_ms": round(sum(pauses), 1),
    }


_MEMORY_LINE = re.compile(r"memory: (.+)\t(-?[0-9.]+)\t(-?\d+)$", re.MULTILINE)


async def memory_snapshot(server: Server) -> list[tuple[str, float, int]]:
    """Ask a ``--tracemalloc`` server for a snapshot (``SIGUSR2``); what it logged.

    The first call takes the baseline (and answers ``[]``); later calls answer the memory
    allocated since, by owner, as ``(owner, KiB, blocks)``, largest first.
    """
    markers = ("memory: baseline", "memory: end")

    def count() -> int:
        text = server.log_path.read_text()
        return sum(text.count(marker) for marker in markers)

    before = count()
    server.process.send_signal(signal.SIGUSR2)
    with trio.fail_after(120):
        for _ in range(10_000):
            if count() > before:
                break
            await trio.sleep(0.1)
    text = server.log_path.read_text()
    last = text.rsplit("memory: baseline", 1)[-1]
    if "memory: end" not in last:
        return []
    section = last.rsplit("memory: end", 1)[0].rsplit("memory: end", 1)[-1]
    return [(m[1], float(m[2]), int(m[3])) for m in _MEMORY_LINE.finditer(section)]


def service_env(**overrides: object) -> dict[str, str]:
    """Our service's settings for the benches: the defaults, and limits no bench trips on."""
    env = {
        "AUTH_SECRET": SECRET,
        "LOG_LEVEL": "INFO",
        "GRACEFUL_TIMEOUT_S": "1",
        "MAX_ACTIVE_JOBS_PER_USER": "100000",
        "MAX_QUEUED_IMAGES": "1000000",
        "MAX_RETAINED_JOBS": "100000",
        "MAX_STREAMS_PER_USER": "1000000",
    }
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def _clean_environ() -> dict[str, str]:
    """The bench's environment less any of the service's settings (they come from the bench)."""
    keep = {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TERM"}
    return {key: value for key, value in os.environ.items() if key in keep}


@asynccontextmanager
async def spawn_server(
    kind: str,
    work_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    capacity: int = 5,
    seed: int = 7,
    command: Sequence[str] | None = None,
    gc_log: bool = True,
    extra_args: Sequence[str] = (),
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Server]:
    """Run a server subprocess until the block ends (then SIGTERM, and SIGKILL after 10 s).

    ``kind`` is ``ours`` or ``yardstick`` (``python -m bench.server``), or anything else with an
    explicit ``command``. The server's log goes to ``work_dir/<kind>-<port>.log``; its working
    directory is ``work_dir`` (so no ``.env`` of the repository is read). A server started with
    ``TLS_CERTFILE`` in ``env`` needs the ``ssl_context`` its clients trust it with.
    """
    port = free_port()
    args = list(command or [sys.executable, "-m", "bench.server", "--kind", kind])
    args += ["--port", str(port)] if command is None else []
    args += ["--capacity", str(capacity), "--seed", str(seed)] if command is None else []
    args += ["--gc-log"] if command is None and gc_log else []
    args += list(extra_args)
    environ = _clean_environ() | {"PYTHONPATH": str(ROOT), "PORT": str(port)}
    environ |= {"IMAGES_DIR": str(work_dir / "images"), "MAX_CONCURRENCY": str(capacity)}
    environ |= dict(env or {})
    log_path = work_dir / f"{kind}-{port}.log"
    with log_path.open("wb") as log:
        process = await trio.lowlevel.open_process(
            args, cwd=work_dir, env=environ, stdout=log, stderr=subprocess.STDOUT
        )
    server = Server(
        kind=kind, process=process, port=port, log_path=log_path, ssl_context=ssl_context
    )
    try:
        await _wait_healthy(server)
        yield server
    finally:
        with trio.move_on_after(30, shield=True):
            await _stop(process)


async def _stop(process: trio.Process) -> None:
    """SIGTERM, and SIGKILL after 10 s (callers shield it: it runs while the bench unwinds)."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()


@asynccontextmanager
async def spawn_fake_replicate(latency_s: float) -> AsyncIterator[int]:
    """Run ``python -m tests.fake_replicate`` (a process of its own, so that its work is not
    the bench's) until the block ends; yields its port once it answers."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tests.fake_replicate",
            "--port",
            str(port),
            "--latency",
            str(latency_s),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(60):
            while True:
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        yield port
    finally:
        with trio.move_on_after(30, shield=True):
            await _stop(process)


async def _wait_healthy(server: Server) -> None:
    with trio.fail_after(60):
        for _ in range(6000):
            if server.process.returncode is not None:
                raise BenchError(f"{server.kind} exited early; see {server.log_path}")
            try:
                async with await HttpClient.connect(server.port, server.ssl_context) as client:
                    status, _ = await client.request("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            await trio.sleep(0.02)
    raise BenchError(f"{server.kind} never became healthy; see {server.log_path}")


# --- a lean HTTP/1.1 client -------------------------------------------------------------------


async def open_stream(port: int, ssl_context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """A TCP connection to ``127.0.0.1:port``, over TLS if ``ssl_context`` is given."""
    if ssl_context is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    return await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ssl_context)


class HttpClient:
    """One keep-alive HTTP/1.1 connection to ``127.0.0.1:port`` (over TLS with
    ``ssl_context``), parsed with h11.

    Lighter than httpx, so that the client is not what a benchmark measures.
    """

    def __init__(
        self, stream: trio.abc.Stream, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._stream = stream
        self._port = port
        self._ssl_context = ssl_context
        self._host = f"127.0.0.1:{port}"
        self._conn = h11.Connection(h11.CLIENT)
        self.token: str | None = None
        self.reconnects = 0
        self._used = time.monotonic()

    @classmethod
    async def connect(cls, port: int, ssl_context: ssl.SSLContext | None = None) -> HttpClient:
        return cls(await open_stream(port, ssl_context), port, ssl_context)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stream.aclose()

    async def request(
        self,
        method: str,
        target: str,
        body: object = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Send one request (``body`` as JSON, ``headers`` added) and read the whole answer."""
        if time.monotonic() - self._used > IDLE_S:  # the server may have closed it by now
            await self._reconnect()
        self._used = time.monotonic()
        fields = [("Host", self._host), *headers]
        if self.token is not None:
            fields.append(("Authorization", f"Bearer {self.token}"))
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            fields += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        conn = self._conn
        data = conn.send(h11.Request(method=method, target=target, headers=fields)) or b""
        if payload:
            data += conn.send(h11.Data(data=payload)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._stream.send_all(data)
        status = 0
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await self._stream.receive_some(RECEIVE_BYTES)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise BenchError(f"connection closed during {method} {target}")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the server closes (hypercorn: after keep_alive_max_requests, 1000)
            await self._reconnect()
        return status, b"".join(chunks)

    async def _reconnect(self) -> None:
        await self._stream.aclose()
        self._stream = await open_stream(self._port, self._ssl_context)
        self._conn = h11.Connection(h11.CLIENT)
        self.reconnects += 1

    async def json(
        self,
        method: str,
        target: str,
        body: object = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> tuple[int, Any]:
        status, raw = await self.request(method, target, body, headers)
        return status, json.loads(raw) if raw else None

    async def login(self) -> str:
        status, answer = await self.json("POST", "/api/auth/login", CREDENTIALS)
        if status != 200:
            raise BenchError(f"login answered {status}: {answer}")
        token = answer["access_token"]
        assert isinstance(token, str)
        self.token = token
        return token

    async def create(self, job_prompt: str, num_images: int) -> str:
        body = {"prompt": job_prompt, "num_images": num_images}
        status, answer = await self.json("POST", "/api/generate", body)
        if status != 200:
            raise BenchError(f"create answered {status}: {answer}")
        job_id = answer["job_id"]
        assert isinstance(job_id, str)
        return job_id


async def login(port: int, ssl_context: ssl.SSLContext | None = None) -> str:
    async with await HttpClient.connect(port, ssl_context) as client:
        return await client.login()


# --- stream recorders -------------------------------------------------------------------------


@attrs.frozen
class Received:
    """One event as a subscriber got it: when (``time.monotonic_ns()``), and what."""

    id: int
    type: str
    data: dict[str, Any]
    at_ns: int

    @property
    def delivery_ms(self) -> float | None:
        """From the provider finishing this image to its arrival here (completed images)."""
        url = self.data.get("url")
        if self.type != "progress" or not url:
            return None
        return (self.at_ns - finished_ns(str(url))) / 1e6


_TERMINATOR = b"\r\n0\r\n\r\n"  # the end of a chunked body


async def record_sse(
    port: int,
    target: str,
    token: str,
    *,
    on_ready: Callable[[], None],
    max_reads: int = 100_000,
    ssl_context: ssl.SSLContext | None = None,
) -> list[tuple[int, bytes]]:
    """Open an SSE stream and keep every read with its arrival time until the response ends.

    ``on_ready`` is called once the headers and the ``retry:`` line are in. Reads are parsed
    afterwards (:func:`parse_sse`), so a subscriber costs the client one ``receive_some`` and one
    clock read per wake-up, and thousands of them in one process stay cheap.
    """
    stream = await open_stream(port, ssl_context)
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: text/event-stream\r\n\r\n"
    ).encode()
    reads: list[tuple[int, bytes]] = []
    async with stream:
        await stream.send_all(request)
        ready = False
        tail = b""
        for _ in range(max_reads):
            data = await stream.receive_some(RECEIVE_BYTES)
            now = time.monotonic_ns()
            if not data:
                break
            reads.append((now, bytes(data)))  # the same object when it is bytes
            if not ready:
                head = b"".join(chunk for _, chunk in reads)
                if b"\r\n\r\n" in head and not head.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"stream answered {head[:200]!r}")
                if b"retry:" in head:
                    ready = True
                    on_ready()
            tail = (tail + data)[-len(_TERMINATOR) :]
            if tail == _TERMINATOR:
                break
    return reads


def parse_sse(reads: Sequence[tuple[int, bytes]]) -> list[Received]:
    """The events of a recorded SSE response, each stamped with the read that completed it."""
    raw = b"".join(chunk for _, chunk in reads)
    ends = list(itertools.accumulate(len(chunk) for _, chunk in reads))
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise BenchError("no response head in the recording")
    pos = head_end + 4
    body = bytearray()
    starts: list[int] = []  # body offset where each chunk starts
    raw_starts: list[int] = []  # and where that chunk's data sits in ``raw``
    if b"transfer-encoding: chunked" in raw[:head_end].lower():
        while True:
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                break
            starts.append(len(body))
            raw_starts.append(eol + 2)
            body += raw[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    else:
        starts.append(0)
        raw_starts.append(pos)
        body += raw[pos:]
    events: list[Received] = []
    cursor = 0
    while True:
        end = body.find(b"\n\n", cursor)
        if end < 0:
            break
        block, cursor = bytes(body[cursor:end]), end + 2
        fields: dict[str, str] = {}
        for line in block.decode().split("\n"):
            name, _, value = line.partition(": ")
            fields[name] = value
        if "data" not in fields:
            continue
        chunk = bisect.bisect_right(starts, end + 1) - 1
        raw_offset = raw_starts[chunk] + (end + 1 - starts[chunk])
        read = bisect.bisect_right(ends, raw_offset)
        events.append(
            Received(
                id=int(fields.get("id", "0")),
                type=fields.get("event", "message"),
                data=json.loads(fields["data"]),
                at_ns=reads[read][0],
            )
        )
    return events


async def record_ws(
    port: int, target: str, *, on_ready: Callable[[], None], max_messages: int = 10_000
) -> list[Received]:
    """Follow a WebSocket (trio-websocket) until the server closes it; every frame, stamped."""
    events: list[Received] = []
    async with open_websocket_url(f"ws://127.0.0.1:{port}{target}") as ws:
        on_ready()
        for _ in range(max_messages):
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                break
            now = time.monotonic_ns()
            frame = json.loads(message)
            events.append(Received(frame["id"], frame["type"], frame["payload"], now))
    return events


# --- one gated job and its subscribers --------------------------------------------------------


@attrs.frozen(kw_only=True)
class StreamRun:
    """What one gated job's subscribers received, and the server's memory around it."""

    num_images: int
    sse: list[list[Received]]
    ws: list[list[Received]]
    rss_before_kb: int
    rss_subscribed_kb: int
    rss_after_kb: int
    connect_s: float

    def complete(self, events: list[Received]) -> bool:
        """Every event, in order, ending with ``done``."""
        ids = [event.id for event in events]
        return (
            ids == list(range(1, self.num_images + 2))
            and events[-1].type == "done"
            and all(event.data.get("status") == "completed" for event in events)
        )

    def delivery_ms(self, streams: list[list[Received]]) -> list[float]:
        return [
            ms for events in streams for event in events if (ms := event.delivery_ms) is not None
        ]


@attrs.frozen
class GatedDeliveries:
    """What :func:`run_gated_jobs` measured: delivery times and complete subscribers."""

    sse_ms: list[float]
    ws_ms: list[float]
    complete: int
    subscribers: int


async def run_gated_jobs(
    server: Server,
    token: str,
    *,
    jobs: int,
    sse: int,
    ws: int = 0,
    num_images: int = 10,
    latency_ms: float = 50,
    gap_ms: float = 20,
) -> GatedDeliveries:
    """``jobs`` gated jobs one after the other (:func:`run_gated_job`), their deliveries pooled."""
    sse_ms: list[float] = []
    ws_ms: list[float] = []
    complete = subscribers = 0
    for _ in range(jobs):
        run = await run_gated_job(
            server,
            token,
            sse=sse,
            ws=ws,
            num_images=num_images,
            latency_ms=latency_ms,
            gap_ms=gap_ms,
        )
        sse_ms += run.delivery_ms(run.sse)
        ws_ms += run.delivery_ms(run.ws)
        complete += sum(run.complete(events) for events in run.sse + run.ws)
        subscribers += len(run.sse) + len(run.ws)
    return GatedDeliveries(sse_ms, ws_ms, complete, subscribers)


@attrs.define(eq=False)
class _Subscribers:
    """The subscribers of one gated job: what each recorded, and when all have their stream.

    At most ``limiter``'s worth of connections are being set up at a time.
    """

    server: Server
    token: str
    job_id: str
    want: int
    limiter: trio.CapacityLimiter
    ready: int = 0
    all_ready: trio.Event = attrs.Factory(trio.Event)
    sse_reads: list[list[tuple[int, bytes]]] = attrs.Factory(list)
    ws_events: list[list[Received]] = attrs.Factory(list)

    def count_ready(self) -> None:
        self.ready += 1
        if self.ready == self.want:
            self.all_ready.set()

    def one_ready(self) -> None:
        self.limiter.release_on_behalf_of(trio.lowlevel.current_task())
        self.count_ready()

    async def sse(self) -> None:
        await self.limiter.acquire_on_behalf_of(trio.lowlevel.current_task())
        target = f"/api/generate/{self.job_id}/stream"
        reads = await record_sse(
            self.server.port,
            target,
            self.token,
            on_ready=self.one_ready,
            ssl_context=self.server.ssl_context,
        )
        self.sse_reads.append(reads)

    async def h2(self, count: int) -> None:
        """``count`` SSE subscribers on one HTTP/2 connection."""
        if self.server.h2_context is None:
            raise BenchError("HTTP/2 subscribers need a server that serves TLS (h2_context)")
        task = trio.lowlevel.current_task()
        await self.limiter.acquire_on_behalf_of(task)  # one connection being set up
        held = True

        def stream_ready() -> None:
            nonlocal held
            if held:
                self.limiter.release_on_behalf_of(task)
                held = False
            self.count_ready()

        recordings = await h2client.record_sse_streams(
            self.server.port,
            f"/api/generate/{self.job_id}/stream",
            self.token,
            count,
            ssl_context=self.server.h2_context,
            on_ready=stream_ready,
        )
        self.sse_reads.extend(recordings)

    async def ws(self) -> None:
        await self.limiter.acquire_on_behalf_of(trio.lowlevel.current_task())
        target = f"/api/generate/{self.job_id}?token={self.token}"
        self.ws_events.append(await record_ws(self.server.port, target, on_ready=self.one_ready))


async def run_gated_job(
    server: Server,
    token: str,
    *,
    sse: int,
    ws: int = 0,
    num_images: int = 10,
    latency_ms: float = 50,
    gap_ms: float = 20,
    connecting: int = 64,
    settle_s: float = 0.3,
    timeout_s: float = 300,
    before_gate: Callable[[], Awaitable[None]] | None = None,
    h2_streams: int = 0,
) -> StreamRun:
    """Create a job whose images wait for a gate, subscribe to it, open the gate, record.

    The gate opens once every subscriber has its stream (and ``settle_s`` more, so the server
    is idle); image ``i`` then finishes ``latency_ms + i * gap_ms`` later. SSE subscribers each
    have a connection of their own (HTTP/1.1, over TLS if the server serves it), or with
    ``h2_streams`` share HTTP/2 connections, that many streams on each.
    """
    async with await HttpClient.connect(server.port, server.ssl_context) as client:
        client.token = token
        spec = prompt(latency_ms=latency_ms, gap_ms=gap_ms, gate=server.next_gate())
        job_id = await client.create(spec, num_images)
    rss_before = server.rss_kb()
    subscribers = _Subscribers(server, token, job_id, sse + ws, trio.CapacityLimiter(connecting))
    t0 = trio.current_time()
    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            if h2_streams:
                for first in range(0, sse, h2_streams):
                    nursery.start_soon(subscribers.h2, min(h2_streams, sse - first))
            else:
                for _ in range(sse):
                    nursery.start_soon(subscribers.sse)
            for _ in range(ws):
                nursery.start_soon(subscribers.ws)
            await subscribers.all_ready.wait()
            connect_s = trio.current_time() - t0
            await trio.sleep(settle_s)
            rss_subscribed = server.rss_kb()
            if before_gate is not None:
                await before_gate()
            server.open_gate()
    return StreamRun(
        num_images=num_images,
        sse=[parse_sse(reads) for reads in subscribers.sse_reads],
        ws=subscribers.ws_events,
        rss_before_kb=rss_before,
        rss_subscribed_kb=rss_subscribed,
        rss_after_kb=server.rss_kb(),
        connect_s=connect_s,
    )
