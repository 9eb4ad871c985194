"""The HTTP contract (``docs/api.md``) as an OpenAPI 3.1 document, built in code.

The component schemas of the wire types are derived from the attrs classes of
:mod:`web.schemas` (``attrs.fields`` and their type hints) and the enums from
:mod:`actors.messages`, so they follow the code that writes the answers; the few answers built
as plain dicts (``/api/status``, ``/health``, errors) are written out here.
``tests/web/test_openapi.py`` keeps the rest true: every route of the app is here with its
methods and nothing else is, the document is valid OpenAPI 3.1, and real answers validate
against it with no undocumented member.

Not documented: ``GET /`` and ``GET /static/{name}`` (the web page, a client of this API, not
part of it), ``GET /docs`` and ``GET /docs/assets/{name}`` (the page that shows this document),
and the ``HEAD`` and ``OPTIONS`` methods Quart and quart-cors add to every route.
"""

from __future__ import annotations

import enum
import types
import typing
from datetime import datetime
from importlib.metadata import version
from typing import Any

import attrs

from actors.messages import ImageStatus, JobStatus, Transport
from web import schemas
from web.settings import Settings

OPENAPI_VERSION = "3.1.0"
DISTRIBUTION = "imagegen-trio"
#: Routes of the app that the document leaves out on purpose (see the module's docstring).
UNDOCUMENTED_ROUTES = frozenset({"/", "/static/<path:name>", "/docs", "/docs/assets/<name>"})

Schema = dict[str, Any]

_REF = "#/components/{kind}/{name}"
IMAGE_COUNTS = ("queued", "waiting_for_capacity", "in_flight", "completed_total", "failed_total")

# Wire types whose schemas are derived from their attrs class, in the document's order.
_WIRE_TYPES: tuple[type, ...] = (
    schemas.LoginRequest,
    schemas.CreateJobRequest,
    schemas.TokenView,
    schemas.CreatedView,
    schemas.JobView,
    schemas.ResultView,
    schemas.ProgressCounts,
    schemas.JobListView,
    schemas.JobSummaryView,
    schemas.MetricsView,
    schemas.ImageMetricsView,
    schemas.ProgressPayload,
    schemas.DonePayload,
)

_ENUM_NOTES: dict[type[enum.Enum], str] = {
    JobStatus: (
        "A job's status: `pending` (accepted, nothing started), `running`, then `completed` "
        "(every image finished, at least one succeeded), `failed` (every image failed) or "
        "`canceled`."
    ),
    ImageStatus: (
        "An image's status: `running` (waiting for capacity or in flight), then `completed`, "
        "`failed` or `canceled`."
    ),
    Transport: "How a subscriber follows a job's events.",
}

_CLASS_NOTES: dict[type, str] = {
    schemas.LoginRequest: "The credentials of `POST /api/auth/login`.",
    schemas.CreateJobRequest: "A new job. Unknown members are ignored.",
    schemas.TokenView: "A bearer token (an HS256 JWT with claims `sub`, `iat`, `exp`, `type`).",
    schemas.CreatedView: "A job just accepted (or, for a repeated `Idempotency-Key`, found).",
    schemas.JobView: "A job now: its status, one result per image in index order, and counts.",
    schemas.ResultView: "One image of a job.",
    schemas.ProgressCounts: "How many of the job's images are in each status.",
    schemas.JobListView: "A page of the caller's jobs, newest first.",
    schemas.JobSummaryView: "A job in a list: everything but the per-image results.",
    schemas.MetricsView: "Time to first image, total time, counts, and per-image timings.",
    schemas.ImageMetricsView: "Where one image spent its time.",
    schemas.ProgressPayload: "The `data` of an SSE `progress` event: an image finished.",
    schemas.DonePayload: "The `data` of an SSE `done` event: the job finished (always last).",
}

