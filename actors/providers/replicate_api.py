"""Replicate's HTTP API as this provider speaks it: one call, its errors, its answers."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from actors.errors import PermanentProviderError

TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})


class Answer(Exception):
    """A non-2xx answer from Replicate: its status, its detail and its retry hint."""

    def __init__(self, status: int, detail: str, retry_after_s: float | None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retry_after_s = retry_after_s


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    json_body: object = None,
    headers: Mapping[str, str] | None = None,
    request_timeout_s: float,
    read_timeout_s: float | None = None,
) -> Mapping[str, Any]:
    """One call to the API: its JSON object, or :class:`Answer` for anything else."""
    request = client.build_request(
        method,
        path,
        json=json_body,
        headers=headers,
        timeout=httpx.Timeout(
            request_timeout_s,
            read=read_timeout_s or request_timeout_s,
        ),
    )
    response = await client.send(request)
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.is_success and isinstance(data, dict):
        return data
    detail = data.get("detail") if isinstance(data, dict) else None
    if response.is_success:
        raise Answer(502, "Replicate answered something that is not JSON", None)
    raise Answer(
        response.status_code,
        str(detail or response.reason_phrase or response.status_code),
        retry_after(response, data),
    )


def finished(prediction: Mapping[str, Any], *, sync_answer: bool) -> bool:
    status = prediction.get("status")
    if status in TERMINAL:
        return True
    # A ``Prefer: wait`` answer for a model with file outputs comes as soon as every file exists,
    # with ``output`` filled while ``status`` may still say ``processing`` (Replicate's docs on
    # the ``Prefer: wait`` header).
    return (
        sync_answer and status == "processing" and first_url(prediction.get("output")) is not None
    )


def first_url(output: object) -> str | None:
    if isinstance(output, str) and output:
        return output
    if isinstance(output, list) and output and isinstance(output[0], str) and output[0]:
        return output[0]
    return None


def permanent(answer: Answer) -> PermanentProviderError:
    messages = {
        401: "Replicate rejected the API token (401); check REPLICATE_API_TOKEN",
        402: "Replicate refused for billing reasons (402): add credit or a payment method",
        403: "Replicate refused access (403); check REPLICATE_API_TOKEN and the model",
        404: "Replicate does not know this model or prediction (404); check REPLICATE_MODEL",
    }
    message = messages.get(answer.status)
    if message is None:
        message = f"Replicate rejected the request ({answer.status}): {answer.detail}"
    return PermanentProviderError(message)


def retry_after(response: httpx.Response, data: object) -> float | None:
    header = response.headers.get("Retry-After", "").strip()
    if header.isdigit():
        return float(header)
    if isinstance(data, dict):
        body_hint = data.get("retry_after")
        if (
            isinstance(body_hint, int | float)
            and not isinstance(body_hint, bool)
            and body_hint >= 0
        ):
            return float(body_hint)
    return None


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
