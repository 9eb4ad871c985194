"""``python -m web`` as a user runs it: a real process, real signals, real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.e2e.service_clients import poll_until
from tests.e2e.web_process import ROOT, web_process, web_process_to_its_end

GRACEFUL_TIMEOUT_S = 30
CREDENTIALS = {"email": "test@example.com", "password": "password123"}


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    environ = {
        "LOCAL_LATENCY_MS": "20000",
        "AUTH_SECRET": "process-test-secret-0123456789-0123456789",
        # Long, so that "did not wait for it" is a behaviour with a wide margin, not a timing.
        "GRACEFUL_TIMEOUT_S": str(GRACEFUL_TIMEOUT_S),
        # No grace for the 20 s job: the stream must end at once (tests/e2e/test_durability.py
        # covers the grace period).
        "SHUTDOWN_GRACE_S": "0",
    }
    async with web_process(tmp_path, environ, stderr=subprocess.PIPE) as started:
        yield started


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_ends_open_streams_and_exits_cleanly(
    server: tuple[trio.Process, str], signum: signal.Signals
) -> None:
    process, base = server
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        login = await client.post("/api/auth/login", json=CREDENTIALS)
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        created = await client.post(
            "/api/generate", json={"prompt": "slow mountains", "num_images": 5}, headers=headers
        )
        job_id = created.json()["job_id"]
        lines: list[str] = []
        t0 = trio.current_time()
        with trio.fail_after(10):
            async with client.stream(
                "GET", f"/api/generate/{job_id}/stream", headers=headers
            ) as stream:
                async for line in stream.aiter_lines():
                    lines.append(line)
                    if line.startswith("retry:"):
                        process.send_signal(signum)
                        t0 = trio.current_time()
            stream_ended_after = trio.current_time() - t0
            assert await process.wait() == 0
            exited_after = trio.current_time() - t0
    assert lines[0] == "retry: 3000"
    # Neither waited for hypercorn's graceful timeout: the stream ended itself, and the client's
    # idle keep-alive connection was closed at once (web/hypercorn_fixes.py).
    assert stream_ended_after < GRACEFUL_TIMEOUT_S / 2
    assert exited_after < GRACEFUL_TIMEOUT_S / 2
    assert process.stderr is not None
    stderr = (await process.stderr.receive_some(1 << 16)).decode()
    assert "Traceback" not in stderr


async def test_a_second_signal_cuts_the_grace_period_short(tmp_path: Path) -> None:
    environ = {
        "LOCAL_LATENCY_MS": "20000",
        "AUTH_SECRET": "process-test-secret-0123456789-0123456789",
        "GRACEFUL_TIMEOUT_S": str(GRACEFUL_TIMEOUT_S),
        "SHUTDOWN_GRACE_S": "60",  # the 20 s job would be waited for
        "LOG_LEVEL": "INFO",
    }
    async with (
        web_process(tmp_path, environ, stderr=subprocess.PIPE) as (process, base),
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        login = await client.post("/api/auth/login", json=CREDENTIALS)
        headers = {"Authorization": f"Bearer {login.json()['access_token']}"}
        created = await client.post(
            "/api/generate", json={"prompt": "slow rivers", "num_images": 5}, headers=headers
        )
        job_id = created.json()["job_id"]
        with trio.fail_after(10):
            async with client.stream(
                "GET", f"/api/generate/{job_id}/stream", headers=headers
            ) as stream:
                lines = stream.aiter_lines()
                assert await anext(lines) == "retry: 3000"
                process.send_signal(signal.SIGTERM)
                # Draining: no new jobs, /health says so, and this stream goes on meanwhile.
                await poll_until(client, "/health", 503)  # the signal arrives asynchronously
                refused = await client.post(
                    "/api/generate", json={"prompt": "late", "num_images": 5}, headers=headers
                )
                t0 = trio.current_time()
                process.send_signal(signal.SIGTERM)
                rest = [line async for line in lines]
            assert await process.wait() == 0
            exited_after = trio.current_time() - t0

    assert refused.status_code == 503
    assert all(not line.startswith("event:") for line in rest), rest
    assert exited_after < GRACEFUL_TIMEOUT_S / 2
    assert process.stderr is not None
    stderr = (await process.stderr.receive_some(1 << 16)).decode()
    assert "Traceback" not in stderr
    assert "again: not waiting for running jobs" in stderr


async def test_a_port_in_use_stops_the_service_with_a_one_line_error_and_exit_code_1(
    tmp_path: Path,
) -> None:
    taken = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = taken[0].socket.getsockname()[1]
    env = {
        **os.environ,
        "STORE": "memory",
        "AUTH_SECRET": "process-test-secret-0123456789-0123456789",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "IMAGES_DIR": str(tmp_path / "images"),
        "LOG_LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
    }
    try:
        result = await web_process_to_its_end(tmp_path, env)
    finally:
        for listener in taken:
            await listener.aclose()
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr  # not 2: a restart may find the port free
    assert stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), stderr
    assert "Address already in use" in stderr
    assert stderr.count("\n") == 1  # one line, no traceback
