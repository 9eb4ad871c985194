"""The Quart-Trio application factory."""

from __future__ import annotations

import re
from pathlib import Path

import trio
from quart import Response, send_from_directory
from quart_cors import cors
from quart_trio import QuartTrio

from actors.files import image_type
from actors.supervisor import Supervisor
from web import (
    observability,
    routes_auth,
    routes_docs,
    routes_health,
    routes_jobs,
    routes_openapi,
    routes_stream,
    routes_webhooks,
)
from web.auth import Authenticator
from web.context import EXTENSION, AppState
from web.errors import APIError, register_error_handlers
from web.routes_webhooks import WEBHOOK_MAX_BYTES
from web.settings import Settings

# Stored images never change under their name, so browsers and proxies may keep them.
FILE_CACHE_CONTROL = "public, max-age=31536000, immutable"
# What a stored image's name may look like (``{job_id}-{index}.{ext}``, actors/files.py); anything
# else is not a file of ours, whatever the disk would make of it (too long, traversal, ...).
FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
# The web page (web/static/): the page is revalidated on every load, its assets after a while.
STATIC_DIR = Path(__file__).parent / "static"
PAGE_CACHE_CONTROL = "no-cache"
ASSET_MAX_AGE_S = 300
PAGE_CSP = (
    "default-src 'self'; img-src 'self' http: https: data: blob:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def create_app(supervisor: Supervisor, settings: Settings, auth: Authenticator) -> QuartTrio:
    """A new app serving ``supervisor``'s jobs (one per server or test; no globals).

    Args:
        supervisor: The running supervisor (its lifetime is the caller's).
        settings: The service's settings.
        auth: Users and tokens.
    """
    app = QuartTrio(__name__, static_folder=None)  # /static/ is served below, with its headers
    # A path with "//" (or an encoded "/") is not ours: 404, never a redirect to a merged path.
    app.url_map.merge_slashes = False
    # The largest body any route takes; each route enforces its own (web/body.py).
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, WEBHOOK_MAX_BYTES)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = AppState(supervisor=supervisor, settings=settings, auth=auth)
    register_error_handlers(app)
    observability.install(app, observability.Metrics(supervisor))
    for module in (routes_auth, routes_jobs, routes_stream, routes_health, routes_webhooks):
        app.register_blueprint(module.blueprint)
    app.register_blueprint(routes_openapi.blueprint)
    app.register_blueprint(routes_docs.blueprint)
    images_dir = Path(settings.local.images_dir).resolve()

    @app.get("/files/<path:name>")
    async def files(name: str) -> Response:
        """Images the service stores itself; while a copy is pending (or failed for good), a
        redirect to the provider's URL."""
        if FILE_NAME.fullmatch(name) is None or ".." in name:
            raise APIError(404, "File not found")
        copy = await supervisor.locate_copy(name)
        if copy is not None:
            # Not cached: the copy will replace the redirect (unless it failed for good).
            return Response("", 307, {"Location": copy.source, "Cache-Control": "no-store"})
        # The bytes' own type: a copy's name was given before its bytes were seen.
        mimetype = await trio.to_thread.run_sync(image_type, images_dir / name)
        response = await send_from_directory(images_dir, name, mimetype=mimetype)
        response.headers["Cache-Control"] = FILE_CACHE_CONTROL
        return response

    @app.get("/")
    async def page() -> Response:
        """The web page, the API's first client."""
        response = await send_from_directory(STATIC_DIR, "index.html", cache_timeout=0)
        response.headers["Cache-Control"] = PAGE_CACHE_CONTROL
        response.headers["Content-Security-Policy"] = PAGE_CSP
        return response

    @app.get("/static/<path:name>")
    async def static(name: str) -> Response:
        """The page's scripts and styles."""
        return await send_from_directory(STATIC_DIR, name, cache_timeout=ASSET_MAX_AGE_S)

    return cors(
        app,
        allow_origin=list(settings.allowed_origins),
        allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        expose_headers=["Retry-After", "WWW-Authenticate"],
        max_age=600,
    )
