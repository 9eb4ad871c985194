"""Text forms of stored values, shared by the backends that keep text (SQLite, Redis).

Datetimes are ISO 8601 with their offset and microseconds; events and images are compact JSON
with non-ASCII escaped, so any text (lone surrogates from a provider included) round-trips.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from actors.messages import (
    DoneEvent,
    ImageSnapshot,
    ImageStatus,
    JobEvent,
    JobStatus,
    ProgressEvent,
)


def time_text(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def parse_time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def safe_text(value: str | None) -> str | None:
    """``value`` as UTF-8 can carry it: text from a provider may hold lone surrogates."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _json(body: dict[str, object]) -> str:
    return json.dumps(body, separators=(",", ":"))


def encode_event(event: JobEvent) -> str:
    """An event as JSON (its id is kept beside it, not in it)."""
    if isinstance(event, ProgressEvent):
        return _json(
            {
                "type": "progress",
                "index": event.index,
                "status": event.status.value,
                "url": event.url,
                "error": event.error,
                "attempts": event.attempts,
                "started_at": time_text(event.started_at),
                "finished_at": time_text(event.finished_at),
            }
        )
    return _json(
        {
            "type": "done",
            "status": event.status.value,
            "total_ms": event.total_ms,
            "ttfi_ms": event.ttfi_ms,
            "completed_count": event.completed_count,
            "failed_count": event.failed_count,
        }
    )


def decode_event(event_id: int, text: str) -> JobEvent:
    body: dict[str, Any] = json.loads(text)
    if body["type"] == "progress":
        finished_at = parse_time(body["finished_at"])
        assert finished_at is not None
        return ProgressEvent(
            id=event_id,
            index=body["index"],
            status=ImageStatus(body["status"]),
            url=body["url"],
            error=body["error"],
            attempts=body["attempts"],
            started_at=parse_time(body["started_at"]),
            finished_at=finished_at,
        )
    return DoneEvent(
        id=event_id,
        status=JobStatus(body["status"]),
        total_ms=body["total_ms"],
        ttfi_ms=body["ttfi_ms"],
        completed_count=body["completed_count"],
        failed_count=body["failed_count"],
    )


def encode_image(image: ImageSnapshot) -> str:
    """An image as JSON (its id is derived from the job's and its index on reading)."""
    return _json(
        {
            "index": image.index,
            "status": image.status.value,
            "url": image.url,
            "error": image.error,
            "attempts": image.attempts,
            "started_at": time_text(image.started_at),
            "finished_at": time_text(image.finished_at),
            "wait_ms": image.wait_ms,
            "provider_ms": image.provider_ms,
        }
    )


def decode_image(job_id: str, text: str) -> ImageSnapshot:
    body: dict[str, Any] = json.loads(text)
    return ImageSnapshot(
        id=f"{job_id}-{body['index']}",
        index=body["index"],
        status=ImageStatus(body["status"]),
        url=body["url"],
        error=body["error"],
        attempts=body["attempts"],
        started_at=parse_time(body["started_at"]),
        finished_at=parse_time(body["finished_at"]),
        wait_ms=body["wait_ms"],
        provider_ms=body["provider_ms"],
    )
