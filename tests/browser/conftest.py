"""Browser tests: Debian's Chromium, driven by Playwright's sync API, against real servers.

Playwright's sync API runs its own asyncio loop, so these tests are plain ``def`` tests (pytest-trio
only takes over ``async def`` ones) and the servers are ``python -m web`` subprocesses, started
together once for the package. Without ``/usr/bin/chromium`` the tests skip (``make test`` installs
it as root); under CI a missing browser is an error instead, so that a green run means they ran.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, ViewportSize, sync_playwright

from tests.system import require_program

ROOT = Path(__file__).parents[2]
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))  # Debian's package
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
AUTH_SECRET = "browser-test-secret-0123456789-0123456789"
START_TIMEOUT_S = 20
DESKTOP: ViewportSize = {"width": 1280, "height": 900}


def _require_chromium() -> None:
    require_program(CHROMIUM, "`make browser` installs Debian's chromium (as root)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(arguments: list[str], env: dict[str, str], logs: Path) -> subprocess.Popen[bytes]:
    """``python -m *arguments`` in the repository, its output into ``logs``."""
    with logs.open("wb") as log:
        return subprocess.Popen(  # noqa: S603 (our own modules, our own arguments)
            [sys.executable, "-m", *arguments],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@attrs.define
class Server:
    """A ``python -m web`` process with the local provider."""

    name: str
    env: dict[str, str]
    logs: Path
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, images: Path) -> None:
        # Never the developer's Replicate token: only a server's own ``env`` may name one.
        env = {
            **{key: value for key, value in os.environ.items() if key != "REPLICATE_API_TOKEN"},
            "PYTHONPATH": str(ROOT),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "IMAGES_DIR": str(images / self.name),
            "DATABASE_PATH": str(images / f"{self.name}.sqlite3"),
            "AUTH_SECRET": AUTH_SECRET,
            "LOG_LEVEL": "INFO",  # access lines too: a token must never show up in them
            "GRACEFUL_TIMEOUT_S": "1",
            **self.env,
        }
        self.process = spawn(["web"], env, self.logs)

    def wait_healthy(self, deadline: float) -> None:
        assert self.process is not None
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} server exited:\n{self.logs.read_text()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} server did not start:\n{self.logs.read_text()}"
                    )
                time.sleep(0.05)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class FakeReplicateProcess:
    """``python -m tests.fake_replicate`` (predictions of 300 ms): Replicate for the page."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        arguments = ["tests.fake_replicate", "--port", str(self.port), "--latency", "0.3"]
        self.process = spawn(arguments, {**os.environ, "PYTHONPATH": str(ROOT)}, self.logs)

    def hold_copies(self, hold: bool) -> None:
        """Hold (or release) the service's downloads of outputs; a browser's are answered."""
        action = "hold" if hold else "release"
        httpx.post(f"{self.url}/_fake/copies/{action}", timeout=2).raise_for_status()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@attrs.frozen
class Servers:
    fast: Server  # images in 100-400 ms
    slow: Server  # images never finish during a test; one active job per user
    paced: Server  # one image at a time, 250 ms each; SSE retry 300 ms
    replicate: Server  # the Replicate provider, outputs copied (STORE_IMAGES at its default)
    fake_replicate: FakeReplicateProcess


@pytest.fixture(scope="package")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """The servers, started but perhaps not listening yet (the browser starts meanwhile)."""
    _require_chromium()
    root = tmp_path_factory.mktemp("servers")
    fake = FakeReplicateProcess(root / "fake-replicate.log")
    all_servers = Servers(
        fast=Server("fast", {"LOCAL_LATENCY_MS": "100-400"}, root / "fast.log"),
        slow=Server(
            "slow",
            {"LOCAL_LATENCY_MS": "30000", "MAX_ACTIVE_JOBS_PER_USER": "1", "RETRY_AFTER_S": "3"},
            root / "slow.log",
        ),
        paced=Server(
            "paced",
            {"LOCAL_LATENCY_MS": "250", "MAX_CONCURRENCY": "1", "SSE_RETRY_MS": "300"},
            root / "paced.log",
        ),
        replicate=Server(
            "replicate",
            {
                "REPLICATE_API_TOKEN": "r8_fake_token",
                "REPLICATE_BASE_URL": fake.url,
                "REPLICATE_WAIT_S": "1",
                "REPLICATE_POLL_INTERVAL_MS": "50",
            },
            root / "replicate.log",
        ),
        fake_replicate=fake,
    )
    started = [all_servers.fast, all_servers.slow, all_servers.paced, all_servers.replicate]
    try:
        fake.start()
        for server in started:
            server.start(root / "images")
        yield all_servers
    finally:
        for server in started:
            server.terminate()
        for server in started:
            server.wait_stopped()
        fake.stop()
    for server in started:
        log = server.logs.read_text()
        assert "Traceback" not in log, f"{server.name} server logged an error:\n{log}"
        assert "eyJ" not in log, f"{server.name} server logged a token:\n{log}"


@pytest.fixture(scope="package")
def servers(launched: Servers) -> Servers:
    """The servers, answering."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for server in (launched.fast, launched.slow, launched.paced, launched.replicate):
        server.wait_healthy(deadline)
    return launched


@pytest.fixture(scope="package")
def playwright(launched: Servers) -> Iterator[Playwright]:  # the servers start meanwhile
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (its own sessionStorage) at desktop size; fails on page errors."""
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


class CuttableProxy:
    """A TCP proxy in front of a server whose connections a test can cut, and keep refusing.

    It records what the browser sends, so a test can see a resume request (``Last-Event-ID``).
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.refusing = False
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            self._spawn(self._pump, client, upstream, True)
            self._spawn(self._pump, upstream, client, False)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    with self._lock:
                        self.sent.extend(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(source)
            self._shut(sink)

    def _shut(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):  # already shut, or never connected
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self, *, refuse: bool) -> None:
        """Drop every open connection; with ``refuse``, also drop new ones until ``restore``."""
        self.refusing = refuse
        with self._lock:
            sockets = list(self._open)
        for sock in sockets:
            self._shut(sock)

    def restore(self) -> None:
        self.refusing = False

    def requests(self) -> str:
        with self._lock:
            return self.sent.decode("latin-1")

    def close(self) -> None:
        self._stopping.set()
        self.cut(refuse=True)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture
def proxy(servers: Servers) -> Iterator[CuttableProxy]:
    proxy = CuttableProxy(servers.paced.port)
    try:
        yield proxy
    finally:
        proxy.close()