# Member descriptions and constraints, by class and attribute; a name here that is not an
# attribute of its class is an error when the document is built, so none can go stale.
_FIELD_NOTES: dict[type, dict[str, Schema]] = {
    schemas.CreateJobRequest: {
        "prompt": {
            "description": (
                f"Trimmed; {schemas.PROMPT_MIN} to {schemas.PROMPT_MAX} characters after "
                "trimming, valid Unicode without NUL."
            ),
            "minLength": schemas.PROMPT_MIN,
        },
        "num_images": {"description": "How many images (a boolean is not an integer)."},
    },
    schemas.TokenView: {
        "token_type": {"const": "bearer"},
        "expires_in": {"description": "Seconds until the token expires."},
    },
    schemas.CreatedView: {
        "created": {"description": "False when an earlier request with the same key made it."},
    },
    schemas.JobView: {
        "id": {"description": "The same as `job_id`."},
        "ttfi_ms": {"description": "Milliseconds from acceptance to the first completed image."},
        "total_ms": {"description": "Milliseconds from acceptance to the job's end."},
        "results": {"description": "Exactly `num_images` entries, in index order."},
    },
    schemas.ResultView: {
        "url": {"description": "An absolute URL a browser can load, once `completed`."},
        "error": {"description": "Why the image failed, once `failed`."},
        "attempts": {"description": "Provider attempts so far (retries included)."},
    },
    schemas.JobListView: {
        "next_cursor": {"description": "The `cursor` of the next page; null on the last page."},
    },
    schemas.MetricsView: {
        "ttfi_ms": {"description": "Null until an image has completed."},
        "total_ms": {"description": "Null while the job runs."},
        "retries": {"description": "Attempts after each image's first."},
        "wait_ms": {"description": "Time the images waited for capacity, summed."},
    },
    schemas.ImageMetricsView: {
        "wait_ms": {"description": "Time spent waiting for capacity."},
        "provider_ms": {"description": "Time spent at the provider."},
    },
}


# --- schemas derived from the code -------------------------------------------------------------


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": _REF.format(kind=kind, name=name)}


class _Deriver:
    """JSON Schemas of attrs classes and enums, collected as named components."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def of_class(self, cls: type) -> Schema:
        """A ``$ref`` to ``cls``'s component, made on first use."""
        name = cls.__name__
        if name not in self.components:
            self.components[name] = {}  # reserved first: a class may refer back to itself
            self.components[name] = self._object(cls)
        return _ref("schemas", name)

    def of_enum(self, cls: type[enum.Enum]) -> Schema:
        values = [member.value for member in cls]
        if not all(isinstance(value, str) for value in values):
            raise TypeError(f"{cls.__name__}: only enums of strings have a schema")
        self.components.setdefault(
            cls.__name__, {"type": "string", "enum": values, "description": _ENUM_NOTES[cls]}
        )
        return _ref("schemas", cls.__name__)

    def of_type(self, hint: object) -> Schema:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (types.UnionType, typing.Union):
            present = [arg for arg in args if arg is not type(None)]
            if len(args) != 2 or len(present) != 1:
                raise TypeError(f"only `X | None` unions have a schema: {hint!r}")
            inner = self.of_type(present[0])
            if set(inner) == {"type"}:
                return {"type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": self.of_type(args[0])}
        if isinstance(hint, type):
            if issubclass(hint, enum.Enum):
                return self.of_enum(hint)
            if attrs.has(hint):
                return self.of_class(hint)
            for python, schema in _SCALARS:
                if hint is python:
                    return dict(schema)
        raise TypeError(f"no JSON Schema for {hint!r}")

    def _object(self, cls: type) -> Schema:
        hints = typing.get_type_hints(cls)
        notes = _FIELD_NOTES.get(cls, {})
        fields = attrs.fields(cls)
        unknown = set(notes) - {field.name for field in fields}
        if unknown:
            raise KeyError(f"{cls.__name__} has no attribute {sorted(unknown)}")
        properties = {
            field.name: self.of_type(hints[field.name]) | notes.get(field.name, {})
            for field in fields
        }
        return {
            "type": "object",
            "description": _CLASS_NOTES[cls],
            "required": [field.name for field in fields if field.default is attrs.NOTHING],
            "properties": properties,
        }


