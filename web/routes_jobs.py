"""Jobs: create, poll, cancel, list, metrics."""

from __future__ import annotations

from quart import Blueprint, request

from web.body import read_json_body
from web.context import current_user, state, url_maker
from web.errors import APIError
from web.schemas import (
    JobListView,
    created_view,
    dump,
    job_view,
    metrics_view,
    summary_view,
    validate_create,
)

blueprint = Blueprint("jobs", __name__)

# A DELETE answers once the job has settled: at once for the local provider, after the shielded
# remote cancels (bounded by PROVIDER_CANCEL_S) for a remote one; a second more is the margin.
CANCEL_SETTLE_MARGIN_S = 1.0
MAX_IDEMPOTENCY_KEY = 255
MAX_PAGE = 100


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isascii() or not key.isprintable():
        raise APIError(
            422,
            [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": f"Must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters",
                    "type": "value_error",
                }
            ],
        )
    return key


@blueprint.post("/api/generate")
async def create_job() -> tuple[dict[str, object], int]:
    """Accept a job; answers with its id once it is stored (the work runs in the supervisor)."""
    app_state = state()
    user = current_user()
    settings = app_state.settings
    body = await read_json_body(settings.max_body_bytes)
    create = validate_create(body, min_images=settings.min_images, max_images=settings.max_images)
    snapshot, created = await app_state.supervisor.submit(
        owner=user,
        prompt=create.prompt,
        num_images=create.num_images,
        idempotency_key=_idempotency_key(),
    )
    return dump(created_view(snapshot, created=created)), 200


@blueprint.get("/api/generate/<job_id>")
async def get_job(job_id: str) -> dict[str, object]:
    """The job now: status, per-image results, progress counts."""
    user = current_user()
    snapshot = await state().supervisor.find(job_id, owner=user)
    return dump(job_view(snapshot, url_maker(request.scheme, request.host)))


@blueprint.get("/api/generate/<job_id>/metrics")
async def get_metrics(job_id: str) -> dict[str, object]:
    """Time to first image, total time, counts, and where each image spent its time."""
    user = current_user()
    snapshot = await state().supervisor.find(job_id, owner=user)
    return dump(metrics_view(snapshot))


@blueprint.delete("/api/generate/<job_id>")
async def cancel_job(job_id: str) -> dict[str, object]:
    """Cancel the job and answer with its settled state (a finished job is left as it is)."""
    user = current_user()
    supervisor = state().supervisor
    snapshot = await supervisor.cancel_and_wait(
        job_id,
        owner=user,
        timeout_s=supervisor.settings.provider_cancel_s + CANCEL_SETTLE_MARGIN_S,
    )
    return dump(job_view(snapshot, url_maker(request.scheme, request.host)))


def _query_int(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if raw.isascii() and raw.isdigit() and len(raw) <= 18 and low <= int(raw) <= high:
        return int(raw)
    item = {
        "loc": ["query", name],
        "msg": f"Input should be an integer from {low} to {high}",
        "type": "int_range",
    }
    raise APIError(422, [item])


@blueprint.get("/api/generate")
async def list_jobs() -> dict[str, object]:
    """The caller's jobs, newest first: ``?limit=`` (1-100, default 20) and ``?cursor=``."""
    user = current_user()
    limit = _query_int("limit", 20, 1, MAX_PAGE)
    before = _query_int("cursor", None, 1, 2**62)
    assert limit is not None
    page, next_cursor = await state().supervisor.find_page(owner=user, limit=limit, before=before)
    view = JobListView(
        results=tuple(summary_view(job) for job in page),
        next_cursor=None if next_cursor is None else str(next_cursor),
    )
    return dump(view)
