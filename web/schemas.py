"""Wire types shaped exactly like docs/api.md, and the one cattrs converter that reads them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.preconf.json import make_converter

from actors.messages import (
    DoneEvent,
    ImageSnapshot,
    ImageStatus,
    JobSnapshot,
    JobStatus,
    ProgressEvent,
)

T = TypeVar("T")

PROMPT_MIN = 3
PROMPT_MAX = 1000

converter = make_converter(forbid_extra_keys=False)


def _strict_int(value: object, _: type) -> int:
    if type(value) is not int:
        raise TypeError("Input should be a valid integer")
    return value


def _strict_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError("Input should be a valid string")
    return value


def _utc(value: datetime) -> str:
    return (
        value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    )


converter.register_structure_hook(int, _strict_int)
converter.register_structure_hook(str, _strict_str)
converter.register_unstructure_hook(datetime, _utc)


# --- requests ----------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class LoginRequest:
    email: str
    password: str


@attrs.frozen(kw_only=True)
class CreateJobRequest:
    prompt: str
    num_images: int


class RequestValidationError(Exception):
    """The body is valid JSON but not a valid request; ``errors`` are FastAPI-shaped items."""

    def __init__(self, errors: list[dict[str, object]]) -> None:
        super().__init__(errors)
        self.errors = errors


def _problem(loc: list[str | int], msg: str, kind: str) -> dict[str, object]:
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


def _flatten(exc: BaseException, path: list[str | int]) -> list[dict[str, object]]:
    if isinstance(exc, ClassValidationError | IterableValidationError):
        problems: list[dict[str, object]] = []
        for inner in exc.exceptions:
            notes = getattr(inner, "__notes__", [])
            step: list[str | int] = []
            for note in notes:
                name = getattr(note, "name", None) or getattr(note, "index", None)
                if name is not None:
                    step = [name]
            problems.extend(_flatten(inner, path + step))
        return problems
    if isinstance(exc, KeyError):
        return [_problem(path, "Field required", "missing")]
    if isinstance(exc, ForbiddenExtraKeysError):
        return [_problem(path, str(exc), "extra_forbidden")]
    kind = (
        "int_type"
        if "integer" in str(exc)
        else "string_type"
        if "string" in str(exc)
        else "value_error"
    )
    return [_problem(path, str(exc) or "Invalid value", kind)]


def structure_request(body: object, cls: type[T]) -> T:
    """Structure a decoded JSON body into ``cls``, strictly.

    Raises:
        RequestValidationError: With one item per problem.
    """
    if not isinstance(body, dict):
        raise RequestValidationError(
            [_problem([], "Input should be a valid dictionary or object", "dict_type")]
        )
    try:
        return converter.structure(body, cls)
    except (ClassValidationError, IterableValidationError) as exc:
        raise RequestValidationError(_flatten(exc, [])) from None


def validate_create(body: object, *, min_images: int, max_images: int) -> CreateJobRequest:
    """The create request with its prompt trimmed, or every problem with it.

    Raises:
        RequestValidationError: With one item per problem.
    """
    request = structure_request(body, CreateJobRequest)
    prompt = request.prompt.strip()
    problems = []
    if not PROMPT_MIN <= len(prompt) <= PROMPT_MAX:
        problems.append(
            _problem(
                ["prompt"],
                f"String should have {PROMPT_MIN} to {PROMPT_MAX} characters after trimming",
                "string_too_short" if len(prompt) < PROMPT_MIN else "string_too_long",
            )
        )
    elif not _encodable(prompt):
        problems.append(
            _problem(
                ["prompt"], "String must be valid Unicode (no lone surrogates)", "string_unicode"
            )
        )
    if not min_images <= request.num_images <= max_images:
        problems.append(
            _problem(
                ["num_images"],
                f"Input should be between {min_images} and {max_images}",
                "less_than_equal" if request.num_images > max_images else "greater_than_equal",
            )
        )
    if problems:
        raise RequestValidationError(problems)
    return attrs.evolve(request, prompt=prompt)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


# --- responses ---------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TokenView:
    access_token: str
    token_type: str
    expires_in: int


@attrs.frozen(kw_only=True)
class CreatedView:
    job_id: str
    status: JobStatus
    created: bool
    created_at: datetime
    num_images: int


@attrs.frozen(kw_only=True)
class ResultView:
    id: str
    index: int
    status: ImageStatus
    url: str | None
    error: str | None
    attempts: int


@attrs.frozen(kw_only=True)
class ProgressCounts:
    completed: int
    failed: int
    running: int
    total: int
    canceled: int


@attrs.frozen(kw_only=True)
class JobView:
    job_id: str
    id: str
    prompt: str
    num_images: int
    status: JobStatus
    created_at: datetime
    ttfi_ms: int | None
    total_ms: int | None
    results: tuple[ResultView, ...]
    progress: ProgressCounts


@attrs.frozen(kw_only=True)
class JobSummaryView:
    job_id: str
    prompt: str
    num_images: int
    status: JobStatus
    created_at: datetime
    ttfi_ms: int | None
    total_ms: int | None
    progress: ProgressCounts


@attrs.frozen(kw_only=True)
class JobListView:
    results: tuple[JobSummaryView, ...]
    next_cursor: str | None


@attrs.frozen(kw_only=True)
class ImageMetricsView:
    index: int
    status: ImageStatus
    attempts: int
    wait_ms: int
    provider_ms: int


@attrs.frozen(kw_only=True)
class MetricsView:
    job_id: str
    status: JobStatus
    ttfi_ms: int | None
    total_ms: int | None
    completed_count: int
    failed_count: int
    total_count: int
    canceled_count: int
    attempts: int
    retries: int
    wait_ms: int
    images: tuple[ImageMetricsView, ...]


@attrs.frozen(kw_only=True)
class ProgressPayload:
    index: int
    status: ImageStatus
    url: str | None
    error: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime


@attrs.frozen(kw_only=True)
class DonePayload:
    status: JobStatus
    total_ms: int
    ttfi_ms: int | None
    completed_count: int
    failed_count: int


# --- mapping domain -> wire --------------------------------------------------------------------


class UrlMaker:
    """Turns a provider's URL into the absolute URL a browser can load."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def __call__(self, url: str | None) -> str | None:
        if url is None or "://" in url:
            return url
        return f"{self.base}/{url.lstrip('/')}"


