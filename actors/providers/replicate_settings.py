"""Replicate settings: which model, where, how long to wait, and webhooks."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

DEFAULT_MODEL = "black-forest-labs/flux-schnell"
DEFAULT_BASE_URL = "https://api.replicate.com"
#: Replicate's documented limit on prediction creates.
DEFAULT_MAX_CREATES_PER_MIN = 600
#: The highest ``REPLICATE_MAX_CREATES_PER_MIN`` accepted (1,000 creates per second).
MAX_CREATES_PER_MIN_LIMIT = 60_000

_VERSION = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SettingsProblem(ValueError):
    """A Replicate setting is malformed."""


@attrs.frozen(kw_only=True)
class ModelRef:
    """``owner/name`` (official model endpoint), ``owner/name:version`` or a bare version id."""

    name: str | None
    version: str | None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        ref = ref.strip()
        name, colon, version = ref.partition(":")
        if not colon and _VERSION.match(name):
            return cls(name=None, version=name)
        if not _NAME.match(name) or (colon and not _VERSION.match(version)):
            raise SettingsProblem(
                f"REPLICATE_MODEL={ref!r}: expected owner/name, owner/name:<64-hex version> "
                "or a 64-hex version id"
            )
        return cls(name=name, version=version or None)

    @property
    def create_path(self) -> str:
        if self.version is None:
            return f"/v1/models/{self.name}/predictions"
        return "/v1/predictions"

    def create_body(self, model_input: Mapping[str, object]) -> dict[str, object]:
        body: dict[str, object] = {"input": dict(model_input)}
        if self.version is not None:
            body["version"] = self.version
        return body

    def __str__(self) -> str:
        if self.name is None:
            return str(self.version)
        return self.name if self.version is None else f"{self.name}:{self.version}"


@attrs.frozen(kw_only=True)
class ReplicateSettings:
    """Args:
    api_token: ``REPLICATE_API_TOKEN``.
    model: ``REPLICATE_MODEL``.
    model_input: ``REPLICATE_INPUT``, merged into every prediction's input (the prompt wins).
    base_url: ``REPLICATE_BASE_URL``, without ``/v1`` (as the ``replicate`` package reads it).
    wait_s: ``Prefer: wait=N`` on creates (1-60).
    max_creates_per_min: The create pacer's ceiling (Replicate's documented limit is 600; an
        account with a higher limit raises it). A 429 still halves the pace below it.
    poll_interval_s: Between polls once the wait window has passed.
    request_timeout_s: Connect/read/write timeout of every other call.
    webhook_url: With ``webhook_secret``: receive ``completed`` webhooks there.
    webhook_secret: ``whsec_...`` signing secret of those webhooks.
    webhook_tolerance_s: How old (or new) a webhook's timestamp may be.
    webhook_poll_interval_s: The fallback poll interval while webhooks are on.
    """

    api_token: str
    model: ModelRef = attrs.field(factory=lambda: ModelRef.parse(DEFAULT_MODEL))
    model_input: Mapping[str, object] = attrs.field(factory=dict)
    base_url: str = DEFAULT_BASE_URL
    wait_s: int = attrs.field(
        default=60, validator=[attrs.validators.ge(1), attrs.validators.le(60)]
    )
    max_creates_per_min: int = attrs.field(
        default=DEFAULT_MAX_CREATES_PER_MIN,
        validator=[attrs.validators.ge(1), attrs.validators.le(MAX_CREATES_PER_MIN_LIMIT)],
    )
    poll_interval_s: float = attrs.field(default=0.25, validator=attrs.validators.gt(0))
    request_timeout_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_tolerance_s: int = 300
    webhook_poll_interval_s: float = 10.0

    @property
    def webhooks(self) -> bool:
        return self.webhook_url is not None and self.webhook_secret is not None
