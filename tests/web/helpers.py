"""Helpers for route tests: credentials, requests, and reading SSE."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import trio
from argon2 import PasswordHasher
from quart_trio.testing import TrioClient

SECRET = "test-secret-long-enough-for-hs256-and-hs512-0123456789abcdefghijklmnopq"
# Real argon2, cheap parameters: the suite logs in hundreds of times.
HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
OTHER_EMAIL = "other@example.com"
OTHER_PASSWORD = "other-password"


async def login(client: TrioClient, email: str, password: str) -> str:
    response = await client.post("/api/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, await response.get_data()
    body = await response.get_json()
    token = body["access_token"]
    assert isinstance(token, str)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_job(
    client: TrioClient, token: str, *, prompt: str = "a red fox in snow", num_images: int = 5
) -> str:
    response = await client.post(
        "/api/generate", json={"prompt": prompt, "num_images": num_images}, headers=bearer(token)
    )
    assert response.status_code == 200, await response.get_data()
    job_id = (await response.get_json())["job_id"]
    assert isinstance(job_id, str)
    return job_id


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """Split an SSE byte stream into frames: ``{"id", "event", "data", "retry", "comment"}``."""
    frames: list[dict[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        frame: dict[str, Any] = {}
        for line in block.split("\n"):
            field, _, value = line.partition(": ") if ": " in line else line.partition(":")
            if field == "":
                frame["comment"] = value
            elif field == "data":
                frame["data"] = json.loads(value)
            elif field in ("id", "retry"):
                frame[field] = int(value)
            else:
                frame[field] = value
        frames.append(frame)
    return frames


async def read_sse(
    client: TrioClient, path: str, *, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], list[dict[str, Any]]]:
    """Read a whole (finite) SSE response: status, headers, frames."""
    async with client.request(path, headers=headers) as connection:
        await connection.send_complete()
        chunks = [chunk async for chunk in _chunks(connection)]
    response_headers = dict(getattr(connection, "headers", None) or {})
    status = getattr(connection, "status_code", None) or 0
    return status, response_headers, parse_sse(b"".join(chunks))


async def _chunks(connection: object) -> AsyncIterator[bytes]:
    while True:
        try:
            chunk = await connection.receive()  # type: ignore[attr-defined]
        except trio.EndOfChannel:
            return
        yield chunk
