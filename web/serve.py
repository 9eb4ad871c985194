"""Run the service: ``python -m web`` (settings from the environment and ``.env``)."""

from __future__ import annotations

import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from actors.capacity import Capacity
from actors.cluster import ClusterNode, new_node_id
from actors.errors import StoreUnavailable
from actors.files import ImageFiles, open_image_files
from actors.limits.redis_capacity import open_redis_capacity
from actors.limits.redis_pace import RedisPace
from actors.providers.base import CreatePace, ImageProvider, RemoteJournal
from actors.providers.local import LocalProvider
from actors.providers.replicate import open_replicate_provider
from actors.store import JobStore, MemoryStore, open_sqlite_store
from actors.store.journal import StoreJournal
from actors.store.redis import RedisStore, open_redis_store, redis_secret
from actors.supervisor import Supervisor, open_supervisor
from web import hypercorn_fixes
from web.app import create_app
from web.auth import Authenticator, UsersFileError, kept_secret
from web.login_throttle import LoginLimiter, RedisLoginThrottle
from web.logs import ACCESS_LOG_FORMAT, AccessLogger, configure_logging
from web.proxy import TrustedProxies
from web.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("web")

# The collector's thresholds (CPython's: 700, 10, 10). Every open stream holds a few hundred
# long-lived objects, so with thousands of them a collection of the oldest generation took 200-465
# ms, all other work stopped (bench/README.md, fan-out); collecting the young generation after
# 10,000 allocations instead of 700 makes full collections 14 times rarer. Not more: cycles are
# still found, only later, and garbage waiting longer costs memory (bench.soak: with 50,000 the
# service's RSS grew 6.0 MiB/min under load, above its criterion; with 10,000, 3.7; with 700, 1.5).
GC_THRESHOLDS = (10_000, 10, 10)

#: The largest WebSocket message a client may send (Hypercorn's default: 16 MiB); over it, 1009
#: and the connection ends (web/hypercorn_fixes.py, 15). The stream route reads no messages, so
#: up to ``max_app_queue_size`` (10) of them wait unread: a stream holds at most about 12 times
#: this, not 190 MiB.
WEBSOCKET_MAX_MESSAGE_BYTES = 64 * 1024


def tune_gc() -> None:
    """Raise the collector's thresholds (:data:`GC_THRESHOLDS`); for a server process."""
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive (modules, the app, settings: what start-up
    made and the process keeps) out of the collector's generations, so that no later collection
    walks them again."""
    gc.collect()
    gc.freeze()


def hypercorn_config(settings: Settings, *, bind: str | None = None) -> Config:
    """Hypercorn's config for ``settings`` (``bind`` overrides HOST and PORT)."""
    config = Config()
    config.bind = [bind or f"{settings.host}:{settings.port}"]
    config.accesslog = logging.getLogger("web.access")
    config.access_log_format = ACCESS_LOG_FORMAT
    config.logger_class = AccessLogger
    config.errorlog = logging.getLogger("web.server")
    config.graceful_timeout = settings.graceful_timeout_s
    # Protocol-level pings keep idle WebSockets alive through proxies without extra frames.
    config.websocket_ping_interval = settings.heartbeat_s
    config.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE_BYTES
    if settings.tls_certfile is not None and settings.tls_keyfile is not None:
        # HTTPS on the same bind: HTTP/2 by ALPN, else HTTP/1.1 (WebSockets use HTTP/1.1).
        config.certfile = str(settings.tls_certfile)
        config.keyfile = str(settings.tls_keyfile)
    return config


