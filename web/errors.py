"""HTTP errors: every non-2xx answer is JSON with a ``detail`` member."""

from __future__ import annotations

import logging

from quart import Response, jsonify
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from actors.errors import (
    ActorError,
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    LimitsUnavailable,
    Overloaded,
    ShuttingDown,
    StoreUnavailable,
)
from web.schemas import RequestValidationError

logger = logging.getLogger(__name__)

BEARER = {"WWW-Authenticate": "Bearer"}


class APIError(Exception):
    """An answer other than 2xx, raised from a route.

    Args:
        status: The HTTP status.
        detail: What is wrong, for the client.
        headers: Extra headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(
        self, status: int, detail: object, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def unauthorized(detail: str) -> APIError:
    return APIError(401, detail, headers=BEARER)


def error_response(status: int, detail: object, headers: dict[str, str] | None = None) -> Response:
    response = jsonify({"detail": detail})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def _from_actor_error(exc: ActorError) -> APIError:
    if isinstance(exc, JobNotFound):
        return APIError(404, "Job not found")
    if isinstance(exc, LimitExceeded):
        return APIError(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, Overloaded):
        return APIError(503, str(exc), headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, StoreUnavailable | LimitsUnavailable | ShuttingDown):
        detail = str(exc)
        if isinstance(exc, StoreUnavailable):
            detail = "The service cannot store jobs right now; try again shortly"
        elif isinstance(exc, LimitsUnavailable):
            detail = "The service cannot check its limits right now; try again shortly"
        return APIError(503, detail, headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, IdempotencyConflict):
        item = {
            "loc": ["header", "Idempotency-Key"],
            "msg": str(exc),
            "type": "idempotency_key_reused",
        }
        return APIError(422, [item])
    return APIError(500, "Internal server error")


def register_error_handlers(app: QuartTrio) -> None:
    """Map every error a route can raise to a JSON answer (never a bare 500 page)."""

    @app.errorhandler(APIError)
    async def _api_error(exc: APIError) -> Response:
        return error_response(exc.status, exc.detail, exc.headers)

    @app.errorhandler(ActorError)
    async def _actor_error(exc: ActorError) -> Response:
        return await _api_error(_from_actor_error(exc))

    @app.errorhandler(RequestValidationError)
    async def _validation_error(exc: RequestValidationError) -> Response:
        return error_response(422, exc.errors)

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = dict(exc.get_headers())
        headers.pop("Content-Type", None)
        # werkzeug's stock descriptions are prose for HTML pages; its names are the short form.
        custom = exc.description and exc.description != type(exc).description
        return error_response(status, exc.description if custom else exc.name, headers)

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        logger.error("unhandled error", exc_info=exc)
        return error_response(500, "Internal server error")
