"""Live events: Server-Sent Events and WebSocket, fed by one subscription loop."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import AsyncIterator

import attrs
import trio
from quart import Blueprint, Response, request, websocket
from quart_cors import cors_exempt

from actors.errors import JobNotFound, LimitExceeded, StoreUnavailable
from actors.messages import DoneEvent, JobEvent, Transport
from actors.supervisor import Batch, Subscription
from web.auth import authenticate
from web.context import current_user, state, url_maker
from web.errors import APIError
from web.schemas import UrlMaker, event_payload, event_type
from web.sse import encode_comment, encode_event, encode_retry, parse_last_event_id

logger = logging.getLogger(__name__)

blueprint = Blueprint("stream", __name__)

WS_NORMAL = 1000
WS_POLICY_VIOLATION = 1008
WS_SERVICE_RESTART = 1012
WS_TRY_AGAIN_LATER = 1013
WS_NOT_FOUND = 4404


@attrs.define(eq=False)
class Follower:
    """One subscriber's position in a job's log: the loop that both transports share.

    ``next_batch`` answers new events (and moves the cursor past them), or an empty batch that
    says why there are none: the log ended, the service is stopping, or it is time for a
    heartbeat.
    """

    subscription: Subscription
    cursor: int
    heartbeat_s: float
    done: bool = False

    async def next_batch(self) -> Batch:
        batch = await self.subscription.wait_events_after(self.cursor, timeout_s=self.heartbeat_s)
        if batch.events:
            self.cursor = batch.events[-1].id
            self.done = isinstance(batch.events[-1], DoneEvent)
        return batch


def _resume_cursor(header: str | None, query: str | None) -> int:
    # A browser's reconnect sends the header; it wins over the URL's own query.
    return parse_last_event_id(header if header is not None else query)


# An event goes to every subscriber of its job: encode it once per (event, public base URL), not
# once per subscriber. Events are frozen and hashable; the caches are bounded.
_ENCODED_EVENTS = 4096


@functools.lru_cache(maxsize=_ENCODED_EVENTS)
def _sse_chunk(event: JobEvent, base: str) -> bytes:
    return encode_event(event.id, event_type(event), event_payload(event, UrlMaker(base)))


@functools.lru_cache(maxsize=_ENCODED_EVENTS)
def _ws_frame(event: JobEvent, base: str) -> str:
    frame = {
        "type": event_type(event),
        "id": event.id,
        "payload": event_payload(event, UrlMaker(base)),
    }
    return json.dumps(frame)


@blueprint.get("/api/generate/<job_id>/stream")
async def stream_sse(job_id: str) -> Response:
    """The job's events as ``text/event-stream``: replay, then live, then ``done`` and the end."""
    app_state = state()
    user = current_user(allow_query_token=True)
    supervisor = app_state.supervisor
    job = await supervisor.find(job_id, owner=user)
    cursor = _resume_cursor(request.headers.get("Last-Event-ID"), request.args.get("last_event_id"))
    # A finished job's log holds one event per image and ``done``: nothing after that id.
    if job.status.finished and cursor >= job.num_images + 1:
        return Response("", status=204)
    # Over the user's stream cap: 429 now. The stream itself is counted only once its body runs
    # (whose ``finally`` is then sure to release it), so that a response never sent leaks none.
    supervisor.check_subscriber(owner=user, transport=Transport.SSE)
    absolute = url_maker(request.scheme, request.host)
    settings = app_state.settings

    async def body() -> AsyncIterator[bytes]:
        # The one sanctioned async generator: no nursery, cancel scope or ``with`` around a
        # yield, sync clean-up in ``finally``; Quart aclose()s it when the client goes away.
        try:
            subscription = await supervisor.subscribe_job(
                job_id, owner=user, transport=Transport.SSE
            )
        except (JobNotFound, LimitExceeded, StoreUnavailable):
            # Forgotten, or the user's other streams took the room, or the store failed, between
            # the checks above and now: the stream just ends (a browser reconnecting then gets
            # the 404, 429 or 503).
            return
        try:
            yield encode_retry(settings.sse_retry_ms)
            follower = Follower(subscription, cursor, settings.heartbeat_s)
            while not follower.done:
                batch = await follower.next_batch()
                if batch.events:
                    yield b"".join(_sse_chunk(event, absolute.base) for event in batch.events)
                elif batch.ended or batch.stopping:
                    return
                else:
                    yield encode_comment("ping")
        finally:
            subscription.close()

    response = Response(
        body(),
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        },
    )
    response.timeout = None  # Quart's RESPONSE_TIMEOUT (60 s) would cut the stream
    return response


async def _close(code: int, reason: str) -> None:
    try:
        await websocket.close(code, reason)
    except (trio.BrokenResourceError, trio.BusyResourceError, trio.ClosedResourceError):
        # The client closed at the same moment (e.g. right after ``done``): nothing to tell it.
        logger.debug("websocket already closed by the client")


@blueprint.websocket("/api/generate/<job_id>")
# No Origin check: the socket is authorised by a bearer token, not by ambient cookies, so a
# foreign page gains nothing, and native clients (wscat, mobile apps) send no browser Origin.
@cors_exempt
async def stream_ws(job_id: str) -> None:
    """The job's events as WebSocket text frames; closes 1000 after ``done``.

    Close codes: 1008 bad or missing token, or too many open streams (the reason says which);
    4404 unknown job; 1012 server stopping; 1013 the job store cannot be read now.
    """
    app_state = state()
    supervisor = app_state.supervisor
    await websocket.accept()
    try:
        user = authenticate(
            app_state.auth, websocket.headers.get("Authorization"), websocket.args.get("token")
        )
    except APIError as exc:
        await _close(WS_POLICY_VIOLATION, str(exc.detail))
        return
    cursor = parse_last_event_id(websocket.args.get("last_event_id"))
    absolute = url_maker(websocket.scheme, websocket.host)
    try:
        with await supervisor.subscribe_job(
            job_id, owner=user, transport=Transport.WEBSOCKET
        ) as subscription:
            follower = Follower(subscription, cursor, app_state.settings.heartbeat_s)
            while not follower.done:
                batch = await follower.next_batch()
                for event in batch.events:
                    await websocket.send(_ws_frame(event, absolute.base))
                if batch.stopping:
                    await _close(WS_SERVICE_RESTART, "Server shutting down")
                    return
                if batch.ended:
                    break
    except JobNotFound:
        await _close(WS_NOT_FOUND, "Job not found")
        return
    except LimitExceeded as exc:
        await _close(WS_POLICY_VIOLATION, str(exc))
        return
    except StoreUnavailable:
        # The job's events cannot be read now (its store is down): the client tries again.
        await _close(WS_TRY_AGAIN_LATER, "The job store is unavailable; try again")
        return
    await _close(WS_NORMAL, "Job finished")
