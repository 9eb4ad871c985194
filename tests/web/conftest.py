"""Fixtures for route tests: a supervisor on a scripted provider, the app, a client, a token."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import pytest
import trio
from quart_trio import QuartTrio
from quart_trio.testing import TrioClient
from quart_trio.testing.connections import TestHTTPConnection
from trio.testing import MockClock

from actors.providers.local import LocalProviderSettings
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.store import MemoryStore
from actors.supervisor import Supervisor
from tests.fakes import FakeProvider, upper_jitter
from tests.web.helpers import HASHER, OTHER_EMAIL, OTHER_PASSWORD, SECRET, login
from web.app import create_app
from web.auth import Authenticator
from web.settings import Settings


class StreamingTestHTTPConnection(TestHTTPConnection):
    """quart-trio's test connection, ending the stream when the app returns (as a real server does):
    without this, leaving an endless SSE response hangs the test."""

    async def __aenter__(self) -> StreamingTestHTTPConnection:
        self._nursery_manager = trio.open_nursery()
        nursery = await self._nursery_manager.__aenter__()

        async def run_app() -> None:
            try:
                await self.app(self.scope, self._asgi_receive, self._asgi_send)  # type: ignore[arg-type]
            finally:
                self._client_send.close()

        nursery.start_soon(run_app)
        return self


class StreamingTrioClient(TrioClient):
    http_connection_class = StreamingTestHTTPConnection


def run_on_virtual_time(
    fn: Callable[[], Awaitable[object]],
    *,
    clock: trio.abc.Clock | None = None,
    instruments: Sequence[trio.abc.Instrument] = (),
) -> object:
    """``trio.run`` with an autojump clock unless the test asked for a clock of its own."""
    return trio.run(fn, clock=clock or MockClock(autojump_threshold=0), instruments=instruments)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Route tests all run on virtual time: latency, backoff and heartbeats cost nothing.

    pytest-trio only honours a clock fixture the test function names itself, so the runner is
    swapped through its ``trio(run=...)`` marker instead.
    """
    here = Path(__file__).parent
    for item in items:
        is_async = inspect.iscoroutinefunction(getattr(item, "obj", None))
        if here in item.path.parents and is_async:
            item.add_marker(pytest.mark.trio(run=run_on_virtual_time))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"{OTHER_EMAIL}:{HASHER.hash(OTHER_PASSWORD)}\n")
    return Settings(
        auth_secret=SECRET,
        users_file=users_file,
        local=LocalProviderSettings(images_dir=tmp_path / "images"),
        supervisor=SupervisorSettings(
            capacity=2,
            retry=RetryPolicy(attempts=3, base_delay_s=1.0, max_delay_s=4.0),
            attempt_timeout_s=30.0,
            max_active_jobs_per_user=3,
            max_queued_images=60,
        ),
    )


@pytest.fixture
def provider() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
async def supervisor(
    nursery: trio.Nursery,
    provider: FakeProvider,
    settings: Settings,
) -> Supervisor:
    supervisor = Supervisor(
        provider, settings.supervisor, store=MemoryStore(), uniform=upper_jitter
    )
    await nursery.start(supervisor.run)
    return supervisor


@pytest.fixture
def auth(settings: Settings) -> Authenticator:
    return Authenticator(settings, hasher=HASHER)


@pytest.fixture
def app(supervisor: Supervisor, settings: Settings, auth: Authenticator) -> QuartTrio:
    app = create_app(supervisor, settings, auth)
    app.test_client_class = StreamingTrioClient
    return app


@pytest.fixture
def client(app: QuartTrio) -> TrioClient:
    return cast(TrioClient, app.test_client())


@pytest.fixture
async def token(client: TrioClient) -> str:
    return await login(client, "test@example.com", "password123")


@pytest.fixture
async def other_token(client: TrioClient) -> str:
    return await login(client, OTHER_EMAIL, OTHER_PASSWORD)
