"""Health and the supervisor's view."""

from __future__ import annotations

import json

from quart import Blueprint, Response, jsonify

from actors.limits.redis_capacity import RedisCapacity
from actors.messages import SupervisorStatistics
from web.context import current_user, state
from web.errors import error_response

blueprint = Blueprint("health", __name__)


@blueprint.get("/health")
async def health() -> Response:
    """``200 {"status": "ok"}``; 503 ``degraded`` while shutting down or the store is unusable."""
    supervisor = state().supervisor
    store = await supervisor.store.check()
    checks = {
        "supervisor": "shutting_down" if supervisor.draining.is_set() else "ok",
        "store": "ok" if store.ok else store.detail,
    }
    if supervisor.draining.is_set() or not store.ok:
        detail = "Shutting down" if supervisor.draining.is_set() else "The job store is unusable"
        response = error_response(503, detail, {"Retry-After": "5"})
        response.set_data(json.dumps({"status": "degraded", "detail": detail, "checks": checks}))
        return response
    return jsonify({"status": "ok", "checks": checks})


def status_view(stats: SupervisorStatistics) -> dict[str, object]:
    """The JSON of ``GET /api/status``."""
    capacity = stats.capacity
    return {
        "uptime_s": round(stats.uptime_s, 3),
        "shutting_down": stats.shutting_down,
        "jobs": {status.value: count for status, count in stats.jobs_by_status},
        "jobs_retained": stats.jobs_retained,
        "images": {
            "queued": stats.images_queued,
            "waiting_for_capacity": capacity.waiting,
            "in_flight": capacity.in_use,
            "completed_total": stats.images_completed_total,
            "failed_total": stats.images_failed_total,
        },
        "capacity": {
            "limit": capacity.total,
            "in_use": capacity.in_use,
            "waiting": capacity.waiting,
            "jobs_waiting": capacity.jobs_waiting,
        },
        "attempts_total": stats.attempts_total,
        "retries_total": stats.retries_total,
        "jobs_crashed_total": stats.jobs_crashed_total,
        "tasks_failed_total": stats.tasks_failed_total,
        "subscribers": {transport.value: count for transport, count in stats.subscribers},
        "subscribers_refused": {
            transport.value: count for transport, count in stats.subscribers_refused
        },
    }


@blueprint.get("/api/status")
async def status() -> dict[str, object]:
    """The supervisor's view: uptime, jobs by state, capacity, retries, subscribers."""
    current_user()
    app_state = state()
    view = status_view(app_state.supervisor.statistics())
    provider = app_state.supervisor.provider
    view["provider"] = {"name": provider.name, **provider.statistics()}
    view["store"] = dict(app_state.supervisor.store.statistics())
    cluster = app_state.supervisor.cluster
    if cluster is not None:
        # ``images`` is this node's; these two are the whole cluster's (null: Redis is down).
        queued: dict[str, int | None] = {"jobs_unfinished": None, "images_queued": None}
        queued.update(await cluster.queued() or {})
        section: dict[str, object] = {**cluster.statistics(), **queued}
        capacity = app_state.supervisor.capacity
        if isinstance(capacity, RedisCapacity):
            section["slots"] = capacity.local_statistics()
        view["cluster"] = section
    files = app_state.supervisor.files
    if files is not None:
        view["files"] = files.statistics()
    return view
