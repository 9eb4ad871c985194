"""Reading a JSON request body: content type, size cap, and decoding that never raises a 500."""

from __future__ import annotations

import json

from quart import request
from werkzeug.exceptions import RequestEntityTooLarge

from web.errors import APIError


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _not_json(msg: str, pos: int | None = None, kind: str = "json_invalid") -> APIError:
    """The contract's 422 for a body that is not JSON, as FastAPI answers it: one item whose
    ``loc`` is the body (and where decoding stopped)."""
    loc: list[str | int] = ["body"] if pos is None else ["body", pos]
    return APIError(422, [{"loc": loc, "msg": msg, "type": kind}])


async def read_json_body(max_bytes: int) -> object:
    """The request's body decoded as JSON, at most ``max_bytes`` of it.

    Raises:
        APIError: 415 for another content type, 413 over ``max_bytes``, 422 for an empty or
            malformed body (including ``NaN``, ``Infinity``, numbers too long to convert and
            nesting too deep to decode), as FastAPI answers it (the contract's "415 or 422").
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
        raise _not_json("Request body is empty; expected a JSON object", kind="missing")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise _not_json("Request body is not valid UTF-8", exc.start) from None
    except RecursionError:
        raise _not_json("Request body is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise _not_json(f"JSON decode error: {exc.msg}", exc.pos) from None
    except ValueError as exc:  # NaN, Infinity, a number too long to convert
        raise _not_json(f"Request body is not valid JSON: {exc}") from None