# ``bool`` before ``int``: a bool is an int to Python, never to the API.
_SCALARS: tuple[tuple[type, Schema], ...] = (
    (bool, {"type": "boolean"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (str, {"type": "string"}),
    (datetime, {"type": "string", "format": "date-time"}),
)


# --- schemas of answers built as plain dicts ---------------------------------------------------


def _counts(names: typing.Iterable[str], note: str) -> Schema:
    keys = list(names)
    return {
        "type": "object",
        "description": note,
        "required": keys,
        "properties": {key: {"type": "integer", "minimum": 0} for key in keys},
    }


def _handwritten() -> dict[str, Schema]:
    detail_item = {
        "type": "object",
        "description": "One problem, FastAPI-compatible.",
        "required": ["loc", "msg", "type"],
        "properties": {
            "loc": {
                "type": "array",
                "description": 'Where: `["body", "num_images"]`, `["query", "limit"]`, ...',
                "items": {"type": ["string", "integer"]},
            },
            "msg": {"type": "string"},
            "type": {"type": "string", "description": "A short machine-readable kind."},
        },
    }
    return {
        "Error": {
            "type": "object",
            "description": "Every non-2xx answer under `/api/` (and `/files/`).",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}},
        },
        "ValidationError": {
            "type": "object",
            "description": "A 422: one item per problem.",
            "required": ["detail"],
            "properties": {"detail": {"type": "array", "items": _ref("schemas", "DetailItem")}},
        },
        "DetailItem": detail_item,
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {
                "status": {"type": "string", "enum": ["ok", "degraded"]},
                "detail": {"type": "string", "description": "Why it is degraded."},
                "checks": {
                    "type": "object",
                    "description": "Each part the service needs, and its state.",
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "SupervisorStatus": {
            "type": "object",
            "description": "The supervisor's view of the service.",
            "required": [
                "uptime_s",
                "shutting_down",
                "jobs",
                "jobs_retained",
                "images",
                "capacity",
                "attempts_total",
                "retries_total",
                "jobs_crashed_total",
                "tasks_failed_total",
                "subscribers",
                "subscribers_refused",
                "provider",
                "store",
            ],
            "properties": {
                "uptime_s": {"type": "number", "minimum": 0},
                "shutting_down": {"type": "boolean"},
                "jobs": _counts((s.value for s in JobStatus), "Jobs retained, by status."),
                "jobs_retained": {"type": "integer", "minimum": 0},
                "images": _counts(
                    IMAGE_COUNTS,
                    "Unfinished images (queued), those waiting for capacity and in flight; "
                    "finished images since the start.",
                ),
                "capacity": _counts(
                    ("limit", "in_use", "waiting", "jobs_waiting"),
                    "The shared capacity: image attempts allowed in flight, in use, waiting, "
                    "and jobs with an attempt waiting.",
                ),
                "attempts_total": {"type": "integer", "minimum": 0},
                "retries_total": {"type": "integer", "minimum": 0},
                "jobs_crashed_total": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Jobs ended by a bug of their own since the start.",
                },
                "tasks_failed_total": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "Background loops (retention, a cluster node's, the shared "
                    "capacity's) that raised since the start; each was logged and started again.",
                },
                "subscribers": _counts(
                    (t.value for t in Transport), "Open event streams, by transport."
                ),
                "subscribers_refused": _counts(
                    (t.value for t in Transport),
                    "Event streams refused since the start: their user had as many open as "
                    "`MAX_STREAMS_PER_USER` allows.",
                ),
                "provider": {
                    "type": "object",
                    "description": "The image provider's name and its own counters.",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                },
                "store": {
                    "type": "object",
                    "description": (
                        "The job store's backend (sqlite, redis or memory) and its counters."
                    ),
                    "required": ["backend"],
                    "properties": {"backend": {"type": "string"}},
                    "additionalProperties": {"type": ["string", "number", "null"]},
                },
                "files": _counts(
                    (
                        "files",
                        "bytes",
                        "downloads",
                        "download_failures",
                        "skipped",
                        "copies_pending",
                        "copies_failed",
                    ),
                    "The image directory: files and bytes kept, provider outputs copied, copies "
                    "pending and failed for good.",
                ),
            },
        },
        "WebhookAccepted": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "accepted"}},
        },
        "ServerSentEvent": {
            "description": (
                "One event of the SSE stream, as a client's parser sees it (the `schema` of a "
                "`text/event-stream` describes each event, as OpenAPI 3.2's `itemSchema` does); "
                "`data` is JSON."
            ),
            "oneOf": [
                _event("progress", "ProgressPayload"),
                _event("done", "DonePayload"),
            ],
        },
        "WebSocketFrame": {
            "description": "A text frame of the WebSocket stream.",
            "oneOf": [
                _frame("progress", "ProgressPayload"),
                _frame("done", "DonePayload"),
            ],
        },
    }


def _event(kind: str, payload: str) -> Schema:
    return {
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"const": kind},
            "id": {"type": "string", "pattern": "^[1-9][0-9]*$"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _ref("schemas", payload),
            },
        },
    }


