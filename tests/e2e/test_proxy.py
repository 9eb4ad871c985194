"""The service behind a real nginx, configured by ``docs/deploy/nginx.conf`` itself.

nginx (Debian's package; ``make test`` installs it as root when missing, as CI runs) is a child
process on 127.0.0.1 with a prefix in ``tmp_path``, in the foreground; the site file is the
documented one with only its ports and certificate paths replaced. It terminates TLS and HTTP/2
(a certificate made at test time by trustme) in front of ``run_server``, which trusts
``X-Forwarded-*`` from 127.0.0.1 only. Without nginx the tests skip, except under ``CI=true``,
where they fail: a green CI run means they ran.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import ip_network
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trustme

from tests.e2e.certificates import issue, trusting
from tests.e2e.ports import free_port
from tests.e2e.test_server import (
    DEMO_EMAIL,
    DEMO_PASSWORD,
    GRACEFUL_TIMEOUT_S,
    HEARTBEAT_S,
    WAIT_S,
    WS_NORMAL,
    WS_NOT_FOUND,
    WS_POLICY_VIOLATION,
    Server,
    bearer,
    login,
    open_ws,
    poll_until_finished,
    receive,
    running_server,
    server_settings,
    submit,
)
from tests.e2e.web_process import ROOT
from tests.system import require_program

NGINX = Path(os.environ.get("NGINX", "/usr/sbin/nginx"))  # Debian's package
SITE = ROOT / "docs" / "deploy" / "nginx.conf"
#: The proxy connects from here; a client bound to another loopback address is "anyone else".
PROXY_ADDRESS, OTHER_ADDRESS = "127.0.0.1", "127.0.0.2"
SPOOFED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example:666"}
#: One image at a time, this long each: a job's events are spread over a second and a half.
IMAGE_MS = 300


def site_config(*, upstream: int, port: int, http_port: int, certificate: Path) -> str:
    """``docs/deploy/nginx.conf`` on loopback ports, with the test's certificate."""
    text = SITE.read_text(encoding="utf-8")
    for old, new in [
        ("server 127.0.0.1:8080;", f"server 127.0.0.1:{upstream};"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;"),
        ("/etc/letsencrypt/live/img.example.com/fullchain.pem", str(certificate)),
        ("/etc/letsencrypt/live/img.example.com/privkey.pem", str(certificate)),
    ]:
        assert text.count(old) == 1, f"{SITE} no longer has {old!r} once"
        text = text.replace(old, new)
    # Loopback over IPv4 only: the machine may have no IPv6.
    return re.sub(r"^\s*listen \[::\]:.*\n", "", text, flags=re.MULTILINE)


def main_config(prefix: Path, site: Path) -> str:
    """A whole nginx.conf around the site file: no daemon, one process, every path in ``prefix``."""
    temp = " ".join(
        f"{kind}_temp_path {prefix / kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    return f"""
daemon off;
master_process off;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
    # As a distribution's nginx.conf may have it: compression, which buffers what it compresses.
    gzip on;
    gzip_types text/event-stream application/json;
    {temp} uwsgi_temp_path {prefix / "uwsgi"}; scgi_temp_path {prefix / "scgi"};
    include {site};
}}
"""


@attrs.frozen
class Proxy:
    url: str  # https://127.0.0.1:PORT
    error_log: Path


@asynccontextmanager
async def running_nginx(prefix: Path, *, upstream: int, certificate: Path) -> AsyncIterator[Proxy]:
    """nginx in the foreground on a free port; stopped (SIGQUIT, graceful) on the way out."""
    port, http_port = free_port(), free_port()
    site, conf = prefix / "imagegen.conf", prefix / "nginx.conf"
    site.write_text(
        site_config(upstream=upstream, port=port, http_port=http_port, certificate=certificate)
    )
    conf.write_text(main_config(prefix, site))
    error_log = prefix / "error.log"
    command = [str(NGINX), "-p", str(prefix), "-c", str(conf), "-e", str(error_log)]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(WAIT_S):
            while True:
                if process.returncode is not None:
                    raise RuntimeError(f"nginx exited:\n{error_log.read_text()}")
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.02)  # nginx is still starting
        yield Proxy(f"https://127.0.0.1:{port}", error_log)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGQUIT)
        with trio.CancelScope(shield=True), trio.move_on_after(WAIT_S):
            await process.wait()
        if process.returncode is None:
            process.kill()


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_context(authority: trustme.CA) -> ssl.SSLContext:
    return trusting(authority)


@pytest.fixture
def ws_context(authority: trustme.CA) -> ssl.SSLContext:
    return trusting(authority, alpn=["http/1.1"])


@pytest.fixture
async def service(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Server]:
    """The service on plain HTTP, trusting forwarded headers from the proxy's address only."""
    settings = server_settings(tmp_path, (IMAGE_MS, IMAGE_MS), HEARTBEAT_S, GRACEFUL_TIMEOUT_S)
    settings = attrs.evolve(
        settings,
        supervisor=attrs.evolve(settings.supervisor, capacity=1),
        forwarded_allow_ips=(ip_network(PROXY_ADDRESS),),
    )
    async with running_server(nursery, settings) as running:
        yield running


