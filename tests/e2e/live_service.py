"""One ``python -m web`` process shared by a whole test module (or a bench run), and a job
followed over SSE by a thread for as long as it runs.

Synchronous on purpose: pytest-trio's async fixtures are function-scoped, and a module's worth
of abuse cases should cost one start of the service, not one per case. The cases themselves are
async (trio) and reach the process through its port.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx

from tests.e2e.ports import free_port
from tests.e2e.service_clients import Event

ROOT = Path(__file__).parents[2]
SECRET = "abuse-test-secret-0123456789-abcdefghijklmnopqrst"  # over 32 bytes: no JWT warning
CREDENTIALS = {"email": "test@example.com", "password": "password123"}
#: Bounds a start, a request, the follower's end.
WAIT_S = 20
_COUNTER = re.compile(
    r'^imagegen_connection_errors_total\{kind="([^"]*)"\} ([0-9.e+]+)$', re.MULTILINE
)


@attrs.define
class LiveService:
    """A running service: its process, port, log file, and a client logged in as the demo user."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    client: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token(self) -> str:
        return self.client.headers["Authorization"].removeprefix("Bearer ")

    def alive(self) -> bool:
        return self.process.poll() is None

    def health(self) -> int:
        return self.client.get("/health", headers={"Connection": "close"}).status_code

    def connection_errors(self) -> dict[str, float]:
        """``imagegen_connection_errors_total`` by ``kind`` (empty while none was counted)."""
        text = self.client.get("/metrics", headers={"Connection": "close"}).text
        return {kind: float(value) for kind, value in _COUNTER.findall(text)}

    def log_size(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", errors="replace")

    def submit(self, num_images: int) -> str:
        response = self.client.post(
            "/api/generate", json={"prompt": "a long job", "num_images": num_images}
        )
        assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]
        assert isinstance(job_id, str)
        return job_id


def raise_open_files_limit(needed: int) -> None:
    """Lift the soft limit on open files to ``needed`` (the service inherits it), or fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"ulimit -n is {soft} (hard {hard}); {needed} open files are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextmanager
def live_service(workdir: Path, environ: Mapping[str, str]) -> Iterator[LiveService]:
    """The service on a free port (``STORE=memory``, local provider) with ``environ`` on top;
    its stderr goes to ``workdir/service.log``. Killed on exit if still running."""
    port = free_port()
    log = workdir / "service.log"
    env = {
        **os.environ,
        "PORT": str(port),
        "STORE": "memory",
        "IMAGES_DIR": str(workdir / "images"),
        "AUTH_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        "GRACEFUL_TIMEOUT_S": "1",
        "SHUTDOWN_GRACE_S": "0",
        **environ,
        "PYTHONPATH": str(ROOT),
    }
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "web"],
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT_S) as client:
            _wait_healthy(client, process)
            login = client.post("/api/auth/login", json=CREDENTIALS)
            assert login.status_code == 200, login.text
            client.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
            yield LiveService(process, port, log, client)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT_S)


def _wait_healthy(client: httpx.Client, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited with {process.returncode} while starting")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)  # still starting
    raise RuntimeError(f"the service did not answer /health within {WAIT_S} s")


class SseFollower:
    """A thread that reads one job's SSE stream from start to end, keeping every event."""

    def __init__(self, service: LiveService, job_id: str, *, read_timeout_s: float) -> None:
        self.events: list[Event] = []
        self.error: Exception | None = None
        self._url = f"{service.url}/api/generate/{job_id}/stream"
        self._headers = {"Authorization": f"Bearer {service.token}"}
        self._timeout = httpx.Timeout(WAIT_S, read=read_timeout_s)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._follow, name="sse-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the SSE stream did not end within {timeout} s")

    def snapshot(self) -> tuple[list[Event], Exception | None]:
        with self._lock:
            return list(self.events), self.error

    def _follow(self) -> None:
        try:
            with (
                httpx.Client(timeout=self._timeout) as client,
                client.stream("GET", self._url, headers=self._headers) as response,
            ):
                assert response.status_code == 200, response.status_code
                block: dict[str, str] = {}
                for line in response.iter_lines():
                    if line:
                        field, _, value = line.partition(":")
                        block[field] = value.removeprefix(" ")
                        continue
                    if "event" in block:
                        event = Event(int(block["id"]), block["event"], json.loads(block["data"]))
                        with self._lock:
                            self.events.append(event)
                    block = {}
        except Exception as exc:  # noqa: BLE001 (kept for the test to report, never lost)
            with self._lock:
                self.error = exc


def check_exactly_once(events: list[Event], num_images: int, *, finished: bool) -> None:
    """Ids 1, 2, 3... with no gap and no duplicate, at most one ``progress`` per image, and
    ``done`` only last, after all ``num_images`` of them. ``finished``: ``done`` has come."""
    ids = [event.id for event in events]
    assert ids == list(range(1, len(events) + 1)), ids
    indices = [event.data["index"] for event in events if event.type == "progress"]
    assert len(indices) == len(set(indices)), indices
    assert set(indices) <= set(range(num_images)), indices
    types = [event.type for event in events]
    assert "done" not in types[:-1], types
    if finished or types[-1:] == ["done"]:
        assert types[-1:] == ["done"], types[-3:]
        assert sorted(indices) == list(range(num_images)), indices


def counter_total(counts: Mapping[str, float]) -> float:
    return sum(counts.values())


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def event_summary(events: list[Event]) -> list[tuple[int, str, Any]]:
    return [(event.id, event.type, event.data.get("index")) for event in events]