def _frame(kind: str, payload: str) -> Schema:
    return {
        "type": "object",
        "required": ["type", "id", "payload"],
        "properties": {
            "type": {"const": kind},
            "id": {"type": "integer", "minimum": 1},
            "payload": _ref("schemas", payload),
        },
    }


# --- responses, headers, parameters --------------------------------------------------------------


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _header(name: str) -> Schema:
    return _ref("headers", name)


def _components(settings: Settings) -> Schema:
    error = _ref("schemas", "Error")
    retry_after = {"Retry-After": _header("Retry-After")}

    def failure(description: str, **headers: Schema) -> Schema:
        return {"description": description, "headers": headers, "content": _json(error)}

    responses = {
        "Unauthorized": failure(
            "Missing, malformed, expired or forged token.",
            **{"WWW-Authenticate": _header("WWW-Authenticate")},
        ),
        "NotFound": failure(
            "Unknown job, or another user's (`Job not found`): existence is not leaked."
        ),
        "MethodNotAllowed": failure(
            "A method the path does not take (any path of this document).",
            Allow=_header("Allow"),
        ),
        "PayloadTooLarge": failure(
            f"The body is over the limit ({settings.max_body_bytes} bytes here)."
        ),
        "UnsupportedMediaType": failure("The body is not `application/json`."),
        "ValidationFailed": {
            "description": (
                "A body that is empty or not JSON (`json_invalid`, `missing`), or valid JSON "
                "(or a header or query) that fails validation."
            ),
            "headers": {},
            "content": _json(_ref("schemas", "ValidationError")),
        },
        "TooManyRequests": failure(
            "A limit was hit (failed logins, active jobs or open streams per user).",
            **retry_after,
        ),
        "ServiceUnavailable": failure("Overloaded or shutting down.", **retry_after),
    }
    headers = {
        "X-Request-ID": {
            "description": "The request's id: the client's own if it sent a sane one.",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        },
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with.",
            "required": True,
            "schema": {"type": "string", "const": "Bearer"},
        },
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        },
        "Allow": {
            "description": "The methods the path takes.",
            "required": True,
            "schema": {"type": "string"},
        },
    }
    for response in responses.values():
        response["headers"] = {"X-Request-ID": _header("X-Request-ID"), **response["headers"]}
    parameters = {
        "JobId": {
            "name": "job_id",
            "in": "path",
            "required": True,
            "description": "A job's id, as `POST /api/generate` answered it.",
            "schema": {"type": "string"},
        },
    }
    security_schemes = {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "`Authorization: Bearer <access_token>` from `POST /api/auth/login`.",
        },
        "queryToken": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "The same token as `?token=`, for clients that cannot set headers "
            "(a browser's EventSource or WebSocket). Never logged.",
        },
    }
    return {
        "responses": responses,
        "headers": headers,
        "parameters": parameters,
        "securitySchemes": security_schemes,
    }


def _ok(description: str, content: Schema | None = None, **headers: Schema) -> Schema:
    response: Schema = {
        "description": description,
        "headers": {"X-Request-ID": _header("X-Request-ID"), **headers},
    }
    if content is not None:
        response["content"] = content
    return response


def _errors(*names: str) -> dict[str, Schema]:
    status = {
        "Unauthorized": "401",
        "NotFound": "404",
        "PayloadTooLarge": "413",
        "UnsupportedMediaType": "415",
        "ValidationFailed": "422",
        "TooManyRequests": "429",
        "ServiceUnavailable": "503",
    }
    return {status[name]: _ref("responses", name) for name in names}


def _json_body(schema: Schema) -> Schema:
    return {"required": True, "content": _json(schema)}


# --- the document ----------------------------------------------------------------------------


_DESCRIPTION = """\
A real-time image-generation job backend: log in, ask for N images for a prompt, and watch them
arrive over Server-Sent Events, a WebSocket, or polling.

All bodies are JSON in UTF-8 unless said otherwise. Times are ISO 8601 in UTC with a `Z`;
durations are integer milliseconds. Every member a schema lists is always present (null where it
allows null), and answers may gain members: clients ignore the ones they do not know.

Errors: every non-2xx answer under `/api/` is JSON with a `detail` member, a string, or for a
422 a list of `{"loc", "msg", "type"}` items (FastAPI-compatible). A method a path does not take
answers `405` with `Allow` (`components/responses/MethodNotAllowed`). Bad input is never a 500
and never changes stored state.
"""


