"""The benchmarks' image provider: no work of its own, timed by the job's prompt, clock-stamped.

A job's prompt says how its images behave, as ``key=value`` words after ``bench``::

    bench latency=200 gap=20 gate=3 fail=0.3 limit=0.1

- ``latency``: milliseconds each image takes (default 0: one checkpoint, nothing else).
- ``gap``: extra milliseconds per image index, so that the images of a job finish one by one.
- ``gate``: the images wait (holding their capacity token) until the provider's gate has been
  opened this many times (``open_gate``; the bench's server process opens it on ``SIGUSR1``), so
  that the clock starts only when every subscriber is connected.
- ``fail``, ``limit``: the probability that an attempt fails with a transient error, or with a
  rate limit (a ``NotStartedError``, which uses no attempt, carrying a retry-after hint of
  ``retry_after`` ms, default 200).

Every image's URL carries the moment it finished, from ``time.monotonic_ns()``:
``/files/bench-<job>-<index>-<ns>.png``. ``CLOCK_MONOTONIC`` is one clock for every process of
the machine, so a subscriber in another process computes the delivery time from the URL alone.
"""

from __future__ import annotations

import random
import re
import time

import attrs
import httpx
import trio

from actors.errors import NotStartedError, PermanentProviderError, TransientProviderError
from actors.providers.base import ImageRequest, ProviderStatistics

_STAMP = re.compile(r"-(\d+)\.png$")


@attrs.frozen(kw_only=True)
class Spec:
    """How the images of one job behave (parsed from its prompt)."""

    latency_ms: float = 0.0
    gap_ms: float = 0.0
    gate: int = 0
    fail: float = 0.0
    limit: float = 0.0
    retry_after_ms: float = 200.0

    @classmethod
    def parse(cls, prompt: str) -> Spec:
        values: dict[str, float] = {}
        for word in prompt.split():
            key, sep, value = word.partition("=")
            if sep:
                values[key] = float(value)
        return cls(
            latency_ms=values.get("latency", 0.0),
            gap_ms=values.get("gap", 0.0),
            gate=int(values.get("gate", 0)),
            fail=values.get("fail", 0.0),
            limit=values.get("limit", 0.0),
            retry_after_ms=values.get("retry_after", 200.0),
        )


def prompt(  # noqa: PLR0917 (keywords in practice; a plain signature keeps call sites short)
    latency_ms: float = 0,
    gap_ms: float = 0,
    gate: int = 0,
    fail: float = 0,
    limit: float = 0,
    retry_after_ms: float = 200,
) -> str:
    """The prompt that asks for :class:`Spec` with these values."""
    return (
        f"bench latency={latency_ms:g} gap={gap_ms:g} gate={gate} fail={fail:g} "
        f"limit={limit:g} retry_after={retry_after_ms:g}"
    )


def finished_ns(url: str) -> int:
    """The ``time.monotonic_ns()`` at which the provider finished the image behind ``url``."""
    match = _STAMP.search(url)
    if match is None:
        raise ValueError(f"not a bench provider URL: {url!r}")
    return int(match.group(1))


class BenchProvider:
    """An ``ImageProvider`` that does no work: it waits as its job's prompt says and stamps.

    Concurrency: any number of workers may call :meth:`generate` at once; :meth:`open_gate` is
    sync (called from the signal watcher task).
    """

    name = "bench"

    def __init__(self, *, seed: int = 7) -> None:
        self._rng = random.Random(seed)
        self._gates_opened = 0
        self._gate_changed = trio.Event()
        self.images = 0
        self.transient = 0
        self.rate_limited = 0

    def open_gate(self) -> None:
        self._gates_opened += 1
        self._gate_changed.set()
        self._gate_changed = trio.Event()

    async def generate(self, request: ImageRequest) -> str:
        spec = Spec.parse(request.prompt)
        while self._gates_opened < spec.gate:
            await self._gate_changed.wait()
        delay_ms = spec.latency_ms + spec.gap_ms * request.index
        if delay_ms > 0:
            await trio.sleep(delay_ms / 1000)
        else:
            await trio.lowlevel.checkpoint()
        if spec.fail or spec.limit:
            draw = self._rng.random()
            if draw < spec.fail:
                self.transient += 1
                raise TransientProviderError("bench: simulated transient failure")
            if draw < spec.fail + spec.limit:
                self.rate_limited += 1
                raise NotStartedError(
                    "bench: simulated rate limit", retry_after_s=spec.retry_after_ms / 1000
                )
        self.images += 1
        return f"/files/bench-{request.job_id}-{request.index}-{time.monotonic_ns()}.png"

    async def cancel(self, job_id: str, index: int) -> None:  # noqa: ARG002 (the protocol's)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ProviderStatistics:
        return {
            "images": self.images,
            "transient": self.transient,
            "rate_limited": self.rate_limited,
            "gates_opened": self._gates_opened,
        }


class ReplicateCallProvider:
    """The yardstick's Replicate provider: one create held open with ``Prefer: wait``, polled
    past its window, nothing else (no pacing, no journal, no reconciling, no retries).

    The same HTTP client library as the service's provider (httpx, one pool), so that a
    comparison measures what the service adds around the call, not the call itself.
    """

    name = "replicate-call"

    def __init__(
        self, client: httpx.AsyncClient, *, token: str, model: str, wait_s: int = 60
    ) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}", "Prefer": f"wait={wait_s}"}
        self._path = f"/v1/models/{model}/predictions"
        self.images = 0

    async def generate(self, request: ImageRequest) -> str:
        body = {"input": {"prompt": request.prompt}}
        response = await self._client.post(self._path, json=body, headers=self._headers)
        if response.status_code != httpx.codes.CREATED:
            raise TransientProviderError(f"create answered {response.status_code}")
        prediction = response.json()
        while prediction["status"] not in {"succeeded", "failed", "canceled"}:
            await trio.sleep(0.25)
            answer = await self._client.get(f"/v1/predictions/{prediction['id']}")
            prediction = answer.json()
        if prediction["status"] != "succeeded":
            raise PermanentProviderError(f"prediction {prediction['status']}")
        output = prediction["output"]
        self.images += 1
        return str(output[0] if isinstance(output, list) else output)

    async def cancel(self, job_id: str, index: int) -> None:  # noqa: ARG002 (the protocol's)
        await trio.lowlevel.checkpoint()

    def statistics(self) -> ProviderStatistics:
        return {"images": self.images}
