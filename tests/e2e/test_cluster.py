"""Three ``python -m web`` nodes on one ``REDIS_PREFIX`` of the real Redis, against the fake
Replicate (tests/fake_replicate.py): any node accepts, exactly one node runs, every node streams.

A job is created on node A and followed over SSE on B and over WebSocket on C; the node running
it is killed with SIGKILL (or drained with SIGTERM); a survivor carries it on (after its lease
lapses, or at once when handed over), each image's prediction resumed by id. A follower whose
node died reconnects to a survivor with ``Last-Event-ID`` / ``last_event_id``. Real clock, real
sockets; the token comes from a login on A only (every node checks it alike).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from tests.e2e.replicate_service import replicate_environ
from tests.e2e.service_clients import (
    Event,
    Service,
    get_json,
    http,
    open_sse,
    service,
    submit_job,
    token,
)
from tests.e2e.test_server import open_ws
from tests.fake_replicate import FakeReplicate, run_fake_replicate
from tests.redis_support import REDIS_URL, RedisProxy

#: Bounds the whole of one test (three starts, a takeover, the job's end).
TEST_S = 60
NUM_IMAGES = 5


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=3.0)
    async with run_fake_replicate(fake):
        yield fake


def cluster_environ(fake: FakeReplicate, prefix: str) -> dict[str, str]:
    return replicate_environ(
        fake,
        STORE="redis",
        REDIS_URL=REDIS_URL,
        REDIS_PREFIX=prefix,
        JOB_LEASE_S="1",
        REPLICATE_WAIT_S="1",
        HEARTBEAT_S="1",
    )


@asynccontextmanager
async def three_nodes(tmp_path: Path, environ: dict[str, str]) -> AsyncIterator[list[Service]]:
    """Nodes A, B and C (one work directory: one shared IMAGES_DIR); killed on exit."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(service(tmp_path, environ, name=name))
            for name in ("a", "b", "c")
        ]


class Cluster:
    """The nodes, which of them are gone, and a client of any node with A's token."""

    def __init__(self, nodes: list[Service], bearer: str) -> None:
        self.nodes = nodes
        self.bearer = bearer
        self.gone: set[str] = set()

    def alive(self, preferred: Service) -> Service:
        if preferred.url not in self.gone:
            return preferred
        return next(node for node in self.nodes if node.url not in self.gone)

    def client(self, node: Service) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.bearer}"}
        return httpx.AsyncClient(base_url=node.url, headers=headers, timeout=10)

    async def runner(self, job_id: str) -> Service:
        """The node that holds the job's lease (per its own ``/api/status``)."""
        with trio.fail_after(10):
            while True:
                for node in self.nodes:
                    if node.url in self.gone:
                        continue
                    async with self.client(node) as client:
                        status = await get_json(client, "/api/status")
                    if job_id in status["cluster"]["jobs_held"]:
                        return node
                await trio.sleep(0.05)


async def follow_sse(cluster: Cluster, node: Service, job_id: str, seen: list[Event]) -> None:
    """Every event of the job, over SSE, reconnecting to a live node after its last id."""
    reconnects = 0
    while True:
        async with cluster.client(cluster.alive(node)) as client:
            try:
                last = seen[-1].id if seen else None
                async with open_sse(client, job_id, last_event_id=last) as events:
                    while (event := await events.next()) is not None:
                        seen.append(event)
                        if event.type == "done":
                            assert await events.next() is None  # the server ends the response
                            return
            except* httpx.TransportError:
                pass  # the node died under the stream
        reconnects += 1
        assert reconnects < 20
        await trio.sleep(0.1)


async def follow_ws(cluster: Cluster, node: Service, job_id: str, seen: list[Event]) -> None:
    """Every event of the job, over WebSocket, reconnecting to a live node after its last id."""
    reconnects = 0
    while True:
        live = cluster.alive(node)
        query = f"token={cluster.bearer}"
        if seen:
            query += f"&last_event_id={seen[-1].id}"
        try:
            async with open_ws(live.ws_url(f"/api/generate/{job_id}?{query}")) as ws:
                while True:
                    frame = json.loads(await ws.get_message())
                    seen.append(Event(frame["id"], frame["type"], frame["payload"]))
                    if frame["type"] == "done":
                        return
        except* (ConnectionClosed, HandshakeError, OSError, trio.BrokenResourceError):
            pass  # the node died (1006) or is stopping (1012)
        reconnects += 1
        assert reconnects < 20
        await trio.sleep(0.1)


def start_followers(
    nursery: trio.Nursery, cluster: Cluster, job_id: str, *, sse: Service, ws: Service
) -> tuple[list[Event], list[Event]]:
    """An SSE follower on ``sse`` and a WebSocket one on ``ws``: the events each will see."""
    sse_seen: list[Event] = []
    ws_seen: list[Event] = []
    nursery.start_soon(follow_sse, cluster, sse, job_id, sse_seen)
    nursery.start_soon(follow_ws, cluster, ws, job_id, ws_seen)
    return sse_seen, ws_seen


async def poll(condition: Callable[[], bool]) -> None:
    """Until ``condition()`` holds (it depends on other tasks' reads of other processes)."""
    while True:
        if condition():
            return
        await trio.sleep(0.05)


