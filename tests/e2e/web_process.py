"""``python -m web`` started as a user starts it, for end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from tests.e2e.ports import free_port

ROOT = Path(__file__).parents[2]


@asynccontextmanager
async def web_process(
    workdir: Path, environ: Mapping[str, str], *, stderr: int = subprocess.DEVNULL
) -> AsyncIterator[tuple[trio.Process, str]]:
    """The service on a free port with ``environ`` on top of ours; the process and its base URL.

    Yields once ``/health`` answers 200; kills the process on exit if it is still running.
    """
    port = free_port()
    env = {
        **os.environ,
        "PORT": str(port),
        "IMAGES_DIR": str(workdir / "images"),
        "LOG_LEVEL": "WARNING",
        **environ,
        "PYTHONPATH": str(ROOT),
    }
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "web"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            with trio.fail_after(20):
                while True:
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await trio.sleep(0.05)  # the process is still starting
        yield process, base
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await process.wait()


async def web_process_to_its_end(
    workdir: Path, env: Mapping[str, str], *, timeout_s: float = 20
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m web`` in ``workdir`` with ``env`` (whole) until it exits by itself (a
    service that cannot start); its output captured."""
    with trio.fail_after(timeout_s):
        return await trio.run_process(
            [sys.executable, "-m", "web"],
            cwd=workdir,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
