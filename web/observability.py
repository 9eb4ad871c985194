"""Prometheus metrics (``GET /metrics``) and request ids (``X-Request-ID``)."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from quart import Blueprint, Response, g, request
from quart_trio import QuartTrio

from actors.messages import ImageStatus, JobSnapshot
from actors.supervisor import Supervisor
from web import hypercorn_fixes
from web.logs import request_id_var

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Seconds: from tens of milliseconds (local provider) to minutes (cold Replicate models).
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _SupervisorCollector(Collector):
    """Reads ``supervisor.statistics()`` at scrape time: nothing to keep in step."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._supervisor.statistics()
        jobs = GaugeMetricFamily("imagegen_jobs", "Jobs retained, by status", labels=["status"])
        for status, count in stats.jobs_by_status:
            jobs.add_metric([status.value], count)
        yield jobs
        yield GaugeMetricFamily(
            "imagegen_images_queued", "Unfinished images", value=stats.images_queued
        )
        capacity = stats.capacity
        yield GaugeMetricFamily(
            "imagegen_capacity_limit", "Attempts allowed in flight", value=capacity.total
        )
        yield GaugeMetricFamily(
            "imagegen_capacity_in_use", "Attempts in flight", value=capacity.in_use
        )
        yield GaugeMetricFamily(
            "imagegen_capacity_waiting", "Attempts waiting for capacity", value=capacity.waiting
        )
        images = CounterMetricFamily(
            "imagegen_images", "Finished images, by status", labels=["status"]
        )
        images.add_metric([ImageStatus.COMPLETED.value], stats.images_completed_total)
        images.add_metric([ImageStatus.FAILED.value], stats.images_failed_total)
        yield images
        yield CounterMetricFamily(
            "imagegen_attempts", "Provider attempts", value=stats.attempts_total
        )
        yield CounterMetricFamily(
            "imagegen_retries", "Attempts after the first", value=stats.retries_total
        )
        yield CounterMetricFamily(
            "imagegen_job_crashes",
            "Jobs ended by a bug of their own",
            value=stats.jobs_crashed_total,
        )
        yield CounterMetricFamily(
            "imagegen_task_failures",
            "Background loops that raised (a bug) and were started again",
            value=stats.tasks_failed_total,
        )
        subscribers = GaugeMetricFamily(
            "imagegen_subscribers", "Open event streams, by transport", labels=["transport"]
        )
        for transport, count in stats.subscribers:
            subscribers.add_metric([transport.value], count)
        yield subscribers
        refused = CounterMetricFamily(
            "imagegen_subscribers_refused",
            "Event streams refused: their user had MAX_STREAMS_PER_USER open",
            labels=["transport"],
        )
        for transport, count in stats.subscribers_refused:
            refused.add_metric([transport.value], count)
        yield refused
        provider = self._supervisor.provider
        yield from _gauges("provider", provider.name, provider.statistics())
        store = self._supervisor.store
        yield from _gauges("store", store.name, store.statistics())
        files = self._supervisor.files
        if files is not None:
            yield from _gauges("files", "image directory", files.statistics())


class _ConnectionCollector(Collector):
    """Open connections, and errors contained at the server's boundary (web/hypercorn_fixes.py)."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "imagegen_connections_open",
            "Connections being served",
            value=hypercorn_fixes.open_connections,
        )
        errors = CounterMetricFamily(
            "imagegen_connection_errors",
            "Exceptions that ended one connection (and only it), by exception type",
            labels=["kind"],
        )
        for kind, count in sorted(hypercorn_fixes.connection_errors.items()):
            errors.add_metric([kind], count)
        yield errors


def _gauges(
    prefix: str, owner: str, statistics: Mapping[str, object]
) -> Iterator[GaugeMetricFamily]:
    """A gauge per numeric figure of a component's ``statistics()``."""
    for key, value in statistics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            yield GaugeMetricFamily(f"imagegen_{prefix}_{key}", f"{owner}: {key}", value=value)


class Metrics:
    """The app's metrics, in a registry of its own (no process-global state)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SupervisorCollector(supervisor))
        self.registry.register(_ConnectionCollector())
        self.ttfi = Histogram(
            "imagegen_ttfi_seconds",
            "Time to first image, per job that had one",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.job_total = Histogram(
            "imagegen_job_seconds",
            "Job duration, from acceptance to its end",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.provider_latency = Histogram(
            "imagegen_provider_seconds",
            "Time at the provider per finished image",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.capacity_wait = Histogram(
            "imagegen_capacity_wait_seconds",
            "Time an image waited for capacity",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "imagegen_http_requests",
            "HTTP requests, by route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_latency = Histogram(
            "imagegen_http_request_seconds",
            "Time to the response's headers, by route",
            ["method", "route"],
            buckets=_HTTP_BUCKETS,
            registry=self.registry,
        )
        supervisor.job_listeners.append(self.observe_job)

    def observe_job(self, job: JobSnapshot) -> None:
        if job.ttfi_ms is not None:
            self.ttfi.observe(job.ttfi_ms / 1000)
        if job.total_ms is not None:
            self.job_total.observe(job.total_ms / 1000)
        for image in job.images:
            if image.attempts:
                self.provider_latency.labels(image.status.value).observe(image.provider_ms / 1000)
                self.capacity_wait.observe(image.wait_ms / 1000)


def install(app: QuartTrio, metrics: Metrics) -> None:
    """Request ids and HTTP metrics on every request, and the ``GET /metrics`` route."""

    @app.before_request
    async def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _SANE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.request_id = request_id
        g.started = time.perf_counter()
        request_id_var.set(request_id)

    @app.after_request
    async def _finish(response: Response) -> Response:
        request_id = getattr(g, "request_id", None)
        if request_id is not None:
            response.headers["X-Request-ID"] = request_id
        # The route's template, never the raw path: ids must not become label values.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(request.method, route, str(response.status_code)).inc()
        started = getattr(g, "started", None)
        if started is not None:
            metrics.http_latency.labels(request.method, route).observe(
                time.perf_counter() - started
            )
        return response

    blueprint = Blueprint("metrics", __name__)

    @blueprint.get("/metrics")
    async def scrape() -> Response:
        """Prometheus text format."""
        return Response(generate_latest(metrics.registry), 200, {"Content-Type": CONTENT_TYPE})

    app.register_blueprint(blueprint)