def check_once_each(events: list[Event]) -> None:
    assert [event.id for event in events] == list(range(1, NUM_IMAGES + 2)), events
    assert sorted(event.data["index"] for event in events[:-1]) == list(range(NUM_IMAGES))
    done = events[-1]
    assert done.type == "done"
    assert (done.data["status"], done.data["completed_count"]) == ("completed", NUM_IMAGES)


async def run_takeover(
    tmp_path: Path, fake: FakeReplicate, prefix: str, *, stop: str
) -> tuple[list[Event], list[Event], dict[str, object]]:
    """Create on A, follow on B (SSE) and C (WebSocket), stop the runner ``stop``-wise once
    every prediction exists; the followers' events and the job as a survivor answers it."""
    async with three_nodes(tmp_path, cluster_environ(fake, prefix)) as nodes:
        a, b, c = nodes
        async with http(a) as client_a:
            cluster = Cluster(nodes, token(client_a))
            job_id = await submit_job(client_a, NUM_IMAGES)
        with trio.fail_after(TEST_S):
            async with trio.open_nursery() as nursery:
                sse_seen, ws_seen = start_followers(nursery, cluster, job_id, sse=b, ws=c)
                runner = await cluster.runner(job_id)
                await fake.wait_for_predictions(NUM_IMAGES)
                await trio.sleep(0.3)  # the ids are journaled (else they are reconciled)
                cluster.gone.add(runner.url)
                if stop == "kill":
                    await runner.kill()
                else:
                    assert await runner.terminate() == 0
            survivor = cluster.alive(a)
            async with cluster.client(survivor) as client:
                job = await get_json(client, f"/api/generate/{job_id}")
        for node in nodes:
            if node.url not in cluster.gone:
                assert "Traceback" not in node.stderr(), node.stderr()
    return sse_seen, ws_seen, job


@pytest.mark.parametrize("stop", ["kill", "term"])
async def test_the_running_node_stops_and_a_survivor_completes_the_job_each_event_seen_once(
    tmp_path: Path, fake: FakeReplicate, redis_prefix: str, stop: str
) -> None:
    # kill: SIGKILL, a survivor claims the job once its lease lapses; term: SIGTERM drains the
    # node, which hands the job over at once without waiting for it.
    sse_seen, ws_seen, job = await run_takeover(tmp_path, fake, redis_prefix, stop=stop)

    check_once_each(sse_seen)
    check_once_each(ws_seen)
    assert [e.without_origin() for e in sse_seen] == [e.without_origin() for e in ws_seen]
    assert job["status"] == "completed"
    # One prediction per image: the survivor resumed each by id, none was created again.
    assert (fake.create_requests, len(fake.predictions)) == (NUM_IMAGES, NUM_IMAGES)


# --- Redis trouble ---------------------------------------------------------------------------


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> RedisProxy:
    proxy = RedisProxy()
    await nursery.start(proxy.run)
    return proxy


async def test_while_redis_is_away_a_node_says_so_and_its_streams_wait_then_go_on(
    tmp_path: Path, redis_prefix: str, proxy: RedisProxy
) -> None:
    environ = {
        "STORE": "redis",
        "REDIS_URL": proxy.url,
        "REDIS_PREFIX": redis_prefix,
        "JOB_LEASE_S": "1",
        "HEARTBEAT_S": "0.5",
        "MAX_CONCURRENCY": "1",
        "LOCAL_LATENCY_MS": "700-700",
    }
    async with service(tmp_path, environ, name="a") as node, http(node) as client:
        cluster = Cluster([node], token(client))
        job_id = await submit_job(client, NUM_IMAGES)
        with trio.fail_after(TEST_S):
            async with trio.open_nursery() as nursery:
                seen, ws_seen = start_followers(nursery, cluster, job_id, sse=node, ws=node)
                await poll(lambda: bool(seen and ws_seen))
                proxy.down()
                health = await client.get("/health")
                status = await client.get("/api/status")
                refused = await client.post(
                    "/api/generate", json={"prompt": "a red fox", "num_images": NUM_IMAGES}
                )
                # A job this node does not follow yet cannot be read: the client is told to
                # come back (the streams already open go on, waiting).
                query = f"token={cluster.bearer}"
                other = "00000000-0000-4000-8000-000000000000"
                async with open_ws(node.ws_url(f"/api/generate/{other}?{query}")) as ws:
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                await trio.sleep(2)  # images end meanwhile: the job waits to store them
                await proxy.up()
            after = await client.get("/health")
        stderr = node.stderr()

    assert health.status_code == 503
    assert "Redis" in health.json()["checks"]["store"]
    # The node's own view still answers; the cluster's counts are unknown for now.
    assert status.status_code == 200
    assert status.json()["cluster"]["images_queued"] is None
    assert refused.status_code == 503
    assert refused.json()["detail"] == "The service cannot store jobs right now; try again shortly"
    assert closed.value.reason is not None
    assert closed.value.reason.code == 1013
    check_once_each(seen)
    check_once_each(ws_seen)
    assert after.status_code == 200
    assert "Traceback" not in stderr