async def _watch_signals(supervisor: Supervisor, shutdown: trio.Event) -> None:
    """The first SIGINT/SIGTERM starts the shutdown; a second one cuts the grace period short."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.is_set():
                logger.info("received %s: shutting down", name)
                supervisor.stop_admitting()
                shutdown.set()
            else:
                logger.info("received %s again: not waiting for running jobs", name)
                supervisor.begin_shutdown()


async def run_server(
    settings: Settings,
    *,
    provider: ImageProvider | None = None,
    auth: Authenticator | None = None,
    bind: str | None = None,
    shutdown: trio.Event | None = None,
    handle_signals: bool = True,
    server_gc: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set (or SIGINT/SIGTERM); ``task_status`` gets the bound URLs.

    Start order: the store (unfinished jobs of an earlier run are restored and carried on), the
    limits (shared with other processes with ``STORE=redis``), the image directory, the
    provider, the supervisor, hypercorn.

    Shutdown order: the supervisor stops admitting (503, ``/health`` 503) and running jobs get
    ``SHUTDOWN_GRACE_S`` to finish while their streams go on; then every stream's wait ends
    (SSE responses end, WebSockets close 1012), hypercorn drains its connections, the jobs
    still running are cancelled (left unfinished in a SQLite store for the next start), and the
    store writes what is queued and closes.

    ``server_gc`` (what ``python -m web`` does, not a test sharing its process): the
    collector's thresholds are raised (:func:`tune_gc`) and the start-up objects frozen once
    listening (:func:`freeze_startup_objects`).

    Raises:
        StoreUnavailable: The store cannot be opened or read (before ``task_status``).
    """
    hypercorn_fixes.install()
    if server_gc:
        tune_gc()
    auth = auth or Authenticator(settings)
    if shutdown is None:
        shutdown = trio.Event()
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(open_store(settings))
        limits = await stack.enter_async_context(open_limits(settings, store))
        if limits.login is not None:
            auth.throttle = limits.login
        cluster = None
        if isinstance(store, RedisStore):
            # Redis is shared: this process is one node of a cluster on its prefix.
            cluster = ClusterNode(
                store, url=settings.store.redis_url, lease_s=settings.store.job_lease_s
            )
        files = await stack.enter_async_context(open_image_files(settings.files))
        if provider is None:
            provider = await stack.enter_async_context(
                open_provider(settings, journal=StoreJournal(store), files=files, pace=limits.pace)
            )
        supervisor = await stack.enter_async_context(
            open_supervisor(
                provider,
                settings.supervisor,
                store=store,
                files=files,
                capacity=limits.capacity,
                cluster=cluster,
            )
        )
        app = TrustedProxies(create_app(supervisor, settings, auth), settings.forwarded_allow_ips)
        config = hypercorn_config(settings, bind=bind)

        async def trigger() -> None:
            await shutdown.wait()
            await supervisor.drain(settings.shutdown_grace_s)

        async with trio.open_nursery() as watching:
            if handle_signals:
                watching.start_soon(_watch_signals, supervisor, shutdown)
            async with trio.open_nursery() as nursery:
                try:
                    binds = await nursery.start(
                        partial(serve, app, config, shutdown_trigger=trigger)
                    )
                except* OSError as group:
                    # Hypercorn makes its sockets before it starts: a port taken, or an address
                    # that is not this host's. (An error once serving is not caught here.)
                    raise ListenError(
                        f"cannot listen on {', '.join(config.bind)}: {_first_leaf(group)}"
                    ) from None
                logger.info(
                    "listening on %s (provider: %s, store: %s)",
                    ", ".join(binds),
                    provider.name,
                    store.name,
                )
                if server_gc:
                    freeze_startup_objects()
                task_status.started(binds)
            # Hypercorn has drained and returned: stop watching for signals.
            watching.cancel_scope.cancel()
    logger.info("stopped")


class ListenError(Exception):
    """The server cannot listen where ``HOST`` and ``PORT`` say."""


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[JobStore]:
    """The store ``STORE`` names: SQLite at ``DATABASE_PATH`` (the default), memory, or Redis
    at ``REDIS_URL`` under ``REDIS_PREFIX``."""
    store_settings = settings.store
    if store_settings.backend == "memory":
        yield MemoryStore()
        return
    if store_settings.backend == "redis":
        async with open_redis_store(
            store_settings.redis_url,
            store_settings.redis_prefix,
            node=new_node_id(),
            lease_s=store_settings.job_lease_s,
        ) as redis_store:
            yield redis_store
        return
    async with open_sqlite_store(
        store_settings.database_path, synchronous=store_settings.synchronous
    ) as store:
        yield store