def _progress(job: JobSnapshot) -> ProgressCounts:
    return ProgressCounts(
        completed=job.count(ImageStatus.COMPLETED),
        failed=job.count(ImageStatus.FAILED),
        running=job.count(ImageStatus.RUNNING),
        total=job.num_images,
        canceled=job.count(ImageStatus.CANCELED),
    )


def _result(image: ImageSnapshot, absolute: UrlMaker) -> ResultView:
    return ResultView(
        id=image.id,
        index=image.index,
        status=image.status,
        url=absolute(image.url),
        error=image.error,
        attempts=image.attempts,
    )


def job_view(job: JobSnapshot, absolute: UrlMaker) -> JobView:
    return JobView(
        job_id=job.job_id,
        id=job.job_id,
        prompt=job.prompt,
        num_images=job.num_images,
        status=job.status,
        created_at=job.created_at,
        ttfi_ms=job.ttfi_ms,
        total_ms=job.total_ms,
        results=tuple(_result(image, absolute) for image in job.images),
        progress=_progress(job),
    )


def summary_view(job: JobSnapshot) -> JobSummaryView:
    return JobSummaryView(
        job_id=job.job_id,
        prompt=job.prompt,
        num_images=job.num_images,
        status=job.status,
        created_at=job.created_at,
        ttfi_ms=job.ttfi_ms,
        total_ms=job.total_ms,
        progress=_progress(job),
    )


def created_view(job: JobSnapshot, *, created: bool) -> CreatedView:
    return CreatedView(
        job_id=job.job_id,
        status=job.status,
        created=created,
        created_at=job.created_at,
        num_images=job.num_images,
    )


def metrics_view(job: JobSnapshot) -> MetricsView:
    return MetricsView(
        job_id=job.job_id,
        status=job.status,
        ttfi_ms=job.ttfi_ms,
        total_ms=job.total_ms,
        completed_count=job.count(ImageStatus.COMPLETED),
        failed_count=job.count(ImageStatus.FAILED),
        total_count=job.num_images,
        canceled_count=job.count(ImageStatus.CANCELED),
        attempts=job.attempts,
        retries=sum(max(0, image.attempts - 1) for image in job.images),
        wait_ms=sum(image.wait_ms for image in job.images),
        images=tuple(
            ImageMetricsView(
                index=image.index,
                status=image.status,
                attempts=image.attempts,
                wait_ms=image.wait_ms,
                provider_ms=image.provider_ms,
            )
            for image in job.images
        ),
    )


def event_payload(event: ProgressEvent | DoneEvent, absolute: UrlMaker) -> dict[str, Any]:
    """The ``data`` (SSE) or ``payload`` (WebSocket) of an event."""
    if isinstance(event, ProgressEvent):
        payload: ProgressPayload | DonePayload = ProgressPayload(
            index=event.index,
            status=event.status,
            url=absolute(event.url),
            error=event.error,
            attempts=event.attempts,
            started_at=event.started_at,
            finished_at=event.finished_at,
        )
    else:
        payload = DonePayload(
            status=event.status,
            total_ms=event.total_ms,
            ttfi_ms=event.ttfi_ms,
            completed_count=event.completed_count,
            failed_count=event.failed_count,
        )
    return dump(payload)


def event_type(event: ProgressEvent | DoneEvent) -> str:
    return "progress" if isinstance(event, ProgressEvent) else "done"


def dump(value: object) -> dict[str, Any]:
    """Unstructure a wire type into JSON-ready data."""
    data = converter.unstructure(value)
    assert isinstance(data, dict)
    return data
