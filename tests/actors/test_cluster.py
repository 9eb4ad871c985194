"""Cluster nodes (actors/cluster/) in one process on the real Redis, a fresh prefix per test.

Each node is a Supervisor with a ClusterNode on a store of its own (its own connections and node
id), as in a process of its own; tests/e2e/test_cluster.py runs real processes and kills them.
Real clock and sockets (a mock clock would fire the client's timeouts at once).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import coredis.exceptions
import pytest
import trio

import actors.cluster.node as node_module
import actors.supervisor as supervisor_module
import actors.tasks as tasks_module
from actors.cluster import ClusterNode, new_node_id, scripts
from actors.cluster.node import MAX_JOBS_PER_NODE
from actors.errors import JobNotFound, LimitExceeded, Overloaded, StoreUnavailable
from actors.messages import DoneEvent, ImageStatus, JobEvent, JobStatus, Transport
from actors.settings import SupervisorSettings
from actors.store import DeleteJob, commit
from actors.store.redis import RedisStore, open_client, open_redis_store
from actors.supervisor import Subscription, Supervisor, open_supervisor
from tests.actors.test_store import new_job
from tests.actors.test_store_redis import ended
from tests.fakes import FakeProvider, Script, never_runs
from tests.redis_support import REDIS_URL, dropped_connections, keys_under, proxied_redis

#: coredis 6.9.0 leaves the anyio memory streams of a connection it drops (a blocking read
#: cancelled as its node stops, or Redis going away) to the garbage collector; the warning says
#: nothing about the cluster. Collected at each node's end (below), so it stays in its test.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*MemoryObject(Receive|Send)Stream"
    ":pytest.PytestUnraisableExceptionWarning"
)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()  # the nodes' dropped connections, within this test's filter


LEASE_S = 0.6
SETTINGS = SupervisorSettings(max_streams_per_user=2000)
#: Bounds each wait of a test.
WAIT_S = 10


@asynccontextmanager
async def node(
    prefix: str,
    provider: FakeProvider,
    *,
    url: str = REDIS_URL,
    settings: SupervisorSettings = SETTINGS,
    max_jobs: int = MAX_JOBS_PER_NODE,
) -> AsyncIterator[Supervisor]:
    async with open_redis_store(url, prefix, node=new_node_id(), lease_s=LEASE_S) as store:
        cluster = ClusterNode(store, url=url, lease_s=LEASE_S, max_jobs=max_jobs)
        async with open_supervisor(provider, settings, store=store, cluster=cluster) as supervisor:
            yield supervisor
    gc.collect()


@asynccontextmanager
async def blocked_pair(
    prefix: str, settings: SupervisorSettings
) -> AsyncIterator[tuple[Supervisor, Supervisor]]:
    """Two nodes whose images never finish (their jobs stay unfinished)."""
    async with (
        node(prefix, blocked(), settings=settings) as a,
        node(prefix, blocked(), settings=settings) as b,
    ):
        yield a, b


def cluster_of(supervisor: Supervisor) -> ClusterNode:
    assert supervisor.cluster is not None
    return supervisor.cluster


async def poll(condition: Callable[[], Awaitable[bool]]) -> None:
    """Until ``condition()`` holds (Redis and other nodes have no event to wait on)."""
    with trio.fail_after(WAIT_S):
        while True:
            if await condition():
                return
            await trio.sleep(0.01)


async def held_by(supervisor: Supervisor, job_id: str) -> None:
    async def held() -> bool:
        await trio.lowlevel.checkpoint()
        return job_id in cluster_of(supervisor).held

    await poll(held)


async def no_longer_runs(supervisor: Supervisor, job_id: str) -> None:
    async def stopped() -> bool:
        await trio.lowlevel.checkpoint()
        return job_id not in supervisor._active

    await poll(stopped)


async def read_to_done(subscription: Subscription) -> list[JobEvent]:
    events: list[JobEvent] = []
    with trio.fail_after(WAIT_S):
        while not events or not isinstance(events[-1], DoneEvent):
            batch = await subscription.wait_events_after(
                events[-1].id if events else 0, timeout_s=1
            )
            events.extend(batch.events)
            assert not batch.ended or events, "ended without events"
    return events


def fast() -> FakeProvider:
    return FakeProvider(default=Script(latency_s=0.02))


def blocked() -> FakeProvider:
    return FakeProvider(default=Script(block=trio.Event()))


async def submit(supervisor: Supervisor, num_images: int = 3, **kwargs: str) -> str:
    snapshot, created = await supervisor.submit(
        owner="alice", prompt="a red fox", num_images=num_images, **kwargs
    )
    assert created
    return snapshot.job_id


# --- any node accepts, one node runs, every node streams ----------------------------------------


async def test_a_job_accepted_on_one_node_runs_once_and_streams_on_every_node(
    redis_prefix: str,
) -> None:
    providers = [fast(), fast()]
    async with node(redis_prefix, providers[0]) as a, node(redis_prefix, providers[1]) as b:
        job_id = await submit(a, 3)
        # a has room: it runs the job it accepted, held and running as the submission returns.
        assert job_id in cluster_of(a).held
        assert job_id in a._active
        with (
            await a.subscribe_job(job_id, owner="alice", transport=Transport.SSE) as on_a,
            await b.subscribe_job(job_id, owner="alice", transport=Transport.WEBSOCKET) as on_b,
        ):
            events_a = await read_to_done(on_a)
            events_b = await read_to_done(on_b)
        found = [await a.find(job_id, owner="alice"), await b.find(job_id, owner="alice")]
        statistics = [cluster_of(a).statistics(), cluster_of(b).statistics()]

    assert [event.id for event in events_b] == [1, 2, 3, 4]
    assert events_a == events_b
    assert [snapshot.status for snapshot in found] == [JobStatus.COMPLETED] * 2
    # Exactly one node ran it, without the queue: one provider call per image in all.
    assert [len(provider.calls) for provider in providers] == [3, 0]
    assert [(s["kept_total"], s["taken_total"]) for s in statistics] == [(1, 0), (0, 0)]


async def test_jobs_accepted_on_any_node_are_numbered_in_order_and_keep_their_numbers(
    redis_prefix: str,
) -> None:
    async with node(redis_prefix, fast()) as a, node(redis_prefix, fast()) as b:
        accepted = [await submit(on, 2) for on in (a, b, a)]
        for on, job_id in zip((a, b, a), accepted, strict=True):
            with await on.subscribe_job(job_id, owner="alice", transport=Transport.SSE) as events:
                await read_to_done(events)  # every later write of the job carries its seq
            await no_longer_runs(on, job_id)
        first, cursor = await b.find_page(owner="alice", limit=2)
        rest, end = await a.find_page(owner="alice", limit=2, before=cursor)
        stored = [await cluster_of(a).store.load_job(job_id, events=False) for job_id in accepted]

    assert [job.job.seq for job in stored if job is not None] == [1, 2, 3]
    assert [job.job.status for job in stored if job is not None] == [JobStatus.COMPLETED] * 3
    # Newest first, on either node, by the numbers the admissions gave.
    assert [snapshot.job_id for snapshot in (*first, *rest)] == accepted[::-1]
    assert (cursor, end) == (2, None)


async def test_a_node_without_room_or_draining_leaves_the_job_it_accepts_to_the_queue(
    redis_prefix: str,
) -> None:
    providers = [blocked(), fast()]
    # Room for 5 jobs, 4 of which are promised to a's read of the queue under way (TAKE_COUNT).
    assert node_module.TAKE_COUNT == 4
    async with (
        node(redis_prefix, providers[0], max_jobs=5) as a,
        node(redis_prefix, providers[1]) as b,
    ):
        first = await submit(a)
        second = await submit(a)  # through the queue: a node's read takes it (a's or b's)

        async def taken() -> bool:
            await trio.lowlevel.checkpoint()
            return second in cluster_of(a).held or second in cluster_of(b).held

        await poll(taken)
        cluster_of(a).stop_taking()
        third = await submit(a)
        await held_by(b, third)
        statistics = cluster_of(a).statistics(), cluster_of(b).statistics()

    assert [s["kept_total"] for s in statistics] == [1, 0]
    ran_on_a = {request.job_id for request in providers[0].calls}
    assert first in ran_on_a
    assert third not in ran_on_a


async def test_a_submission_cancelled_on_its_way_still_runs_the_job_its_admission_took(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_admit = RedisStore.admit

    async def answer_late(store: RedisStore, *args: Any, **kwargs: Any) -> Any:
        answer = await real_admit(store, *args, **kwargs)
        await trio.sleep(0.05)  # the answer on its way while the request is cancelled
        return answer

    monkeypatch.setattr(RedisStore, "admit", answer_late)
    async with node(redis_prefix, fast()) as a:
        with trio.move_on_after(0.02):  # the client went away
            await a.submit(owner="alice", prompt="a red fox", num_images=3)
        kept, held = cluster_of(a).kept, list(cluster_of(a).held)
        (job_id,) = held

        async def completed() -> bool:
            return (await a.find(job_id, owner="alice")).status is JobStatus.COMPLETED

        with trio.fail_after(LEASE_S / 2):  # not once a lease lapsed and another node claimed it
            await poll(completed)

    assert kept == 1


async def test_a_node_far_ahead_of_another_leaves_the_jobs_it_accepts_to_the_queue(
    redis_prefix: str,
) -> None:
    providers = [blocked(), blocked()]
    settings = SupervisorSettings(max_active_jobs_per_user=100)
    async with (
        node(redis_prefix, providers[0], settings=settings) as a,
        node(redis_prefix, providers[1], settings=settings) as b,
    ):

        async def takers_are(*nodes: Supervisor) -> None:
            async def renewed() -> bool:
                async with open_client(REDIS_URL) as client:
                    takers = await client.zrange(f"{redis_prefix}takers", 0, -1)
                return set(takers) == {cluster_of(n).node_id for n in nodes}

            await poll(renewed)

        await takers_are(a, b)  # both told the cluster they take jobs
        on_b = [await submit(b) for _ in range(3)]  # b keeps them (a runs none)
        jobs = [await submit(a) for _ in range(2 * 3 + node_module.KEEP_AHEAD + 2)]

        async def last_taken() -> bool:
            await trio.lowlevel.checkpoint()
            return jobs[-1] in cluster_of(a).held or jobs[-1] in cluster_of(b).held

        await poll(last_taken)  # from the queue, by whichever node read it first
        kept_while_b_took = cluster_of(a).kept
        cluster_of(b).stop_taking()  # draining: it no longer counts
        await takers_are(a)
        after = await submit(a)
        kept_after = cluster_of(a).kept
        held_after = after in cluster_of(a).held
        kept_by_b = cluster_of(b).kept

    # b ran 3: a kept jobs while it ran at most twice as many plus KEEP_AHEAD (8), 14: 15 of 16.
    assert (kept_by_b, len(on_b)) == (3, 3)
    assert kept_while_b_took == 2 * 3 + node_module.KEEP_AHEAD + 1
    assert (kept_after, held_after) == (2 * 3 + node_module.KEEP_AHEAD + 2, True)


async def test_a_job_accepted_while_the_node_starts_draining_is_handed_over(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    providers = [blocked(), fast()]
    async with node(redis_prefix, providers[0]) as a, node(redis_prefix, providers[1]) as b:
        real_admit = type(cluster_of(a).store).admit

        async def admit_then_drain(store: Any, *args: Any, **kwargs: Any) -> Any:
            answer = await real_admit(store, *args, **kwargs)
            if store is cluster_of(a).store:
                a.stop_admitting()  # SIGTERM while the admission was under way
            return answer

        monkeypatch.setattr(type(cluster_of(a).store), "admit", admit_then_drain)
        job_id = await submit(a)

        async def completed() -> bool:
            return (await b.find(job_id, owner="alice")).status is JobStatus.COMPLETED

        await poll(completed)
        kept = cluster_of(a).kept

    assert kept == 1  # it was taken here, and released at once for another node
    assert providers[0].calls == []


async def test_a_job_s_list_idempotency_key_and_user_limit_are_cluster_wide(
    redis_prefix: str,
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=2)
    async with blocked_pair(redis_prefix, settings) as (a, b):
        first = await submit(a, idempotency_key="k1")
        again, created = await b.submit(
            owner="alice", prompt="a red fox", num_images=3, idempotency_key="k1"
        )
        second = await submit(b)
        with pytest.raises(LimitExceeded):
            await submit(a)
        page, cursor = await b.find_page(owner="alice", limit=1)
        rest, end = await a.find_page(owner="alice", limit=5, before=cursor)
        with pytest.raises(JobNotFound):
            await b.find(first, owner="bob")

    assert (again.job_id, created) == (first, False)
    assert [snapshot.job_id for snapshot in page + rest] == [second, first]
    assert end is None


async def submit_at_once(
    nodes: tuple[Supervisor, ...], count: int
) -> tuple[list[str], list[LimitExceeded | Overloaded]]:
    """``count`` one-image submissions on each node, all at once: the jobs and the refusals."""
    admitted: list[str] = []
    refused: list[LimitExceeded | Overloaded] = []

    async def try_submit(supervisor: Supervisor) -> None:
        try:
            admitted.append(await submit(supervisor, 1))
        except (LimitExceeded, Overloaded) as exc:
            refused.append(exc)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                for supervisor in nodes:
                    nursery.start_soon(try_submit, supervisor)
    return admitted, refused


async def test_concurrent_submissions_on_two_nodes_never_pass_the_user_limit(
    redis_prefix: str,
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=3)
    async with blocked_pair(redis_prefix, settings) as (a, b):
        admitted, refused = await submit_at_once((a, b), 20)
        page, _ = await a.find_page(owner="alice", limit=50)

    assert len(admitted) == 3
    assert len(refused) == 37
    assert all(isinstance(exc, LimitExceeded) for exc in refused)
    assert len(page) == 3


async def test_queued_images_are_bounded_cluster_wide_and_freed_as_jobs_end(
    redis_prefix: str,
) -> None:
    settings = SupervisorSettings(max_active_jobs_per_user=100, max_queued_images=4)
    async with blocked_pair(redis_prefix, settings) as (a, b):
        admitted, refused = await submit_at_once((a, b), 10)
        assert a.cluster is not None
        assert b.cluster is not None
        counted = [await a.cluster.queued(), await b.cluster.queued()]
        with trio.fail_after(WAIT_S):
            await b.cancel_and_wait(admitted[0], owner="alice", timeout_s=WAIT_S)
        after_cancel = await a.cluster.queued()
        again = await submit(a, 1)

    assert len(admitted) == 4
    assert len(refused) == 16
    assert all(isinstance(exc, Overloaded) for exc in refused)
    assert str(refused[0]) == "The service is busy; try again shortly"
    assert refused[0].retry_after_s == settings.retry_after_s
    assert again not in admitted
    # Every node tells the cluster's count (what /api/status shows), not its own.
    assert counted == [{"jobs_unfinished": 4, "images_queued": 4}] * 2
    assert after_cancel == {"jobs_unfinished": 3, "images_queued": 3}


async def leave_a_dead_node_s_job(prefix: str) -> None:
    """What a node that took a 2-image job (``job-1``) and died leaves: the job, its entry
    taken, its lease."""
    async with open_redis_store(REDIS_URL, prefix, node="dead", lease_s=LEASE_S) as dead:
        assert await dead.admit(new_job(), max_active=10, max_queued_images=2) == (
            "admitted",
            None,
            1,
        )
        client = dead.client
        with contextlib.suppress(coredis.exceptions.StreamDuplicateConsumerGroupError):
            await client.xgroup_create(f"{prefix}queue", "nodes", "0", mkstream=True)
        await client.xreadgroup("nodes", "dead", streams={f"{prefix}queue": ">"})
        await client.set(f"{prefix}lease:job-1", "dead", px=round(LEASE_S * 1000))


async def test_a_dead_node_s_images_are_freed_once_another_node_ends_its_job(
    redis_prefix: str,
) -> None:
    settings = SupervisorSettings(max_queued_images=2)
    await leave_a_dead_node_s_job(redis_prefix)
    async with node(redis_prefix, fast(), settings=settings) as survivor:
        with pytest.raises(Overloaded):
            await submit(survivor, 1)

        async def completed() -> bool:
            snapshot = await survivor.find("job-1", owner="alice")
            return snapshot.status is JobStatus.COMPLETED

        await poll(completed)
        await submit(survivor, 2)


@dropped_connections
async def test_a_node_back_from_an_outage_claims_nothing_before_a_lease_of_contact(
    redis_prefix: str,
) -> None:
    # After an outage every entry is idle, those of nodes cut off with this one too: they must
    # have a lease to renew theirs before this node takes any for a dead node's.
    async with proxied_redis() as proxy, node(redis_prefix, fast(), url=proxy.url) as survivor:
        proxy.down()
        await leave_a_dead_node_s_job(redis_prefix)  # idle for the outage, as a live node's
        await trio.sleep(LEASE_S * 1.5)
        await proxy.up()
        back = trio.current_time()
        with trio.move_on_after(LEASE_S * 0.8):  # the claims come every half lease
            while True:
                assert cluster_of(survivor).claimed == 0
                await trio.sleep(0.01)

        async def completed() -> bool:
            snapshot = await survivor.find("job-1", owner="alice")
            return snapshot.status is JobStatus.COMPLETED

        await poll(completed)  # a lease on, the entry tells of a dead node: claimed
        assert cluster_of(survivor).claimed == 1
        assert trio.current_time() - back >= LEASE_S


async def test_a_dead_node_s_job_behind_many_live_entries_is_claimed(redis_prefix: str) -> None:
    # One XAUTOCLAIM looks at no more than ten times its count of pending entries: the claims go
    # on from where the last stopped, so a dead node's entry behind 250 live ones is reached.
    queue = f"{redis_prefix}queue"
    async with open_client(REDIS_URL) as client, trio.open_nursery() as nursery:
        live = [str(await client.xadd(queue, {"job": f"live-{n}"})) for n in range(250)]
        await client.xgroup_create(queue, "nodes", "0", mkstream=True)
        await client.xreadgroup("nodes", "live", streams={queue: ">"})

        async def renew_live_entries() -> None:  # as a live node's renewals do
            while True:
                await client.xclaim(queue, "nodes", "live", 0, live, justid=True)
                await trio.sleep(LEASE_S / 6)

        nursery.start_soon(renew_live_entries)
        await leave_a_dead_node_s_job(redis_prefix)
        async with node(redis_prefix, fast()) as survivor:

            async def completed() -> bool:
                snapshot = await survivor.find("job-1", owner="alice")
                return snapshot.status is JobStatus.COMPLETED

            await poll(completed)
            assert cluster_of(survivor).claimed == 1
        nursery.cancel_scope.cancel()


@dropped_connections
async def test_a_claim_answered_late_is_not_used_and_its_job_is_claimed_a_lease_later(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim whose answer comes later than a third of a lease (Redis stalled) may have taken
    # the entries of nodes that were stalled with it, not dead: it is dropped.
    await leave_a_dead_node_s_job(redis_prefix)
    async with node(redis_prefix, fast()) as survivor:
        client = cluster_of(survivor).store.client
        claim = client.xautoclaim
        claimed_at_redis = trio.Event()

        async def answered_late(*args: Any, **kwargs: Any) -> Any:
            answer = await claim(*args, **kwargs)
            if answer[1] and not claimed_at_redis.is_set():
                claimed_at_redis.set()
                await trio.sleep(LEASE_S / 2)
            return answer

        monkeypatch.setattr(client, "xautoclaim", answered_late)
        with trio.fail_after(WAIT_S):
            await claimed_at_redis.wait()
        await trio.sleep(LEASE_S * 0.75)  # the late answer would have been used by now
        assert cluster_of(survivor).claimed == 0

        async def completed() -> bool:
            snapshot = await survivor.find("job-1", owner="alice")
            return snapshot.status is JobStatus.COMPLETED

        await poll(completed)
        assert cluster_of(survivor).claimed == 1


@dropped_connections
async def test_a_stream_opened_on_the_job_s_node_while_redis_is_down_gets_its_events(
    redis_prefix: str,
) -> None:
    # The node running the job has its events in memory: a stream opened there during an
    # outage starts (with what the job published) and goes on once Redis is back.
    release = trio.Event()
    provider = FakeProvider(scripts={0: Script(latency_s=0)}, default=Script(block=release))
    async with proxied_redis() as proxy, node(redis_prefix, provider, url=proxy.url) as runner:
        job_id = await submit(runner, 2)
        await held_by(runner, job_id)

        async def first_image_stored() -> bool:
            snapshot = await runner.find(job_id, owner="alice")
            return snapshot.images[0].status is ImageStatus.COMPLETED

        await poll(first_image_stored)
        proxy.down()
        with await runner.subscribe_job(job_id, owner="alice", transport=Transport.SSE) as sub:
            first = await sub.wait_events_after(0, timeout_s=1)
            release.set()  # the rest of the job is stored, and published, once Redis is back
            await proxy.up()
            events = await read_to_done(sub)

    assert [event.id for event in first.events] == [1]
    assert [event.id for event in events] == [1, 2, 3]


async def test_a_cancel_on_another_node_stops_the_job_where_it_runs(redis_prefix: str) -> None:
    runner_provider = blocked()
    async with node(redis_prefix, runner_provider) as runner:
        job_id = await submit(runner)
        await held_by(runner, job_id)
        async with node(redis_prefix, fast()) as other:
            with trio.fail_after(WAIT_S):
                snapshot = await other.cancel_and_wait(job_id, owner="alice", timeout_s=WAIT_S)

    assert snapshot.status is JobStatus.CANCELED
    assert sorted(runner_provider.remote_cancels) == [(job_id, index) for index in range(3)]


async def test_a_cancel_of_a_dead_node_s_job_ends_it_once_its_lease_lapses(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClusterNode, "_claim_jobs", never_runs)  # only the cancel takes it
    await leave_a_dead_node_s_job(redis_prefix)  # its lease lapses a lease from now
    async with node(redis_prefix, fast()) as survivor:
        snapshot = await survivor.cancel_and_wait("job-1", owner="alice", timeout_s=1.5)

    assert snapshot.status is JobStatus.CANCELED


async def test_a_cancel_whose_caller_goes_away_still_ends_the_queued_job_it_took(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ClusterNode, "_take_jobs", never_runs)  # the job stays queued
    monkeypatch.setattr(ClusterNode, "_claim_jobs", never_runs)
    real_start = Supervisor._start_taken

    async def slow_start(self: Supervisor, job_id: str, cancelled: bool) -> bool:
        await trio.sleep(0.2)  # a slow read of the job: the DELETE's client leaves meanwhile
        return await real_start(self, job_id, cancelled)

    monkeypatch.setattr(Supervisor, "_start_taken", slow_start)
    async with node(redis_prefix, fast()) as a:
        job_id = await submit(a)
        with trio.move_on_after(0.1):
            await a.cancel_and_wait(job_id, owner="alice", timeout_s=WAIT_S)

        async def canceled() -> bool:
            snapshot = await a.find(job_id, owner="alice")
            return snapshot.status is JobStatus.CANCELED

        await poll(canceled)  # not held here for ever with nothing running it


async def test_a_job_cancelled_while_queued_ends_at_once_and_leaves_the_queue(
    redis_prefix: str,
) -> None:
    providers = [blocked(), blocked()]
    async with (
        node(redis_prefix, providers[0], max_jobs=1) as a,
        node(redis_prefix, providers[1], max_jobs=1) as b,
    ):
        running = [await submit(a), await submit(b)]

        async def both_full() -> bool:
            await trio.lowlevel.checkpoint()
            return len(cluster_of(a).held) + len(cluster_of(b).held) == 2

        await poll(both_full)
        queued = await submit(a)  # no node has room for it
        with await b.subscribe_job(queued, owner="alice", transport=Transport.SSE) as on_b:
            with trio.fail_after(2):  # far less than a lease: nothing waits for a node's room
                snapshot = await a.cancel_and_wait(queued, owner="alice", timeout_s=WAIT_S)
                events = await read_to_done(on_b)
        async with open_client(REDIS_URL) as client:
            entries = await client.xrange(f"{redis_prefix}queue")
        ran = {request.job_id for provider in providers for request in provider.calls}

    assert snapshot.status is JobStatus.CANCELED
    assert [image.status for image in snapshot.images] == [ImageStatus.CANCELED] * 3
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.status is JobStatus.CANCELED
    assert sorted(entry.field_values["job"] for entry in entries) == sorted(running)
    assert queued not in ran


async def test_an_event_a_node_cannot_read_ends_that_job_s_streams_there_only(
    redis_prefix: str,
) -> None:
    async with node(redis_prefix, blocked()) as runner:
        broken, other = await submit(runner), await submit(runner)
        await held_by(runner, broken)
        await held_by(runner, other)
        async with node(redis_prefix, fast()) as b:  # it follows both from Redis
            with (
                await b.subscribe_job(broken, owner="alice", transport=Transport.SSE) as on_broken,
                await b.subscribe_job(other, owner="alice", transport=Transport.SSE) as on_other,
            ):
                async with open_client(REDIS_URL) as client:  # not an event this release wrote
                    await client.xadd(
                        f"{redis_prefix}job:{broken}:events", {"e": "{}"}, identifier="1-0"
                    )
                with trio.fail_after(WAIT_S):
                    batch = await on_broken.wait_events_after(0, timeout_s=WAIT_S)
                    while not batch.ended:
                        batch = await on_broken.wait_events_after(0, timeout_s=WAIT_S)
                await runner.cancel_and_wait(other, owner="alice", timeout_s=WAIT_S)
                events = await read_to_done(on_other)  # the reader goes on for other jobs
            statistics = cluster_of(b).statistics()

    assert batch.events == ()
    done = events[-1]
    assert isinstance(done, DoneEvent)
    assert done.status is JobStatus.CANCELED
    assert statistics["events_error"] is None


@dropped_connections
async def test_a_node_s_task_that_fails_is_logged_counted_and_started_again(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tasks_module, "RETRY_S", (0.05, 0.05))
    real_claim = ClusterNode._claim
    failures = iter([RuntimeError("an answer this release cannot read")])

    async def claim_failing_once(self: ClusterNode, start: str) -> Any:
        for failure in failures:
            raise failure
        return await real_claim(self, start)

    monkeypatch.setattr(ClusterNode, "_claim", claim_failing_once)
    await leave_a_dead_node_s_job(redis_prefix)
    async with node(redis_prefix, fast()) as survivor:

        async def completed() -> bool:
            snapshot = await survivor.find("job-1", owner="alice")
            return snapshot.status is JobStatus.COMPLETED

        await poll(completed)  # claimed once the takeover started again
        statistics = cluster_of(survivor).statistics()

    assert statistics["task_failures_total"] == 1
    assert statistics["last_task_failure"] == (
        "cluster's takeover: RuntimeError('an answer this release cannot read')"
    )
    assert statistics["claimed_total"] == 1


# --- takeover, fencing, draining ------------------------------------------------------------------


async def test_a_node_that_lost_its_lease_stops_the_job_without_writing(redis_prefix: str) -> None:
    provider = FakeProvider(default=Script(block=trio.Event(), latency_s=0))
    async with node(redis_prefix, provider) as a:
        job_id = await submit(a)
        await held_by(a, job_id)
        # Another node took the job while this one could not renew (cut off from Redis).
        async with open_client(REDIS_URL) as client:
            await client.set(f"{redis_prefix}lease:{job_id}", "elsewhere", px=60_000)
        assert provider.default.block is not None
        provider.default.block.set()  # the images finish; their write is fenced

        await no_longer_runs(a, job_id)
        stored = await cluster_of(a).store.load_job(job_id)

    assert stored is not None
    assert not stored.job.status.finished
    assert stored.events == ()
    assert provider.remote_cancels == []  # the predictions are the new holder's to resume


@pytest.mark.parametrize("via", ["renewal", "write"])
async def test_a_node_whose_lease_lapsed_does_not_take_back_a_job_ended_elsewhere(
    redis_prefix: str, via: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if via == "write":
        # No renewal comes before the images' write (as when Redis is back and the write
        # goes first).
        monkeypatch.setattr(ClusterNode, "_keep_leases", never_runs)
    provider = FakeProvider(default=Script(block=trio.Event(), latency_s=0))
    async with node(redis_prefix, provider) as a:
        job_id = await submit(a)
        await held_by(a, job_id)
        # What this node finds once back from being cut off for longer than a lease: its lease
        # lapsed, and another node took the job over and ended it (a cancel, say).
        entry = cluster_of(a).held[job_id]
        async with open_client(REDIS_URL) as client:
            await client.delete([f"{redis_prefix}lease:{job_id}"])
            await client.hset(f"{redis_prefix}job:{job_id}:record", {"status": "canceled"})
            # ... and let go of it, as a node ending a job does (the RELEASE script).
            await client.xack(f"{redis_prefix}queue", "nodes", [entry])
            await client.xdel(f"{redis_prefix}queue", [entry])
            await client.hdel(f"{redis_prefix}entries", [job_id])
        if via == "write":
            assert provider.default.block is not None
            provider.default.block.set()  # the images finish; their write is fenced

        await no_longer_runs(a, job_id)
        async with open_client(REDIS_URL) as client:
            assert await client.get(f"{redis_prefix}lease:{job_id}") is None
            # Not queued again (a hand-over's entry of an ended job is dropped by its taker).
            assert not await client.hexists(f"{redis_prefix}entries", job_id)
        stored = await cluster_of(a).store.load_job(job_id)

    assert stored is not None
    assert stored.job.status is JobStatus.CANCELED  # as the other node left it
    assert stored.events == ()


@pytest.mark.parametrize(
    ("meanwhile", "kept"),
    [("ended here", True), ("ended elsewhere", False), ("deleted", False), ("lost", True)],
)
async def test_a_lapsed_lease_is_renewed_unless_another_node_ended_or_deleted_the_job(
    redis_prefix: str, meanwhile: str, kept: bool
) -> None:
    # The renewal of a node back from being cut off for longer than a lease.
    lease_key = f"{redis_prefix}lease:job-1"
    async with (
        open_redis_store(REDIS_URL, redis_prefix, node="node-a") as here,
        open_redis_store(REDIS_URL, redis_prefix, node="node-b") as elsewhere,
        open_client(REDIS_URL) as client,
    ):
        await commit(here, *new_job())
        entry = await client.hget(f"{redis_prefix}entries", "job-1")
        if meanwhile == "ended here":  # its answer lost: the node still runs the job
            await commit(here, ended())
        elif meanwhile == "lost":  # Redis restarted without it (no persistence)
            await client.delete(list(await keys_under(redis_prefix)))
        else:
            await client.set(lease_key, "node-b")
            await commit(
                elsewhere, ended(), *([DeleteJob("job-1")] if meanwhile == "deleted" else [])
            )
        await client.delete([lease_key])

        renew = client.register_script(scripts.RENEW)
        answer: Any = await renew(
            keys=[], args=[redis_prefix, "node-a", "60000", "1", "job-1", entry or "0-1"]
        )
        lost = list(answer[0])
        held = await client.get(lease_key)

    assert (lost, held) == (([], "node-a") if kept else (["job-1"], None))


async def test_a_draining_node_hands_its_jobs_over_at_once(redis_prefix: str) -> None:
    draining_provider = blocked()
    survivor_provider = fast()
    async with node(redis_prefix, draining_provider) as draining:
        job_id = await submit(draining)
        await held_by(draining, job_id)
        async with node(redis_prefix, survivor_provider) as survivor:
            with trio.fail_after(2):  # not the job's time: it never ends on this node
                await draining.drain(grace_s=60)

            async def completed() -> bool:
                snapshot = await survivor.find(job_id, owner="alice")
                return snapshot.status is JobStatus.COMPLETED

            await poll(completed)

    assert draining_provider.remote_cancels == []
    assert len(survivor_provider.calls) == 3


async def test_finished_jobs_are_forgotten_cluster_wide(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "CLUSTER_EXPIRE_S", 0.05)
    settings = SupervisorSettings(job_retention_s=0.2)
    async with node(redis_prefix, fast(), settings=settings) as a:
        job_id = await submit(a)
        async with node(redis_prefix, fast(), settings=settings) as b:
            with trio.fail_after(WAIT_S):
                while True:
                    try:
                        await b.find(job_id, owner="alice")
                    except JobNotFound:
                        break
                    await trio.sleep(0.05)
    # Remembered as deleted, so that no node cut off meanwhile writes it back.
    assert f"{redis_prefix}gone:{job_id}" in await keys_under(redis_prefix)


async def test_a_retention_pass_that_fails_is_counted_and_retention_goes_on(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "CLUSTER_EXPIRE_S", 0.05)
    monkeypatch.setattr(tasks_module, "RETRY_S", (0.05, 0.05))
    real_expired = ClusterNode.expired
    failures = iter([RuntimeError("an answer this release cannot read")])

    async def expired_failing_once(self: ClusterNode, **kwargs: Any) -> Any:
        for failure in failures:
            raise failure
        return await real_expired(self, **kwargs)

    monkeypatch.setattr(ClusterNode, "expired", expired_failing_once)
    async with node(redis_prefix, fast(), settings=SupervisorSettings(job_retention_s=0.2)) as a:
        job_id = await submit(a)

        async def forgotten() -> bool:
            try:
                await a.find(job_id, owner="alice")
            except JobNotFound:
                return True
            return False

        await poll(forgotten)
        statistics = a.statistics()

    assert statistics.tasks_failed_total == 1
    assert a.failures.last == (
        "supervisor's cluster retention: RuntimeError('an answer this release cannot read')"
    )


async def test_consumers_of_gone_nodes_are_removed_but_not_ones_with_pending_entries(
    redis_prefix: str,
) -> None:
    queue = f"{redis_prefix}queue"
    async with open_client(REDIS_URL) as client:
        await client.xgroup_create(queue, "nodes", "0", mkstream=True)
        await client.xgroup_createconsumer(queue, "nodes", "gone")
        await client.xadd(queue, {"job": "a-job-of-the-dead"})  # pending until claimed
        await client.xreadgroup("nodes", "dead-with-work", streams={queue: ">"})
    async with node(redis_prefix, fast()) as live:
        cluster = cluster_of(live)
        client = cluster.store.client
        await client.xgroup_createconsumer(queue, "nodes", cluster.node_id)  # idle too
        kept_while_recent = await cluster.forget_idle_consumers(idle_s=3600)
        removed = await cluster.forget_idle_consumers(idle_s=0)
        left = {info["name"] for info in await client.xinfo_consumers(queue, "nodes")}

    assert kept_while_recent == []
    assert removed == ["gone"]
    assert left == {"dead-with-work", cluster.node_id}


async def test_every_node_removes_gone_nodes_now_and_then(
    redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "CONSUMER_SWEEP_S", 0.05)
    monkeypatch.setattr(node_module, "CONSUMER_IDLE_S", 0)
    queue = f"{redis_prefix}queue"
    async with node(redis_prefix, fast()) as live:
        client = cluster_of(live).store.client
        await client.xgroup_createconsumer(queue, "nodes", "gone")

        async def forgotten() -> bool:
            infos = await client.xinfo_consumers(queue, "nodes")
            return "gone" not in {info["name"] for info in infos}

        await poll(forgotten)


# --- one reader per node -------------------------------------------------------------------------


async def test_a_thousand_subscribers_on_a_node_cost_it_one_reader(redis_prefix: str) -> None:
    provider = FakeProvider(default=Script(block=trio.Event(), latency_s=0))
    async with node(redis_prefix, provider) as runner:
        job_id = await submit(runner, 5)
        await held_by(runner, job_id)
        async with node(redis_prefix, fast()) as other:
            follower = cluster_of(other).follower
            assert follower is not None
            subscriptions = [
                await other.subscribe_job(job_id, owner="alice", transport=Transport.SSE)
                for _ in range(1000)
            ]
            reads = follower.reads
            assert provider.default.block is not None
            provider.default.block.set()
            seen: list[list[JobEvent]] = []
            async with trio.open_nursery() as nursery:
                for subscription in subscriptions:
                    nursery.start_soon(_collect, subscription, seen)
            reads = follower.reads - reads
            for subscription in subscriptions:
                subscription.close()
            followed = follower.followed

    assert len(seen) == 1000
    assert all([event.id for event in events] == [1, 2, 3, 4, 5, 6] for events in seen)
    assert reads <= 6 + 2  # a read per event at most (and the wake-ups), not per subscriber
    assert followed == 0


async def _collect(subscription: Subscription, seen: list[list[JobEvent]]) -> None:
    seen.append(await read_to_done(subscription))


# --- the image directory's budget: the bytes each node writes, counted in Redis ---------------


async def test_image_bytes_are_counted_once_even_when_an_answer_is_lost(
    redis_prefix: str,
) -> None:
    async with open_redis_store(REDIS_URL, redis_prefix, node=new_node_id()) as store:
        await store.admit(new_job(), max_active=10, max_queued_images=10)
        cluster = ClusterNode(store, url=REDIS_URL, lease_s=LEASE_S)
        added = cluster._add_bytes
        calls = 0

        async def answer_lost(**kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            answer: Any = await added(**kwargs)
            if calls == 1:
                raise coredis.exceptions.ConnectionError("the answer was lost")
            return answer

        cluster._add_bytes = answer_lost  # type: ignore[assignment]
        cluster.note_bytes("job-1", 70)
        with pytest.raises(StoreUnavailable):
            await cluster.flush_bytes()
        cluster.note_bytes("job-1", 30)
        await cluster.flush_bytes()  # the lost batch again (added once), then the new bytes
        await cluster.flush_bytes()  # nothing left

        async with open_client(REDIS_URL) as client:
            counted = await client.hget(f"{redis_prefix}bytes", "job-1")
            total = await client.get(f"{redis_prefix}bytes_total")
    assert (calls, counted, total) == (3, "100", "100")


async def test_a_file_written_for_a_job_forgotten_meanwhile_is_deleted(redis_prefix: str) -> None:
    async with open_redis_store(REDIS_URL, redis_prefix, node=new_node_id()) as store:
        await store.admit(new_job(), max_active=10, max_queued_images=10)
        cluster = ClusterNode(store, url=REDIS_URL, lease_s=LEASE_S)
        forgotten: list[str] = []
        cluster.on_forgotten_files = forgotten.append
        cluster.note_bytes("job-1", 70)
        cluster.note_bytes("job-gone", 70)  # another node forgot it while this one copied
        await cluster.flush_bytes()

        async with open_client(REDIS_URL) as client:
            counted = await client.hgetall(f"{redis_prefix}bytes")
    assert forgotten == ["job-gone"]
    assert counted == {"job-1": "70"}
