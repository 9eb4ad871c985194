"""What only the Redis store promises, against the real Redis (tests/redis_support.py).

The store contract (tests/actors/test_store.py) runs on Redis too. Real clock and real sockets
(a mock clock would fire the client's timeouts at once); a test that takes Redis away does it
with a proxy of its own, never by stopping the shared server.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

import actors.store.redis as redis_backend
from actors.errors import StoreUnavailable
from actors.messages import JobStatus
from actors.store import AppendEvent, DeleteJob, PutImages, PutJob, SetRemote, commit
from actors.store.redis import RedisStore, open_client, open_redis_store
from tests.actors.test_store import (
    LATER,
    PENDING,
    image,
    job_record,
    new_job,
    only_job,
    progress,
)
from tests.redis_support import REDIS_URL, RedisProxy, dropped_connections, keys_under


@pytest.fixture
def prefix(redis_prefix: str) -> str:
    return redis_prefix


@pytest.fixture
async def store(prefix: str) -> AsyncIterator[RedisStore]:
    async with open_redis_store(REDIS_URL, prefix) as opened:
        yield opened


async def redis_get(key: str) -> str | None:
    async with open_client(REDIS_URL) as client:
        return await client.get(key)


async def redis_set(key: str, value: str, *, px: int | None = None) -> None:
    async with open_client(REDIS_URL) as client:
        await client.set(key, value, px=px)


# --- the key layout ------------------------------------------------------------------------------


async def test_keys_follow_the_documented_layout(store: RedisStore, prefix: str) -> None:
    await commit(
        store, *new_job(), AppendEvent("job-1", progress(1, 0)), SetRemote("job-1", 0, "p", None)
    )

    assert await keys_under(prefix) == {
        f"{prefix}{name}"
        for name in (
            "seq",
            "jobs",
            "job:job-1:record",
            "job:job-1:images",
            "job:job-1:remote",
            "job:job-1:events",
            "user:alice:jobs",
            "user:alice:idem",
            "user:alice:active",
            "active",
            "active_images",
        )
    }
    async with open_client(REDIS_URL) as client:
        entries = await client.xrange(f"{prefix}job:job-1:events")
        assert [entry.identifier for entry in entries] == ["1-0"]  # Last-Event-ID 1 = 1-0
        assert await client.zrange(f"{prefix}user:alice:jobs", 0, -1) == ("job-1",)
        assert await client.hget(f"{prefix}user:alice:idem", "key-job-1") == "job-1"
        assert await client.get(f"{prefix}seq") == "1"


async def test_deleting_every_job_leaves_only_seq(store: RedisStore, prefix: str) -> None:
    for job_id, seq in (("job-1", 1), ("job-2", 2)):
        await commit(
            store,
            *new_job(job_id, seq),
            AppendEvent(job_id, progress(1, 0)),
            SetRemote(job_id, 0, None, PENDING),
        )

    await commit(store, DeleteJob("job-1"), DeleteJob("job-2"))

    assert await keys_under(prefix) == {f"{prefix}seq"}
    assert await redis_get(f"{prefix}seq") == "2"  # never goes back: a seq is not reused


async def test_jobs_load_in_chunks_in_seq_order(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "LOAD_CHUNK", 2)
    await commit(store, *(op for n in (5, 3, 1, 4, 2) for op in new_job(f"job-{n}", n)))

    assert [stored.job.seq for stored in await store.load()] == [1, 2, 3, 4, 5]


# --- batches -------------------------------------------------------------------------------------


async def test_a_batch_that_fails_half_way_writes_nothing(store: RedisStore, prefix: str) -> None:
    await commit(store, *new_job("job-2", 2))
    # A key under the prefix that is not what the store keeps there: writing job-2's images
    # would fail after job-1 was written (Redis has no rollback), were the batch not checked
    # whole first.
    await redis_set(f"{prefix}job:job-2:images", "not a hash")

    with pytest.raises(
        StoreUnavailable, match="job-2:images holds a string, not a hash"
    ) as refused:
        await commit(store, *new_job("job-1", 1), PutImages("job-2", (image("job-2", 0),)))

    assert refused.value.refused
    assert not {f"{prefix}job:job-1:record", f"{prefix}job:job-1:images"} & await keys_under(prefix)
    async with open_client(REDIS_URL) as client:
        assert await client.zrange(f"{prefix}jobs", 0, -1) == ("job-2",)
        assert await client.get(f"{prefix}seq") == "2"


async def test_a_refused_write_in_a_batch_fails_only_its_own_commit(store: RedisStore) -> None:
    good_job = store.write(*new_job())
    orphan = store.write(AppendEvent("no-such-job", progress(1, 0)))
    good_event = store.write(AppendEvent("job-1", progress(1, 0)))

    await good_job.wait()
    with pytest.raises(StoreUnavailable, match="no job no-such-job"):
        await orphan.wait()
    await good_event.wait()

    assert (await only_job(store)).events == (progress(1, 0),)
    assert (await store.check()).ok
    stats = store.statistics()
    assert (stats["commits"], stats["failed_commits"], stats["error"]) == (2, 1, None)


async def test_an_idempotency_key_of_another_job_is_refused(store: RedisStore) -> None:
    await commit(store, PutJob(job_record("old", 1, idempotency_key="k")))

    with pytest.raises(StoreUnavailable, match="idempotency key k of alice is job old's"):
        await commit(store, PutJob(job_record("new", 2, idempotency_key="k")))

    # Another user's key of the same name is another key.
    await commit(store, PutJob(job_record("bobs", 3, idempotency_key="k", owner="bob")))
    assert [stored.job.job_id for stored in await store.load()] == ["old", "bobs"]


async def test_an_event_older_than_the_last_one_stored_is_refused(store: RedisStore) -> None:
    await commit(store, *new_job(), AppendEvent("job-1", progress(2, 1)))

    with pytest.raises(StoreUnavailable, match="event 1 of job job-1 comes after event 2"):
        await commit(store, AppendEvent("job-1", progress(1, 0)))

    assert [event.id for event in (await only_job(store)).events] == [2]


# --- a cluster node's store: writes fenced by the job's lease -----------------------------------


@pytest.fixture
async def node_store(prefix: str) -> AsyncIterator[RedisStore]:
    async with open_redis_store(REDIS_URL, prefix, node="node-a") as opened:
        yield opened


async def test_a_new_job_goes_into_the_job_queue_with_its_first_write(
    node_store: RedisStore, prefix: str
) -> None:
    await commit(node_store, *new_job())
    await commit(node_store, AppendEvent("job-1", progress(1, 0)))  # not a new job: not queued

    async with open_client(REDIS_URL) as client:
        entries = await client.xrange(f"{prefix}queue")
    assert [dict(entry.field_values) for entry in entries] == [{"job": "job-1"}]
    assert await redis_get(f"{prefix}lease:job-1") == "node-a"  # a free lease is taken


async def test_a_job_another_node_holds_is_fenced_and_fails_alone(
    node_store: RedisStore, prefix: str
) -> None:
    await commit(node_store, *new_job("job-1", 1), *new_job("job-2", 2))
    await redis_set(f"{prefix}lease:job-1", "node-b", px=60_000)

    fenced = node_store.write(AppendEvent("job-1", progress(1, 0)))
    other = node_store.write(AppendEvent("job-2", progress(1, 0)))
    await other.wait()
    with pytest.raises(StoreUnavailable, match="job job-1 is run by another node") as caught:
        await fenced.wait()

    assert caught.value.fenced
    assert caught.value.refused
    events = {stored.job.job_id: stored.events for stored in await node_store.load()}
    assert events == {"job-1": (), "job-2": (progress(1, 0),)}


async def read_queue(prefix: str, node: str, count: int = 1) -> list[str]:
    """What ``node`` takes from the job queue now."""
    async with open_client(REDIS_URL) as client:
        read: Any = await client.xreadgroup(
            "nodes", node, streams={f"{prefix}queue": ">"}, count=count
        )
    return [str(entry.field_values["job"]) for entry in (read or {}).get(f"{prefix}queue", [])]


async def admit(store: RedisStore, job_id: str, seq: int) -> str:
    outcome, _, _ = await store.admit(
        new_job(job_id, seq), max_active=100, max_queued_images=1000, take=4
    )
    return outcome


async def queue_entries(prefix: str, *, node: str) -> tuple[list[str], list[str]]:
    """The job queue's entries (their jobs), and those pending in ``node``'s name."""
    async with open_client(REDIS_URL) as client:
        entries = await client.xrange(f"{prefix}queue")
        pending: Any = await client.xpending(
            f"{prefix}queue", "nodes", start="-", end="+", count=100, consumer=node
        )
    by_id = {str(entry.identifier): str(entry.field_values["job"]) for entry in entries}
    return list(by_id.values()), [by_id[str(row.identifier)] for row in pending]


async def test_a_node_with_room_takes_the_job_it_admits_in_the_same_call(
    node_store: RedisStore, prefix: str
) -> None:
    async with open_client(REDIS_URL) as client:
        await client.xgroup_create(f"{prefix}queue", "nodes", "0", mkstream=True)
    outcome, entry, seq = await node_store.admit(
        new_job("job-1"), max_active=10, max_queued_images=100, take=4
    )

    async with open_client(REDIS_URL) as client:
        entries = await client.xrange(f"{prefix}queue")
    assert (outcome, entry, seq) == ("taken", str(entries[0].identifier), 1)
    assert await queue_entries(prefix, node="node-a") == (["job-1"], ["job-1"])
    assert await redis_get(f"{prefix}lease:job-1") == "node-a"
    assert [stored.job.job_id for stored in await node_store.load()] == ["job-1"]


async def test_a_job_admitted_while_others_wait_for_a_node_queues_behind_them(
    node_store: RedisStore, prefix: str
) -> None:
    async with open_client(REDIS_URL) as client:
        await client.xgroup_create(f"{prefix}queue", "nodes", "0", mkstream=True)
    assert await node_store.admit(new_job("job-1"), max_active=10, max_queued_images=100) == (
        "admitted",
        None,
        1,
    )
    assert await node_store.admit(
        new_job("job-2", 2), max_active=10, max_queued_images=100, take=4
    ) == ("admitted", None, 2)

    # Both wait for any node with room, in the order they came.
    assert await queue_entries(prefix, node="node-a") == (["job-1", "job-2"], [])
    assert await redis_get(f"{prefix}lease:job-2") is None
    assert await read_queue(prefix, "node-b") == ["job-1"]
    # Once no entry waits, the next job the node admits is its own again.
    assert await admit(node_store, "job-3", 3) == "admitted"
    assert await read_queue(prefix, "node-b", count=5) == ["job-2", "job-3"]
    assert await admit(node_store, "job-4", 4) == "taken"
    assert (await queue_entries(prefix, node="node-a"))[1] == ["job-4"]


async def test_an_admission_numbers_the_new_job_in_its_own_call(
    node_store: RedisStore, prefix: str
) -> None:
    async def admit_unnumbered(job_id: str, max_active: int = 10) -> tuple[str, str | None, int]:
        return await node_store.admit(
            new_job(job_id, seq=0), max_active=max_active, max_queued_images=100
        )

    await redis_set(f"{prefix}seq", "41")  # (seqs other nodes gave)
    first = await admit_unnumbered("job-1")
    refused = await admit_unnumbered("job-2", max_active=1)  # alice has one unfinished job
    second = await admit_unnumbered("job-3")

    assert first == ("admitted", None, 42)
    assert refused == ("limit", "1", 0)  # nothing written, no seq used
    assert second == ("admitted", None, 43)
    stored = {job.job.job_id: job.job.seq for job in await node_store.load()}
    assert stored == {"job-1": 42, "job-3": 43}
    # Listed newest first by the seqs given.
    jobs, _ = await node_store.load_page("alice", limit=10)
    assert [job.job.job_id for job in jobs] == ["job-3", "job-1"]
    assert await redis_get(f"{prefix}seq") == "43"


async def test_an_admission_that_cannot_number_the_new_job_writes_nothing(
    node_store: RedisStore, prefix: str
) -> None:
    await redis_set(f"{prefix}seq", "not a number")  # (a foreign value under the prefix)

    with pytest.raises(StoreUnavailable, match="not an integer"):
        await node_store.admit(new_job("job-1", seq=0), max_active=10, max_queued_images=100)

    assert await node_store.load() == ()
    assert await keys_under(prefix) == {f"{prefix}seq"}


async def test_an_admission_that_cannot_decide_where_the_job_runs_writes_nothing(
    node_store: RedisStore, prefix: str
) -> None:
    await redis_set(f"{prefix}takers", "not a zset")  # (a foreign key under the prefix)

    with pytest.raises(StoreUnavailable, match="takers holds a string") as caught:
        await admit(node_store, "job-1", 1)

    assert caught.value.refused
    assert await node_store.load() == ()
    assert await keys_under(prefix) == {f"{prefix}takers"}


async def test_a_node_takes_nothing_from_a_queue_redis_lost(
    node_store: RedisStore, prefix: str
) -> None:
    # No consumer group (Redis restarted without persistence; the nodes make it again).
    outcome, _, _ = await node_store.admit(
        new_job("job-1"), max_active=10, max_queued_images=100, take=4
    )

    assert outcome == "admitted"
    assert await redis_get(f"{prefix}lease:job-1") is None


def ended(job_id: str = "job-1") -> PutJob:
    return PutJob(job_record(job_id, status=JobStatus.COMPLETED, finished_at=LATER))


async def test_a_lapsed_lease_of_a_job_another_node_ended_is_not_taken_again(
    node_store: RedisStore, prefix: str
) -> None:
    # This node was cut off for longer than a lease; another node took the job over and ended it.
    await commit(node_store, *new_job())
    async with open_redis_store(REDIS_URL, prefix, node="node-b") as other:
        await redis_set(f"{prefix}lease:job-1", "node-b", px=60_000)
        await commit(other, ended())
    async with open_client(REDIS_URL) as client:
        await client.delete([f"{prefix}lease:job-1"])

    with pytest.raises(StoreUnavailable) as caught:
        await commit(node_store, AppendEvent("job-1", progress(1, 0)))

    assert caught.value.fenced
    assert await redis_get(f"{prefix}lease:job-1") is None
    assert (await only_job(node_store)).events == ()


async def test_a_node_s_own_end_is_written_again_after_its_lease_lapsed(
    node_store: RedisStore, prefix: str
) -> None:
    # Its end reached Redis but the answer was lost, and it was cut off for longer than a lease:
    # the write is sent again.
    await commit(node_store, *new_job(), ended())
    async with open_client(REDIS_URL) as client:
        await client.delete([f"{prefix}lease:job-1"])

    await commit(node_store, ended(), AppendEvent("job-1", progress(1, 0)))

    assert (await only_job(node_store)).events == (progress(1, 0),)
    assert await redis_get(f"{prefix}lease:job-1") is None  # an ended job's lease is not taken
    with pytest.raises(StoreUnavailable) as reopened:  # nor is the job running again
        await commit(node_store, PutJob(job_record()))
    assert reopened.value.fenced
    async with open_redis_store(REDIS_URL, prefix, node="node-b") as other:
        async with open_client(REDIS_URL) as client:
            await client.delete([f"{prefix}lease:job-1"])
        with pytest.raises(StoreUnavailable) as caught:
            await commit(other, AppendEvent("job-1", progress(2, 1)))
    assert caught.value.fenced


async def test_a_job_a_node_deleted_is_not_written_back_by_a_node_cut_off_meanwhile(
    node_store: RedisStore, prefix: str
) -> None:
    await commit(node_store, *new_job())
    async with open_redis_store(REDIS_URL, prefix, node="node-b") as other:
        await commit(other, ended(), DeleteJob("job-1"))  # taken over, ended, forgotten

    for write in (PutJob(job_record()), AppendEvent("job-1", progress(1, 0))):
        with pytest.raises(StoreUnavailable) as caught:
            await commit(node_store, write)
        assert caught.value.fenced

    assert await node_store.load() == ()
    assert await keys_under(prefix) >= {f"{prefix}gone:job-1"}
    assert not {key for key in await keys_under(prefix) if key.startswith(f"{prefix}job:job-1")}


async def test_a_job_redis_lost_without_a_trace_is_written_again_by_its_node(
    node_store: RedisStore, prefix: str
) -> None:
    # Redis restarted without the job (no persistence): the node running it carries on.
    await commit(node_store, *new_job())
    async with open_client(REDIS_URL) as client:
        await client.delete(list(await keys_under(prefix)))

    await commit(node_store, PutJob(job_record()), AppendEvent("job-1", progress(1, 0)))

    assert (await only_job(node_store)).events == (progress(1, 0),)


async def test_a_store_used_alone_fences_nothing(store: RedisStore, prefix: str) -> None:
    await commit(store, *new_job())
    await redis_set(f"{prefix}lease:job-1", "node-b", px=60_000)

    await commit(store, AppendEvent("job-1", progress(1, 0)))

    assert (await only_job(store)).events == (progress(1, 0),)
    assert f"{prefix}queue" not in await keys_under(prefix)


# --- Redis down, hanging, and back -------------------------------------------------------------


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> AsyncIterator[RedisProxy]:
    proxy = RedisProxy()
    await nursery.start(proxy.run)
    yield proxy
    # The dropped connections' leftovers warn now, in this test (marked), not in a later one.
    gc.collect()


@dropped_connections
async def test_redis_down_fails_writes_and_checks_then_the_store_recovers_by_itself(
    proxy: RedisProxy, prefix: str
) -> None:
    async with open_redis_store(proxy.url, prefix) as store:
        await commit(store, *new_job())

        proxy.down()
        with pytest.raises(StoreUnavailable, match=rf"Redis at {proxy.url}") as failed:
            await commit(store, AppendEvent("job-1", progress(1, 0)))
        down = await store.check()
        stats = store.statistics()

        await proxy.up()
        with trio.fail_after(10):
            up = await store.check()  # its own write proves writes work again
        await commit(store, AppendEvent("job-1", progress(1, 0)))
        stored = await only_job(store)

    assert not failed.value.refused  # a job waits and tries again
    assert not down.ok
    assert down.detail.startswith(f"Redis at {proxy.url}")
    assert stats["error"] == str(failed.value)
    assert (up.ok, up.detail) == (True, "ok")
    assert stored.events == (progress(1, 0),)
    assert store.statistics()["error"] is None


@dropped_connections
async def test_a_redis_that_hangs_fails_each_call_within_its_bound(
    proxy: RedisProxy, prefix: str
) -> None:
    async with open_redis_store(proxy.url, prefix) as store:
        store.call_timeout_s = store.health_timeout_s = 0.3
        await commit(store, *new_job())

        proxy.stall()
        with trio.fail_after(5):
            with pytest.raises(StoreUnavailable, match=r"did not answer a write within 0\.3 s"):
                await commit(store, AppendEvent("job-1", progress(1, 0)))
            health = await store.check()
        await proxy.up()
        # A connection that timed out half-read must not be used again for another answer.
        with trio.fail_after(10):
            recovered = await store.check()
        await commit(store, AppendEvent("job-1", progress(1, 0)))
        stored = await only_job(store)

    assert not health.ok
    assert health.detail.startswith(f"Redis at {proxy.url} ")
    assert (recovered.ok, recovered.detail) == (True, "ok")
    assert stored.events == (progress(1, 0),)


@dropped_connections
async def test_connections_that_went_silent_are_dropped_and_new_ones_work(
    proxy: RedisProxy, prefix: str
) -> None:
    async with open_redis_store(proxy.url, prefix) as store:
        store.call_timeout_s = store.health_timeout_s = 0.3
        await commit(store, *new_job())

        proxy.blackhole()  # the open connections hang for good, new ones would answer
        with trio.fail_after(5), pytest.raises(StoreUnavailable, match="did not answer"):
            await commit(store, AppendEvent("job-1", progress(1, 0)))
        with trio.fail_after(5):
            health = await store.check()
        await commit(store, AppendEvent("job-1", progress(1, 0)))
        stored = await only_job(store)

    assert (health.ok, health.detail) == (True, "ok")
    assert stored.events == (progress(1, 0),)


@dropped_connections
async def test_calls_whose_callers_go_away_while_a_connection_opens_leave_the_client_working(
    proxy: RedisProxy, prefix: str
) -> None:
    # coredis 6.9.0 loses a pool slot to each call cancelled while it opens a connection (its
    # handshake); a pool of 2 would then be empty for good. Clients that go away mid-call (a
    # stream's request cancelled) must not wedge the process: the calls run to their own end.
    async with open_redis_store(f"{proxy.url}?max_connections=2", prefix) as store:
        store.call_timeout_s = 0.3
        await commit(store, *new_job())
        proxy.stall()
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await store.load_job("job-1")  # its connection is dropped: the next calls open one
        for _ in range(4):
            with trio.move_on_after(0.05):  # the caller goes away during the handshake
                await store.load_job("job-1")
        await proxy.up()
        with trio.fail_after(5):
            loaded = await store.load_job("job-1")

    assert loaded is not None


@dropped_connections
async def test_an_unreachable_redis_refuses_to_open_the_store(
    proxy: RedisProxy, prefix: str
) -> None:
    proxy.down()

    with pytest.raises(StoreUnavailable, match=rf"Redis at {proxy.url} failed PING"):
        async with open_redis_store(proxy.url, prefix):
            pytest.fail("opened without Redis")


async def test_the_url_is_shown_without_its_password() -> None:
    assert (
        redis_backend.redacted("redis://user:secret@redis.internal:6380/2")
        == "redis://user:***@redis.internal:6380/2"
    )
    assert redis_backend.redacted("redis://:secret@h/0") == "redis://***@h/0"
    assert redis_backend.redacted("redis://h:6379/0") == "redis://h:6379/0"


async def test_the_store_is_a_resumable_redis_store(store: RedisStore, prefix: str) -> None:
    stats = store.statistics()

    assert (store.name, store.resumable) == ("redis", True)
    assert (stats["backend"], stats["url"], stats["prefix"]) == ("redis", REDIS_URL, prefix)


async def test_a_flush_before_handing_jobs_over_writes_their_held_writes(
    store: RedisStore,
) -> None:
    await commit(store, *new_job(), SetRemote("job-1", 0, None, PENDING))
    held = store.write_with_next(SetRemote("job-1", 0, "pred-0", None))
    assert not held.settled

    await store.flush()  # the node hands its jobs over: no write of theirs comes after

    assert [held.settled] == [True]
    (remote,) = (await only_job(store)).remote
    assert (remote.remote_id, remote.pending_since) == ("pred-0", None)
