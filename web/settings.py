"""Settings of the service, read once from the environment (and ``.env`` if present).

Every variable is listed with its default in ``.env.example``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import attrs
from dotenv import dotenv_values

from actors.files import ImageFilesSettings
from actors.providers.local import LocalProviderSettings
from actors.providers.replicate import (
    DEFAULT_BASE_URL,
    DEFAULT_MODEL,
    ModelRef,
    ReplicateSettings,
)
from actors.providers.replicate_settings import MAX_CREATES_PER_MIN_LIMIT
from actors.retry import MAX_ATTEMPTS, RetryPolicy
from actors.settings import SupervisorSettings
from actors.store.sqlite import SYNCHRONOUS
from web.proxy import Network, parse_networks

T = TypeVar("T")

MIN_SECRET_BYTES = 32


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


STORE_BACKENDS = ("sqlite", "memory", "redis")
REDIS_SCHEMES = ("redis", "rediss", "unix")


@attrs.frozen(kw_only=True)
class StoreSettings:
    """Where jobs are kept.

    Args:
        backend: ``sqlite`` (jobs survive restarts), ``memory`` or ``redis`` (``STORE``).
        database_path: The SQLite file (``DATABASE_PATH``), made with its directory if missing.
        synchronous: ``full`` or ``normal`` (``DATABASE_SYNCHRONOUS``): whether each commit
            waits for the disk (survives a power cut) or only for the OS (survives a crash).
        redis_url: The Redis server of ``STORE=redis`` (``REDIS_URL``).
        redis_prefix: The start of every key the service keeps there (``REDIS_PREFIX``).
        redis_limits_prefix: With ``STORE=redis``, the start of the keys of the limits shared
            by every process using it: ``MAX_CONCURRENCY``, the Replicate create pace, login
            throttling (``REDIS_LIMITS_PREFIX``; ``None``: ``<REDIS_PREFIX>limits:``).
        capacity_lease_s: How long a slot of ``MAX_CONCURRENCY`` outlives the last renewal by
            the process holding it, so the slots of a process that died come free
            (``CAPACITY_LEASE_S``).
        job_lease_s: With Redis, how long a node's hold on a job outlives the node
            (``JOB_LEASE_S``): a killed node's jobs are carried on by another after this.
    """

    backend: str = "sqlite"
    database_path: Path = Path("var/imagegen.sqlite3")
    synchronous: str = "full"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "imagegen:"
    redis_limits_prefix: str | None = None
    capacity_lease_s: float = 5.0

    @property
    def limits_prefix(self) -> str:
        """Where the limits shared across processes are kept in Redis."""
        if self.redis_limits_prefix is not None:
            return self.redis_limits_prefix
        return f"{self.redis_prefix}limits:"

    job_lease_s: float = 5.0


@attrs.frozen(kw_only=True)
class Settings:
    """Everything the web layer needs, immutable once loaded."""

    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str | None = None
    auth_secret: str | None = None
    token_ttl_s: int = 3600
    demo_email: str = "test@example.com"
    demo_password: str = "password123"  # noqa: S105 (the documented demo credentials)
    users_file: Path | None = None
    allowed_origins: tuple[str, ...] = ("http://localhost:5173",)
    max_body_bytes: int = 64 * 1024
    min_images: int = 5
    max_images: int = 20
    heartbeat_s: float = 15.0
    sse_retry_ms: int = 3000
    login_max_failures: int = 10
    login_window_s: float = 300.0
    graceful_timeout_s: float = 3.0
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"
    supervisor: SupervisorSettings = attrs.Factory(SupervisorSettings)
    local: LocalProviderSettings = attrs.Factory(
        lambda: LocalProviderSettings(images_dir=Path("var/images"), latency_ms=(800, 2500))
    )
    #: ``None`` (the local provider) unless ``REPLICATE_API_TOKEN`` is set.
    replicate: ReplicateSettings | None = None
    store: StoreSettings = attrs.Factory(StoreSettings)
    #: The images the service serves under ``/files/`` (the same directory as ``local``'s).
    files: ImageFilesSettings = attrs.Factory(
        lambda: ImageFilesSettings(directory=Path("var/images"))
    )
    # --- deployment: TLS and reverse proxies ---
    #: Serve HTTPS (HTTP/2 by ALPN, and HTTP/1.1) with this PEM chain and key; both or neither.
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    #: Peers whose ``X-Forwarded-*`` headers are believed (web/proxy.py); none by default.
    forwarded_allow_ips: tuple[Network, ...] = ()


def _int(value: str) -> int:
    return int(value.strip())


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = _int(value)
        if not low <= number <= high:
            raise ValueError(f"must be from {low} to {high}")
        return number

    return parse


def _positive(value: str) -> float:
    number = _float(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _float(value: str) -> float:
    number = float(value.strip())
    if number != number or number in (float("inf"), float("-inf")):  # noqa: PLR0124 (NaN check)
        raise ValueError("not a finite number")
    return number


def _ms_range(value: str) -> tuple[int, int]:
    low, sep, high = value.strip().partition("-")
    pair = (_int(low), _int(high if sep else low))
    if pair[0] < 0 or pair[1] < pair[0]:
        raise ValueError("expected MIN-MAX milliseconds with 0 <= MIN <= MAX")
    return pair


def _bool(value: str) -> bool:
    word = value.strip().lower()
    if word in {"true", "1", "yes", "on"}:
        return True
    if word in {"false", "0", "no", "off"}:
        return False
    raise ValueError("expected true or false")


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        word = value.strip().lower()
        if word not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return word

    return parse


def _json_object(value: str) -> dict[str, object]:
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError("expected a JSON object")
    return parsed


def _http_url(value: str) -> str:
    url = value.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", url):
        raise ValueError("expected an http(s) URL")
    return url


def _redis_url(value: str) -> str:
    url = value.strip()
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES or not (parts.netloc or parts.path):
        raise ValueError("expected redis://[user:password@]host[:port][/db], rediss:// or unix://")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return url


def _redis_prefix(value: str) -> str:
    prefix = value.strip()
    if any(character.isspace() or character in "*?[]" for character in prefix):
        raise ValueError("no spaces or glob characters (* ? [ ])")
    return prefix


def _whsec(value: str) -> str:
    secret = value.strip()
    _, _, key = secret.partition("whsec_")
    try:
        if not secret.startswith("whsec_") or not base64.b64decode(key, validate=True):
            raise ValueError
    except (ValueError, binascii.Error):
        raise ValueError("expected whsec_<base64>, as Replicate gives it") from None
    return secret


def _origins(value: str) -> tuple[str, ...]:
    return tuple(origin.strip().rstrip("/") for origin in value.split(",") if origin.strip())


class _Reader:
    def __init__(self, environ: Mapping[str, str | None]) -> None:
        self._environ = environ

    def get(self, name: str, parse: Callable[[str], T], default: T) -> T:
        raw = self._environ.get(name)
        if raw is None or raw.strip() == "":
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{name}={raw!r} is not valid: {exc}") from None

    def text(self, name: str, default: str | None) -> str | None:
        raw = self._environ.get(name)
        return default if raw is None or raw.strip() == "" else raw.strip()


def load_settings(
    environ: Mapping[str, str] | None = None, *, env_file: Path | None = None
) -> Settings:
    """Build :class:`Settings` from ``environ`` (default: ``.env`` overlaid by ``os.environ``).

    Raises:
        SettingsError: A variable is malformed or out of range.
    """
    if environ is None:
        merged: dict[str, str | None] = {}
        path = env_file or Path(".env")
        if path.is_file():
            merged.update(dotenv_values(path))
        merged.update(os.environ)
        reader = _Reader(merged)
    else:
        reader = _Reader(environ)
    try:
        return _build(reader)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SettingsError):
            raise
        raise SettingsError(str(exc)) from None


def _build(env: _Reader) -> Settings:
    defaults = Settings()
    sup = SupervisorSettings()
    retry = RetryPolicy(
        attempts=env.get("RETRY_ATTEMPTS", _int_in(1, MAX_ATTEMPTS), sup.retry.attempts),
        base_delay_s=env.get("RETRY_BASE_DELAY_MS", _float, sup.retry.base_delay_s * 1000) / 1000,
        max_delay_s=env.get("RETRY_MAX_DELAY_MS", _float, sup.retry.max_delay_s * 1000) / 1000,
    )
    supervisor = SupervisorSettings(
        capacity=env.get("MAX_CONCURRENCY", _int_in(1, 10_000), sup.capacity),
        retry=retry,
        attempt_timeout_s=env.get("ATTEMPT_TIMEOUT_S", _positive, sup.attempt_timeout_s),
        max_active_jobs_per_user=env.get(
            "MAX_ACTIVE_JOBS_PER_USER", _int, sup.max_active_jobs_per_user
        ),
        max_queued_images=env.get("MAX_QUEUED_IMAGES", _int, sup.max_queued_images),
        retry_after_s=env.get("RETRY_AFTER_S", _int, sup.retry_after_s),
        job_retention_s=env.get("JOB_RETENTION_S", _float, sup.job_retention_s),
        max_retained_jobs=env.get("MAX_RETAINED_JOBS", _int, sup.max_retained_jobs),
        max_streams_per_user=env.get(
            "MAX_STREAMS_PER_USER", _int_in(1, 1_000_000), sup.max_streams_per_user
        ),
    )
    local = LocalProviderSettings(
        images_dir=Path(env.text("IMAGES_DIR", None) or defaults.local.images_dir),
        latency_ms=env.get("LOCAL_LATENCY_MS", _ms_range, defaults.local.latency_ms),
        fail_rate=env.get("LOCAL_FAIL_RATE", _float, defaults.local.fail_rate),
    )
    supervisor = attrs.evolve(
        supervisor,
        provider_cancel_s=env.get("PROVIDER_CANCEL_S", _float, sup.provider_cancel_s),
    )
    file_defaults = defaults.files
    files = ImageFilesSettings(
        directory=local.images_dir,
        store_remote=env.get("STORE_IMAGES", _bool, file_defaults.store_remote),
        max_image_bytes=env.get(
            "IMAGE_MAX_BYTES", _int_in(1, 2**62), file_defaults.max_image_bytes
        ),
        max_total_bytes=env.get(
            "IMAGES_MAX_BYTES", _int_in(1, 2**62), file_defaults.max_total_bytes
        ),
    )
    store = StoreSettings(
        backend=env.get("STORE", _choice(STORE_BACKENDS), defaults.store.backend),
        database_path=Path(env.text("DATABASE_PATH", None) or defaults.store.database_path),
        synchronous=env.get(
            "DATABASE_SYNCHRONOUS", _choice(SYNCHRONOUS), defaults.store.synchronous
        ),
        redis_url=env.get("REDIS_URL", _redis_url, defaults.store.redis_url),
        redis_prefix=env.get("REDIS_PREFIX", _redis_prefix, defaults.store.redis_prefix),
        redis_limits_prefix=env.get("REDIS_LIMITS_PREFIX", _redis_prefix, None) or None,
        capacity_lease_s=env.get("CAPACITY_LEASE_S", _positive, defaults.store.capacity_lease_s),
        job_lease_s=env.get("JOB_LEASE_S", _positive, defaults.store.job_lease_s),
    )
    users_file = env.text("USERS_FILE", None)
    settings = Settings(
        host=env.text("HOST", defaults.host) or defaults.host,
        port=env.get("PORT", _int, defaults.port),
        public_base_url=(env.text("PUBLIC_BASE_URL", None) or "").rstrip("/") or None,
        auth_secret=env.text("AUTH_SECRET", None),
        token_ttl_s=env.get("TOKEN_TTL_S", _int, defaults.token_ttl_s),
        demo_email=env.text("DEMO_EMAIL", defaults.demo_email) or defaults.demo_email,
        demo_password=env.text("DEMO_PASSWORD", defaults.demo_password) or defaults.demo_password,
        users_file=Path(users_file) if users_file else None,
        allowed_origins=env.get("ALLOWED_ORIGINS", _origins, defaults.allowed_origins),
        max_body_bytes=env.get("MAX_BODY_BYTES", _int, defaults.max_body_bytes),
        min_images=env.get("MIN_IMAGES", _int, defaults.min_images),
        max_images=env.get("MAX_IMAGES", _int, defaults.max_images),
        heartbeat_s=env.get("HEARTBEAT_S", _float, defaults.heartbeat_s),
        sse_retry_ms=env.get("SSE_RETRY_MS", _int, defaults.sse_retry_ms),
        login_max_failures=env.get("LOGIN_MAX_FAILURES", _int, defaults.login_max_failures),
        login_window_s=env.get("LOGIN_WINDOW_S", _float, defaults.login_window_s),
        graceful_timeout_s=env.get("GRACEFUL_TIMEOUT_S", _float, defaults.graceful_timeout_s),
        shutdown_grace_s=env.get("SHUTDOWN_GRACE_S", _float, defaults.shutdown_grace_s),
        log_level=(env.text("LOG_LEVEL", defaults.log_level) or defaults.log_level).upper(),
        log_format=(env.text("LOG_FORMAT", defaults.log_format) or defaults.log_format).lower(),
        supervisor=supervisor,
        local=local,
        replicate=_replicate(env),
        store=store,
        files=files,
        tls_certfile=_optional_path(env.text("TLS_CERTFILE", None)),
        tls_keyfile=_optional_path(env.text("TLS_KEYFILE", None)),
        forwarded_allow_ips=env.get(
            "FORWARDED_ALLOW_IPS", parse_networks, defaults.forwarded_allow_ips
        ),
    )
    check(settings)
    return settings


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _replicate(env: _Reader) -> ReplicateSettings | None:
    token = env.text("REPLICATE_API_TOKEN", None)
    if token is None:
        return None
    defaults = ReplicateSettings(api_token=token)
    webhook_url = env.get("REPLICATE_WEBHOOK_URL", _http_url, None)
    webhook_secret = env.get("REPLICATE_WEBHOOK_SECRET", _whsec, None)
    if (webhook_url is None) != (webhook_secret is None):
        raise SettingsError("REPLICATE_WEBHOOK_URL and REPLICATE_WEBHOOK_SECRET go together")
    return ReplicateSettings(
        api_token=token,
        model=env.get("REPLICATE_MODEL", ModelRef.parse, ModelRef.parse(DEFAULT_MODEL)),
        model_input=env.get("REPLICATE_INPUT", _json_object, {}),
        base_url=env.get("REPLICATE_BASE_URL", _http_url, DEFAULT_BASE_URL),
        wait_s=env.get("REPLICATE_WAIT_S", _int_in(1, 60), defaults.wait_s),
        max_creates_per_min=env.get(
            "REPLICATE_MAX_CREATES_PER_MIN",
            _int_in(1, MAX_CREATES_PER_MIN_LIMIT),
            defaults.max_creates_per_min,
        ),
        poll_interval_s=env.get(
            "REPLICATE_POLL_INTERVAL_MS", _positive, defaults.poll_interval_s * 1000
        )
        / 1000,
        request_timeout_s=env.get("REPLICATE_TIMEOUT_S", _positive, defaults.request_timeout_s),
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_poll_interval_s=env.get(
            "REPLICATE_WEBHOOK_POLL_INTERVAL_S", _float, defaults.webhook_poll_interval_s
        ),
    )


def check(settings: Settings) -> None:
    """Refuse combinations that cannot work.

    Raises:
        SettingsError: Naming the variable at fault.
    """
    problems = []
    if settings.auth_secret is not None and len(settings.auth_secret.encode()) < MIN_SECRET_BYTES:
        problems.append(f"AUTH_SECRET must be at least {MIN_SECRET_BYTES} bytes long")
    if not 1 <= settings.min_images <= settings.max_images:
        problems.append("MIN_IMAGES and MAX_IMAGES must satisfy 1 <= MIN_IMAGES <= MAX_IMAGES")
    if not 0 < settings.port < 65536:
        problems.append("PORT must be between 1 and 65535")
    for name, value in [
        ("TOKEN_TTL_S", settings.token_ttl_s),
        ("MAX_BODY_BYTES", settings.max_body_bytes),
        ("HEARTBEAT_S", settings.heartbeat_s),
        ("LOGIN_MAX_FAILURES", settings.login_max_failures),
        ("LOGIN_WINDOW_S", settings.login_window_s),
    ]:
        if value <= 0:
            problems.append(f"{name} must be positive")
    if settings.sse_retry_ms < 0 or settings.graceful_timeout_s < 0:
        problems.append("SSE_RETRY_MS and GRACEFUL_TIMEOUT_S must not be negative")
    if settings.shutdown_grace_s < 0:
        problems.append("SHUTDOWN_GRACE_S must not be negative")
    if (settings.tls_certfile is None) != (settings.tls_keyfile is None):
        problems.append("TLS_CERTFILE and TLS_KEYFILE go together")
    if settings.log_format not in {"text", "json"}:
        problems.append("LOG_FORMAT must be text or json")
    if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        problems.append("LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    if problems:
        raise SettingsError("; ".join(problems))