def build_document(settings: Settings) -> Schema:
    """The OpenAPI 3.1 document of the app configured by ``settings``."""
    derive = _Deriver()
    for cls in _WIRE_TYPES:
        derive.of_class(cls)
    derive.of_enum(Transport)
    component_schemas = derive.components | _handwritten()
    create = component_schemas["CreateJobRequest"]["properties"]
    create["num_images"] |= {"minimum": settings.min_images, "maximum": settings.max_images}

    bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    job_id = _ref("parameters", "JobId")
    job = _json(_ref("schemas", "JobView"))
    job_links = {
        name: {"operationId": name, "parameters": {"job_id": "$response.body#/job_id"}}
        for name in ("getJob", "cancelJob", "getJobMetrics", "streamJobEvents")
    }
    paths = {
        "/api/auth/login": {
            "post": {
                "operationId": "login",
                "tags": ["auth"],
                "summary": "Log in: email and password in, bearer token out",
                "description": (
                    "Wrong credentials answer 401 (without `WWW-Authenticate`); after "
                    "`LOGIN_MAX_FAILURES` failures per client and email within "
                    "`LOGIN_WINDOW_S`, 429 with `Retry-After`."
                ),
                "security": [],
                "requestBody": _json_body(_ref("schemas", "LoginRequest")),
                "responses": {
                    "200": _ok("A token.", _json(_ref("schemas", "TokenView"))),
                    "401": {
                        "description": "`Invalid email or password`.",
                        "headers": {"X-Request-ID": _header("X-Request-ID")},
                        "content": _json(_ref("schemas", "Error")),
                    },
                    **_errors(
                        "PayloadTooLarge",
                        "UnsupportedMediaType",
                        "ValidationFailed",
                        "TooManyRequests",
                    ),
                },
            }
        },
        "/api/generate": {
            "post": {
                "operationId": "createJob",
                "tags": ["jobs"],
                "summary": "Create a job",
                "description": (
                    "Answers at once; the images are made in the background. 429 when the "
                    "caller has too many unfinished jobs, 503 when the service is busy or "
                    "stopping."
                ),
                "security": bearer,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": (
                            "A retried request with the same key (and user) returns the same "
                            "job instead of a second one; the same key with another prompt or "
                            "count is a 422."
                        ),
                        "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
                    }
                ],
                "requestBody": _json_body(_ref("schemas", "CreateJobRequest")),
                "responses": {
                    "200": _ok(
                        "The job, accepted.",
                        _json(_ref("schemas", "CreatedView")),
                    )
                    | {"links": job_links},
                    **_errors(
                        "Unauthorized",
                        "PayloadTooLarge",
                        "UnsupportedMediaType",
                        "ValidationFailed",
                        "TooManyRequests",
                        "ServiceUnavailable",
                    ),
                },
            },
            "get": {
                "operationId": "listJobs",
                "tags": ["jobs"],
                "summary": "The caller's jobs, newest first",
                "security": bearer,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "allowEmptyValue": True,
                        "description": "Jobs per page; empty is the same as absent.",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "required": False,
                        "allowEmptyValue": True,
                        "description": (
                            "The `next_cursor` of the previous page; absent or empty for the first."
                        ),
                        "schema": {"type": "string", "maxLength": 18, "pattern": "^0*[1-9][0-9]*$"},
                    },
                ],
                "responses": {
                    "200": _ok("A page of jobs.", _json(_ref("schemas", "JobListView"))),
                    **_errors("Unauthorized", "ValidationFailed"),
                },
            },
        },
        "/api/generate/{job_id}": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJob",
                "tags": ["jobs"],
                "summary": "Poll a job (or, with an Upgrade, follow it over a WebSocket)",
                "description": _WEBSOCKET,
                "security": bearer,
                "responses": {
                    "101": {
                        "description": (
                            "`Upgrade: websocket`: the job's events as text frames "
                            "(`WebSocketFrame`); see the operation's description."
                        )
                    },
                    "200": _ok("The job now.", job),
                    **_errors("Unauthorized", "NotFound"),
                },
                "x-websocket": {
                    "query": {
                        "token": "The access token (or an `Authorization` header).",
                        "last_event_id": "Resume after this event id.",
                    },
                    "frames": _ref("schemas", "WebSocketFrame"),
                    "closeCodes": {
                        "1000": "The job is done (after the `done` frame).",
                        "1008": (
                            "Missing, invalid or expired token, or too many open streams "
                            "(the close reason says which)."
                        ),
                        "1009": "The client sent a message over 64 KiB.",
                        "1012": "The server is shutting down.",
                        "1013": "The job store cannot be read now; try again.",
                        "4404": "Unknown job, or another user's.",
                    },
                },
            },
            "delete": {
                "operationId": "cancelJob",
                "tags": ["jobs"],
                "summary": "Cancel a job",
                "description": (
                    "Images not finished end `canceled`, work in flight at the provider is "
                    "canceled there too, and subscribers get `done` with `status: canceled`. "
                    "Answers once the job has settled; canceling a finished job changes nothing."
                ),
                "security": bearer,
                "responses": {
                    "200": _ok("The job, settled.", job),
                    **_errors("Unauthorized", "NotFound"),
                },
            },
        },
        "/api/generate/{job_id}/metrics": {
            "parameters": [job_id],
            "get": {
                "operationId": "getJobMetrics",
                "tags": ["jobs"],
                "summary": "A job's timings and counts",
                "security": bearer,
                "responses": {
                    "200": _ok("The job's metrics.", _json(_ref("schemas", "MetricsView"))),
                    **_errors("Unauthorized", "NotFound"),
                },
            },
        },
        "/api/generate/{job_id}/stream": {
            "parameters": [job_id],
            "get": {
                "operationId": "streamJobEvents",
                "tags": ["streams"],
                "summary": "Follow a job over Server-Sent Events",
                "description": _SSE,
                "security": [*bearer, {"queryToken": []}],
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "description": (
                            "Resume after this event id (what a browser sends on reconnect); "
                            "wins over `last_event_id`. Anything but a non-negative integer "
                            "is treated as absent."
                        ),
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "required": False,
                        "description": "The same as `Last-Event-ID`, in the URL.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {
                    "200": _ok(
                        "The events, then the end of the response.",
                        {
                            "text/event-stream": {
                                "schema": _ref("schemas", "ServerSentEvent"),
                                "example": _SSE_EXAMPLE,
                            }
                        },
                        **{
                            "Cache-Control": {"schema": {"const": "no-cache"}},
                            "X-Accel-Buffering": {"schema": {"const": "no"}},
                        },
                    ),
                    "204": _ok("Resumed from the `done` event or later: nothing more to send."),
                    **_errors("Unauthorized", "NotFound", "TooManyRequests"),
                },
            },
        },
        "/api/status": {
            "get": {
                "operationId": "getStatus",
                "tags": ["operations"],
                "summary": "The supervisor's view",
                "security": bearer,
                "responses": {
                    "200": _ok(
                        "Uptime, jobs by status, images, capacity, retries, subscribers.",
                        _json(_ref("schemas", "SupervisorStatus")),
                    ),
                    **_errors("Unauthorized"),
                },
            },
        },
        "/health": {
            "get": {
                "operationId": "getHealth",
                "tags": ["operations"],
                "summary": "Liveness",
                "security": [],
                "responses": {
                    "200": _ok("`ok`.", _json(_ref("schemas", "Health"))),
                    "503": _ok(
                        "`degraded`: the service is shutting down, or the job store is unusable "
                        "(`checks.store` says why).",
                        _json(_ref("schemas", "Health")),
                        **{"Retry-After": _header("Retry-After")},
                    ),
                },
            },
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "tags": ["operations"],
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": _ok(
                        "The Prometheus text format, version 0.0.4.",
                        {"text/plain": {"schema": {"type": "string"}}},
                    ),
                },
            },
        },
        "/api/webhooks/replicate": {
            "post": {
                "operationId": "replicateWebhook",
                "tags": ["providers"],
                "summary": "Replicate tells the service a prediction finished",
                "description": (
                    "Signed with Standard Webhooks (`webhook-id`, `webhook-timestamp`, "
                    "`webhook-signature`); 404 unless Replicate webhooks are configured."
                ),
                "security": [],
                "parameters": [
                    {"name": name, "in": "header", "required": True, "schema": {"type": "string"}}
                    for name in ("webhook-id", "webhook-timestamp", "webhook-signature")
                ],
                "requestBody": _json_body(
                    {"type": "object", "description": "A Replicate prediction."}
                ),
                "responses": {
                    "200": _ok("Accepted.", _json(_ref("schemas", "WebhookAccepted"))),
                    "401": {
                        "description": "A bad or stale signature, or a malformed body.",
                        "headers": {"X-Request-ID": _header("X-Request-ID")},
                        "content": _json(_ref("schemas", "Error")),
                    },
                    "404": {
                        "description": "Webhooks are not configured.",
                        "headers": {"X-Request-ID": _header("X-Request-ID")},
                        "content": _json(_ref("schemas", "Error")),
                    },
                    **_errors("PayloadTooLarge"),
                },
            },
        },
        "/files/{name}": {
            "get": {
                "operationId": "getFile",
                "tags": ["files"],
                "summary": "An image the service stores itself",
                "security": [],
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": _ok(
                        "The image; it never changes under its name.",
                        {"image/*": {"schema": {"type": "string", "format": "binary"}}},
                        **{"Cache-Control": {"schema": {"type": "string"}}},
                    ),
                    "307": {
                        "description": "The copy of a provider's output is not made yet (or "
                        "failed for good): the provider's URL, not to be cached.",
                        "headers": {
                            "Location": {"schema": {"type": "string"}},
                            "Cache-Control": {"schema": {"type": "string"}},
                        },
                    },
                    "404": {
                        "description": "No such file.",
                        "headers": {"X-Request-ID": _header("X-Request-ID")},
                        "content": _json(_ref("schemas", "Error")),
                    },
                },
            },
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "tags": ["operations"],
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": _ok("OpenAPI 3.1.", _json({"type": "object"})),
                },
            },
        },
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "imagegen-trio",
            "version": version(DISTRIBUTION),
            "summary": "Image-generation jobs with live progress over SSE, WebSocket or polling.",
            "description": _DESCRIPTION,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [
            {"name": "auth", "description": "Log in."},
            {"name": "jobs", "description": "Create, poll, list, cancel, metrics."},
            {"name": "streams", "description": "Live events (the WebSocket: see getJob)."},
            {"name": "operations", "description": "Health, status, metrics, this document."},
            {"name": "providers", "description": "Callbacks from image providers."},
            {"name": "files", "description": "Images the service stores."},
        ],
        "paths": paths,
        "components": {"schemas": component_schemas, **_components(settings)},
    }


