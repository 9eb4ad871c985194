"""Reading a JSON request body: content type, size cap, and decoding that never raises a 500."""

from __future__ import annotations

import json

from quart import request
from werkzeug.exceptions import RequestEntityTooLarge

from web.errors import APIError


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_body(max_bytes: int) -> object:
    """The request's body decoded as JSON, at most ``max_bytes`` of it.

    Raises:
        APIError: 415 for another content type, 413 over ``max_bytes``, 400 for an empty or
            malformed body (including ``NaN``, ``Infinity``, numbers too long to convert and
            nesting too deep to decode).
    """
    mimetype = request.mimetype
    if mimetype != "application/json" and not mimetype.endswith("+json"):
        raise APIError(415, "Content-Type must be application/json")
    if request.content_length is not None and request.content_length > max_bytes:
        raise APIError(413, f"Request body is larger than {max_bytes} bytes")
    too_large = APIError(413, f"Request body is larger than {max_bytes} bytes")
    try:
        raw = await request.get_data(as_text=False)
    except RequestEntityTooLarge:
        raise too_large from None
    if len(raw) > max_bytes:  # a chunked body has no Content-Length to check up front
        raise too_large
    if not raw.strip():
        raise APIError(400, "Request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise APIError(400, "Request body is not valid UTF-8") from None
    except RecursionError:
        raise APIError(400, "Request body is nested too deeply") from None
    except ValueError as exc:
        raise APIError(400, f"Request body is not valid JSON: {exc}") from None
