"""The access log line: the same as Hypercorn's own atoms would print, for less work."""

from __future__ import annotations

from typing import Any

import pytest
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms

from web.logs import ACCESS_LOG_FORMAT, AccessLogger


def scope(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/generate",
        "query_string": b"token=secret",
        "headers": [(b"host", b"x"), (b"user-agent", b"curl")],
        "client": ("127.0.0.1", 5123),
    }
    return base | overrides


@pytest.mark.parametrize(
    ("request_scope", "response"),
    [
        (scope(), {"status": 200, "headers": [(b"content-length", b"42")]}),
        (scope(), {"status": 204, "headers": []}),
        (scope(client=None), {"status": 404, "headers": [(b"Content-Length", b"7")]}),
        (scope(type="websocket", http_version="1.1"), None),
        (scope(http_version="2", method="GET"), {"status": 200, "headers": []}),
    ],
)
def test_the_line_is_hypercorns(request_scope: Any, response: Any) -> None:
    logger = AccessLogger(Config())
    ours = ACCESS_LOG_FORMAT % logger.atoms(request_scope, response, 0.001234)
    theirs = ACCESS_LOG_FORMAT % AccessLogAtoms(request_scope, response, 0.001234)
    assert ours == theirs
    assert "secret" not in ours
