"""What the routes share, stored on the app by ``create_app`` (no module globals)."""

from __future__ import annotations

import attrs
from quart import current_app, request

from actors.supervisor import Supervisor
from web.auth import Authenticator, authenticate
from web.schemas import UrlMaker
from web.settings import Settings

EXTENSION = "imagegen"


@attrs.frozen(kw_only=True)
class AppState:
    supervisor: Supervisor
    settings: Settings
    auth: Authenticator


def state() -> AppState:
    """The running app's :class:`AppState`."""
    app_state = current_app.extensions[EXTENSION]
    assert isinstance(app_state, AppState)
    return app_state


def url_maker(scheme: str, host: str) -> UrlMaker:
    """Makes provider URLs absolute: ``PUBLIC_BASE_URL``, else the request's own origin."""
    base = state().settings.public_base_url
    if base is None:
        web_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        base = f"{web_scheme}://{host}"
    return UrlMaker(base)


def current_user(*, allow_query_token: bool = False) -> str:
    """The user behind the current HTTP request.

    Raises:
        APIError: 401 with ``WWW-Authenticate: Bearer``.
    """
    query_token = request.args.get("token") if allow_query_token else None
    return authenticate(state().auth, request.headers.get("Authorization"), query_token)