@pytest.fixture
async def proxy(service: Server, authority: trustme.CA, tmp_path: Path) -> AsyncIterator[Proxy]:
    require_program(NGINX, "`make nginx` installs Debian's nginx (as root)")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    certificate = issue(authority, prefix / "server.pem")
    upstream = int(service.url.rsplit(":", 1)[1])
    async with running_nginx(prefix, upstream=upstream, certificate=certificate) as running:
        yield running


@pytest.fixture
async def public(proxy: Proxy, client_context: ssl.SSLContext) -> AsyncIterator[httpx.AsyncClient]:
    """A browser's view: HTTPS and HTTP/2 to nginx."""
    async with httpx.AsyncClient(
        base_url=proxy.url, http2=True, verify=client_context, timeout=WAIT_S
    ) as client:
        yield client


@pytest.fixture
async def direct(service: Server) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the service itself from an address that is not the proxy's."""
    transport = httpx.AsyncHTTPTransport(local_address=OTHER_ADDRESS)
    async with httpx.AsyncClient(
        base_url=service.url, transport=transport, timeout=WAIT_S
    ) as client:
        yield client


async def test_events_arrive_through_nginx_as_they_happen(
    proxy: Proxy, public: httpx.AsyncClient, direct: httpx.AsyncClient
) -> None:
    token = await login(public, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(public, token)
    seen_running: list[int] = []

    with trio.fail_after(WAIT_S):
        async with public.stream(
            "GET", f"/api/generate/{job_id}/stream", headers=bearer(token)
        ) as response:
            assert (response.http_version, response.status_code) == ("HTTP/2", 200)
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    # Each event, the moment it arrives: the job behind nginx has not gone on.
                    job = await direct.get(f"/api/generate/{job_id}", headers=bearer(token))
                    if job.json()["status"] == "running":
                        seen_running.append(int(line.removeprefix("id: ")))

    # Images finish IMAGE_MS apart; with a buffering proxy they would all arrive at the end.
    assert seen_running[:4] == [1, 2, 3, 4], seen_running


async def test_image_urls_carry_the_public_scheme_and_host(
    proxy: Proxy, public: httpx.AsyncClient
) -> None:
    token = await login(public, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(public, token)

    job = await poll_until_finished(public, token, job_id)

    for result in job["results"]:
        assert result["url"].startswith(f"{proxy.url}/files/{job_id}-"), result
        with trio.fail_after(WAIT_S):
            image = await public.get(result["url"])
        assert (image.status_code, image.headers["content-type"]) == (200, "image/png")


async def test_websocket_upgrades_and_close_codes_pass_through(
    proxy: Proxy, public: httpx.AsyncClient, ws_context: ssl.SSLContext
) -> None:
    token = await login(public, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(public, token)
    base = "wss" + proxy.url.removeprefix("https") + "/api/generate/"
    closes = {}

    with trio.fail_after(WAIT_S):
        async with open_ws(f"{base}{job_id}?token={token}", ssl_context=ws_context) as ws:
            frames = []
            while (message := await receive(ws)) is not None:
                frames.append(message)
            assert ws.closed is not None
            closes["done"] = ws.closed.code
        for case, url in [
            ("forged", f"{base}{job_id}?token=forged"),
            ("unknown", f"{base}no-such-job?token={token}"),
        ]:
            async with open_ws(url, ssl_context=ws_context) as ws:
                assert await receive(ws) is None
                assert ws.closed is not None
                closes[case] = ws.closed.code

    assert len(frames) == 6
    assert f'"url": "{proxy.url}/files/' in str(frames[0])
    assert closes == {"done": WS_NORMAL, "forged": WS_POLICY_VIOLATION, "unknown": WS_NOT_FOUND}


async def test_forwarded_headers_from_anyone_else_change_nothing(
    service: Server, proxy: Proxy, public: httpx.AsyncClient, direct: httpx.AsyncClient
) -> None:
    token = await login(public, DEMO_EMAIL, DEMO_PASSWORD)
    job_id = await submit(public, token)
    await poll_until_finished(public, token, job_id)
    path = f"/api/generate/{job_id}"

    with trio.fail_after(WAIT_S):
        from_elsewhere = await direct.get(path, headers={**bearer(token), **SPOOFED})
        # nginx sets the forwarded scheme and host itself: a client of the proxy cannot either.
        through_proxy = await public.get(path, headers={**bearer(token), **SPOOFED})

    urls = [result["url"] for result in from_elsewhere.json()["results"]]
    assert all(url.startswith(f"{service.url}/files/") for url in urls), urls
    urls = [result["url"] for result in through_proxy.json()["results"]]
    assert all(url.startswith(f"{proxy.url}/files/") for url in urls), urls


async def test_the_proxy_serves_health_and_refuses_metrics(
    service: Server, proxy: Proxy, public: httpx.AsyncClient, direct: httpx.AsyncClient
) -> None:
    with trio.fail_after(WAIT_S):
        health = await public.get("/health")
        refused = await public.get("/metrics")
        scraped = await direct.get("/metrics")  # as Prometheus does, on the service's own port

    assert (health.status_code, health.json()["status"]) == (200, "ok")
    assert refused.status_code == 403
    assert (scraped.status_code, "imagegen_jobs" in scraped.text) == (200, True)