_WEBSOCKET = """\
The job now: status, per-image results, progress counts.

**WebSocket.** The same URL with `Upgrade: websocket` follows the job's events (OpenAPI cannot
model a WebSocket; `x-websocket` sums it up). The token goes in the query, `?token=<jwt>`
(browsers cannot set headers on a WebSocket), or in an `Authorization` header. Each event is a
text frame (`components/schemas/WebSocketFrame`):

    {"type": "progress", "id": 1, "payload": {"index": 2, "status": "completed", ...}}
    {"type": "done", "id": 6, "payload": {"status": "completed", "total_ms": 4210, ...}}

Replay and resume as for the SSE stream (resume with `?last_event_id=N`). After `done` the
server closes with 1000; a missing, invalid or expired token closes with 1008, and so does a
user's stream beyond `MAX_STREAMS_PER_USER` open at once (the close reason says which); an
unknown job (or another user's) with 4404; a server shutting down with 1012.
"""

_SSE = """\
`text/event-stream`: a `retry:` line, then one `progress` event per finished image
(`data`: `ProgressPayload`), then `done` (`data`: `DonePayload`), then the response ends. `id`
is the job's own event number, 1, 2, 3 ... A late subscriber first gets every event that
already happened; a finished job answers with all of them at once. While nothing happens, a
`: ping` comment is sent every `HEARTBEAT_S` seconds.

The token may also be given as `?token=` (a browser's EventSource cannot set headers). A user
may have `MAX_STREAMS_PER_USER` streams open at once (SSE and WebSocket together); one more
answers 429 with `Retry-After`.
"""

_SSE_EXAMPLE = """\
retry: 3000

id: 1
event: progress
data: {"index": 2, "status": "completed", "url": "https://...", "error": null, "attempts": 1, \
"started_at": "2026-01-01T00:00:00.000Z", "finished_at": "2026-01-01T00:00:00.812Z"}

id: 6
event: done
data: {"status": "completed", "total_ms": 4210, "ttfi_ms": 812, "completed_count": 5, \
"failed_count": 0}

"""
