"""Deterministic stand-ins for tests: a scripted image provider and a few tiny helpers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import attrs
import trio

from actors.errors import NotStartedError, PermanentProviderError, TransientProviderError
from actors.eventlog import EventLog
from actors.messages import JobEvent
from actors.providers.base import ImageRequest, ProviderStatistics
from actors.settings import SupervisorSettings
from actors.store import JobStore, MemoryStore
from actors.supervisor import Supervisor

FIXED_NOW = datetime(2026, 1, 1, tzinfo=UTC)
DEFAULT_URL = "https://img.test/{job_id}/{index}.png"


@attrs.frozen(kw_only=True)
class Script:
    """How :class:`FakeProvider` answers every attempt at one image.

    Args:
        latency_s: Virtual time an attempt takes before it answers (after ``block``).
        not_started: Attempts ``1..not_started`` raise ``NotStartedError`` (a 429, a create
            that created nothing).
        fail_times: The next ``fail_times`` attempts raise ``TransientProviderError``.
        retry_after_s: The provider's hint carried by those errors.
        permanent: Later attempts raise ``PermanentProviderError(permanent)``.
        crash: Later attempts raise this exception type (a provider bug).
        block: Every attempt first waits until this event is set.
        url: The answer, formatted with ``job_id``, ``index`` and ``attempt``.
    """

    latency_s: float = 1.0
    not_started: int = 0
    fail_times: int = 0
    retry_after_s: float | None = None
    permanent: str | None = None
    crash: type[Exception] | None = None
    block: trio.Event | None = None
    url: str = DEFAULT_URL


class FakeProvider:
    """An ``ImageProvider`` scripted per image index (or per prompt, which wins).

    Records every call (``calls``, with the virtual time of each in ``call_times``), how many
    calls are in flight now and at most, and how many were cancelled mid-flight (by a job's
    cancel scope or by the worker's attempt timeout).
    """

    name = "fake"

    def __init__(
        self,
        scripts: Mapping[int, Script] | None = None,
        *,
        default: Script | None = None,
        by_prompt: Mapping[str, Script] | None = None,
    ) -> None:
        self.scripts = dict(scripts or {})
        self.default = default or Script()
        self.by_prompt = dict(by_prompt or {})
        self.calls: list[ImageRequest] = []
        self.call_times: list[float] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.cancelled = 0
        self.remote_cancels: list[tuple[str, int]] = []

    def script_for(self, request: ImageRequest) -> Script:
        if request.prompt in self.by_prompt:
            return self.by_prompt[request.prompt]
        return self.scripts.get(request.index, self.default)

    def start_times(self, *, job_id: str | None = None, index: int | None = None) -> list[float]:
        """Virtual start times of the matching calls, in call order."""
        return [
            at
            for request, at in zip(self.calls, self.call_times, strict=True)
            if job_id in (None, request.job_id) and index in (None, request.index)
        ]

    async def generate(self, request: ImageRequest) -> str:
        script = self.script_for(request)
        self.calls.append(request)
        self.call_times.append(trio.current_time())
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            if script.block is not None:
                await script.block.wait()
            await trio.sleep(script.latency_s)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        if request.attempt <= script.not_started:
            raise NotStartedError(
                f"nothing started {request.attempt}", retry_after_s=script.retry_after_s
            )
        if request.attempt <= script.not_started + script.fail_times:
            raise TransientProviderError(
                f"transient failure {request.attempt}", retry_after_s=script.retry_after_s
            )
        if script.permanent is not None:
            raise PermanentProviderError(script.permanent)
        if script.crash is not None:
            raise script.crash("provider bug")
        return script.url.format(
            job_id=request.job_id, index=request.index, attempt=request.attempt
        )

    async def cancel(self, job_id: str, index: int) -> None:
        """Record that the worker asked to stop remote work for this image."""
        self.remote_cancels.append((job_id, index))
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ProviderStatistics:
        return {"calls": len(self.calls), "cancelled": self.cancelled}


def fixed_now(at: datetime = FIXED_NOW) -> Callable[[], datetime]:
    """A wall clock stuck at ``at`` (UTC), for exact ``created_at``/``finished_at`` values."""

    def now() -> datetime:
        return at

    return now


def upper_jitter(low: float, high: float) -> float:
    """A ``uniform`` that always picks the top of the range: backoff equals its cap exactly."""
    return high


async def start_supervisor(
    nursery: trio.Nursery,
    provider: FakeProvider,
    settings: SupervisorSettings | None = None,
    *,
    store: JobStore | None = None,
) -> Supervisor:
    """A Supervisor on ``provider`` and ``store`` (a fresh in-memory one unless given), with a
    fixed wall clock and upper jitter, running in ``nursery`` (pytest-trio cancels it at
    teardown)."""
    supervisor = Supervisor(
        provider,
        settings or SupervisorSettings(),
        store=store if store is not None else MemoryStore(),
        now=fixed_now(),
        uniform=upper_jitter,
    )
    await nursery.start(supervisor.run)
    return supervisor


async def read_all(log: EventLog, cursor: int = 0) -> list[JobEvent]:
    """Every event after ``cursor`` until the log is closed (so: until ``done``)."""
    events: list[JobEvent] = []
    while batch := await log.wait_events_after(cursor):
        events.extend(batch)
        cursor = batch[-1].id
    return events


async def never_runs(*_: object) -> None:
    """Stands in for a background loop a test turns off (``monkeypatch.setattr``)."""
    await trio.sleep_forever()
