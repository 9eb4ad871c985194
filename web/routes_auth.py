"""``POST /api/auth/login``: email and password in, bearer token out."""

from __future__ import annotations

from quart import Blueprint, request

from web.body import read_json_body
from web.context import state
from web.errors import APIError
from web.schemas import LoginRequest, TokenView, dump, structure_request

blueprint = Blueprint("auth", __name__)


@blueprint.post("/api/auth/login")
async def login() -> dict[str, object]:
    """Check the credentials; answer a JWT, 401, or 429 after too many failures."""
    app_state = state()
    auth = app_state.auth
    body = await read_json_body(app_state.settings.max_body_bytes)
    credentials = structure_request(body, LoginRequest)
    key = (request.remote_addr or "-", credentials.email.strip().lower())
    retry_after = await auth.throttle.retry_after_s(key)
    if retry_after is not None:
        raise APIError(
            429,
            "Too many failed logins; try again later",
            headers={"Retry-After": str(retry_after)},
        )
    user = await auth.check_password(credentials.email, credentials.password)
    if user is None:
        await auth.throttle.failed(key)
        raise APIError(401, "Invalid email or password")
    await auth.throttle.succeeded(key)
    return dump(
        TokenView(
            access_token=auth.issue(user),
            token_type="bearer",  # noqa: S106 (the scheme name)
            expires_in=auth.ttl_s,
        )
    )
