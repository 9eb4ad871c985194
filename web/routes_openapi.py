"""``GET /openapi.json``: the HTTP contract as an OpenAPI 3.1 document (no auth)."""

from __future__ import annotations

from quart import Blueprint

from web.context import state
from web.openapi import build_document

blueprint = Blueprint("openapi", __name__)


@blueprint.get("/openapi.json")
async def openapi_document() -> dict[str, object]:
    """The document, with this server's settings (image bounds, body limit) filled in."""
    return build_document(state().settings)
