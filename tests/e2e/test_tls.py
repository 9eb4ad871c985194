"""HTTPS served directly (``TLS_CERTFILE``, ``TLS_KEYFILE``): HTTP/2 by ALPN, WebSocket on HTTP/1.1.

A certificate authority and a certificate for 127.0.0.1 are made at test time (trustme); the
service is ``run_server`` on a real socket, its clients httpx with ``http2=True`` and trio-websocket
over TLS. HTTP/2 multiplexes every stream of an origin on one connection, which lifts the six
connections per origin that browsers allow HTTP/1.1 (and so six open ``EventSource``s).
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trustme

from tests.e2e.certificates import issue, trusting
from tests.e2e.test_server import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
    GRACEFUL_TIMEOUT_S,
    HEARTBEAT_S,
    WAIT_S,
    WS_NORMAL,
    WS_POLICY_VIOLATION,
    Server,
    bearer,
    login,
    open_ws,
    read_sse,
    receive,
    running_server,
    server_settings,
    submit,
)
from tests.e2e.web_process import ROOT

#: More concurrent event streams than a browser opens to one origin over HTTP/1.1.
STREAMS = 8


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def certificate(authority: trustme.CA, tmp_path: Path) -> Path:
    return issue(authority, tmp_path / "server.pem")


@pytest.fixture
def client_context(authority: trustme.CA) -> ssl.SSLContext:
    return trusting(authority)


@pytest.fixture
def latency_ms() -> tuple[int, int]:
    return (50, 150)


@pytest.fixture
async def server(
    nursery: trio.Nursery, tmp_path: Path, latency_ms: tuple[int, int], certificate: Path
) -> AsyncIterator[Server]:
    """The service over HTTPS only, on a free port."""
    settings = attrs.evolve(
        server_settings(tmp_path, latency_ms, HEARTBEAT_S, GRACEFUL_TIMEOUT_S),
        tls_certfile=certificate,
        tls_keyfile=certificate,
    )
    async with running_server(nursery, settings) as running:
        yield running


@pytest.fixture
async def h2(server: Server, client_context: ssl.SSLContext) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP/2 client with one connection at most: every request is a stream on it."""
    async with httpx.AsyncClient(
        base_url=server.url,
        http1=False,
        http2=True,
        verify=client_context,
        timeout=WAIT_S,
        limits=httpx.Limits(max_connections=1),
    ) as client:
        yield client


async def test_the_page_login_polling_and_sse_speak_http2(
    server: Server, h2: httpx.AsyncClient
) -> None:
    assert server.url.startswith("https://127.0.0.1:")
    page = await h2.get("/")
    assert (page.http_version, page.status_code) == ("HTTP/2", 200)
    assert "<html" in page.text
    token = await login(h2, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(h2, token)

    reply = await read_sse(h2, job_id, headers=bearer(token))

    assert reply.status == 200
    events = reply.events()
    assert [event.id for event in events] == list(range(1, 7))
    assert events[-1].type == "done"
    with trio.fail_after(WAIT_S):
        polled = await h2.get(f"/api/generate/{job_id}", headers=bearer(token))
    assert polled.http_version == "HTTP/2"
    for result in polled.json()["results"]:
        # The request's own scheme: an image URL a browser on this page can load.
        assert result["url"].startswith(f"{server.url}/files/"), result
        with trio.fail_after(WAIT_S):
            image = await h2.get(result["url"])
        assert (image.http_version, image.status_code) == ("HTTP/2", 200)


@pytest.mark.parametrize("latency_ms", [(1500, 1500)], ids=["slow"])
async def test_many_event_streams_share_one_http2_connection(
    server: Server, h2: httpx.AsyncClient
) -> None:
    token = await login(h2, DEMO_EMAIL, DEMO_PASSWORD)
    job_ids = [await submit(h2, token) for _ in range(STREAMS)]
    opened: list[httpx.Response] = []

    async def follow(job_id: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with h2.stream(
            "GET", f"/api/generate/{job_id}/stream", headers=bearer(token)
        ) as response:
            opened.append(response)
            task_status.started()
            async for _ in response.aiter_lines():
                pass

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for job_id in job_ids:
                await nursery.start(follow, job_id)
            # Every stream is open at once, on the client's single connection (with HTTP/1.1
            # the second would wait for the first to end), and the server follows them all.
            status = (await h2.get("/api/status", headers=bearer(token))).json()
            assert status["subscribers"]["sse"] == STREAMS
            assert status["jobs"]["completed"] == 0
            nursery.cancel_scope.cancel()  # the streams are not needed to their end

    assert [(r.http_version, r.status_code) for r in opened] == [("HTTP/2", 200)] * STREAMS


async def test_a_websocket_speaks_http11_on_the_same_port(
    server: Server, h2: httpx.AsyncClient, authority: trustme.CA
) -> None:
    token = await login(h2, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(h2, token)
    ws_context = trusting(authority, alpn=["http/1.1"])
    url = server.ws_url(f"/api/generate/{job_id}")
    assert url.startswith("wss://")
    frames = []

    with trio.fail_after(WAIT_S):
        async with open_ws(f"{url}?token={token}", ssl_context=ws_context) as ws:
            while (message := await receive(ws)) is not None:
                frames.append(message)
            assert ws.closed is not None
            code = ws.closed.code
        async with open_ws(f"{url}?token=forged", ssl_context=ws_context) as ws:
            assert await receive(ws) is None
            assert ws.closed is not None
            refused = ws.closed.code

    assert len(frames) == 6
    assert '"url": "https://127.0.0.1:' in str(frames[0])
    assert (code, refused) == (WS_NORMAL, WS_POLICY_VIOLATION)


async def test_plain_http_on_the_tls_port_gets_no_answer(server: Server) -> None:
    async with httpx.AsyncClient(base_url=server.url.replace("https", "http")) as plain:
        with trio.fail_after(WAIT_S), pytest.raises(httpx.TransportError):
            await plain.get("/health")


def test_unusable_tls_files_stop_the_service_with_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    result = subprocess.run(
        [sys.executable, "-m", "web"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "STORE": "memory",
            "TLS_CERTFILE": str(missing),
            "TLS_KEYFILE": str(missing),
        },
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "TLS_CERTFILE/TLS_KEYFILE cannot be used" in result.stderr
    assert "Traceback" not in result.stderr
