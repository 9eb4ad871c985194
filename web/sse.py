"""Server-Sent Events framing (https://html.spec.whatwg.org/multipage/server-sent-events.html)."""

from __future__ import annotations

import json


def encode_event(event_id: int, event: str, data: object) -> bytes:
    """One event: ``id``, ``event`` and a single-line JSON ``data`` field."""
    payload = json.dumps(data)  # ASCII-only and single-line, so no field can be split
    return f"id: {event_id}\nevent: {event}\ndata: {payload}\n\n".encode()


def encode_comment(text: str) -> bytes:
    """A comment line; clients ignore it, proxies see bytes (the heartbeat)."""
    return f": {text}\n\n".encode()


def encode_retry(retry_ms: int) -> bytes:
    """How long a browser waits before reconnecting."""
    return f"retry: {retry_ms}\n\n".encode()


#: Beyond any event id: what a resume cursor of more digits than this has stands for (after
#: every event), without converting a number of any length.
BEYOND_ANY_EVENT = 10**18


def parse_last_event_id(value: str | None) -> int:
    """A resume cursor: a non-negative integer, else 0 (a full replay, never an error)."""
    if value is None:
        return 0
    text = value.strip()
    if not text.isascii() or not text.isdigit():
        return 0
    if len(text) > 18:
        return BEYOND_ANY_EVENT
    return int(text)
