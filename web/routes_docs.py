"""``GET /docs``: the API reference as an interactive page (Swagger UI) on ``/openapi.json``.

Swagger UI's files come from the pinned ``swagger-ui-bundle-v2`` package and are served by the
service itself (``/docs/assets/``), never from a CDN: the page works offline and behind a strict
Content-Security-Policy. "Try it out" calls the API from the page, with the bearer token given
under "Authorize" (log in with ``POST /api/auth/login`` first, from the page itself).
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory
from swagger_ui_bundle import swagger_ui_path

from web.errors import APIError

blueprint = Blueprint("docs", __name__)

ASSETS_DIR = Path(str(swagger_ui_path))
#: The files the page loads; nothing else in the package is served.
ASSETS = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png"})
#: The assets change only with the pinned package's version.
ASSET_MAX_AGE_S = 86400
# Swagger UI's icons are data: images (a test in Chromium sees every refusal of this policy).
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)

PAGE = """\
<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>imagegen-trio API</title>
  <link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
  <link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/assets/swagger-ui-bundle.js"></script>
  <script src="/static/docs.js"></script>
</body>
</html>
"""


@blueprint.get("/docs")
async def docs_page() -> Response:
    """The interactive API reference."""
    return Response(
        PAGE,
        content_type="text/html; charset=utf-8",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": DOCS_CSP},
    )


@blueprint.get("/docs/assets/<name>")
async def docs_asset(name: str) -> Response:
    """Swagger UI's script, styles and icon, from the pinned package."""
    if name not in ASSETS:
        raise APIError(404, "File not found")
    return await send_from_directory(ASSETS_DIR, name, cache_timeout=ASSET_MAX_AGE_S)