@attrs.frozen
class Limits:
    """The limits shared with other processes; ``None``: this process's own (the default)."""

    capacity: Capacity | None = None
    pace: CreatePace | None = None
    login: LoginLimiter | None = None


@asynccontextmanager
async def open_limits(settings: Settings, store: JobStore) -> AsyncIterator[Limits]:
    """With ``STORE=redis``, the limits every process on that Redis shares, kept under
    ``REDIS_LIMITS_PREFIX`` on the store's client; with another store, this process's own."""
    if not isinstance(store, RedisStore):
        yield Limits()
        return
    store_settings = settings.store
    prefix = store_settings.limits_prefix
    async with open_redis_capacity(
        store.client,
        prefix=f"{prefix}capacity:",
        capacity=settings.supervisor.capacity,
        lease_s=store_settings.capacity_lease_s,
    ) as capacity:
        login = RedisLoginThrottle(
            store.client,
            prefix=f"{prefix}login:",
            max_failures=settings.login_max_failures,
            window_s=settings.login_window_s,
        )
        # Replicate's rate limit is the account's: its creates are paced across processes.
        pace = None
        if settings.replicate is not None:
            max_rate = settings.replicate.max_creates_per_min / 60
            pace = RedisPace(store.client, prefix=prefix, max_rate=max_rate)
        logger.info("limits: shared under %r", prefix)
        yield Limits(capacity=capacity, pace=pace, login=login)


@asynccontextmanager
async def open_provider(
    settings: Settings,
    *,
    journal: RemoteJournal | None = None,
    files: ImageFiles | None = None,
    pace: CreatePace | None = None,
) -> AsyncIterator[ImageProvider]:
    """Replicate when ``REPLICATE_API_TOKEN`` is set (its creates paced by ``pace``, else by
    a pace of its own), else the built-in local provider."""
    if settings.replicate is None:
        yield LocalProvider(settings.local, files=files)
        return
    async with open_replicate_provider(settings.replicate, journal=journal, pace=pace) as provider:
        yield provider


def main() -> None:
    """Entry point of ``python -m web``."""
    try:
        settings = load_settings()
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    try:
        secret = None
        if settings.auth_secret is None and settings.store.backend == "redis":
            # Kept in Redis: a token signed by any node is valid on every node.
            store_settings = settings.store
            secret = trio.run(redis_secret, store_settings.redis_url, store_settings.redis_prefix)
        elif settings.auth_secret is None and settings.store.backend != "memory":
            secret = kept_secret(settings.store.database_path.with_name("auth_secret"))
        auth = Authenticator(settings, secret=secret)
    except (UsersFileError, OSError, StoreUnavailable) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None
    try:
        hypercorn_config(settings).create_ssl_context()  # unreadable TLS files stop us here
    except OSError as exc:  # ssl.SSLError included
        sys.stderr.write(f"error: TLS_CERTFILE/TLS_KEYFILE cannot be used: {exc}\n")
        raise SystemExit(2) from None
    try:
        trio.run(partial(run_server, settings, auth=auth, server_gc=True))
    except* StoreUnavailable as group:
        sys.stderr.write(f"error: the job store cannot be used: {_first_leaf(group)}\n")
        raise SystemExit(2) from None
    except* ListenError as group:
        # Exit code 1, not 2: the port may be free again soon (the previous process still
        # stopping, an address not assigned yet at boot), so a supervisor's restart may help.
        sys.stderr.write(f"error: {_first_leaf(group)}\n")
        raise SystemExit(1) from None
