"""Copies behind on a cluster (actors/cluster/ + actors/files.py), on the real Redis: a copy one
node makes is found by every node, and a job taken over carries on the copies it left pending.

Nodes share one images directory, as ``IMAGES_DIR`` must be shared by the nodes of a cluster.
Real clock (Redis has no virtual time); the provider's outputs come through
``httpx.MockTransport``, held until released.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from actors import supervisor as supervisor_module
from actors.cluster import ClusterNode, new_node_id, node as node_module
from actors.files import ImageFilesSettings, open_image_files
from actors.messages import ImageCopy, Transport
from actors.settings import SupervisorSettings
from actors.store.redis import open_redis_store
from actors.supervisor import Supervisor, open_supervisor
from tests.actors.test_cluster import poll, read_to_done
from tests.actors.test_copy_behind import URL, Origin
from tests.fake_replicate import PNG
from tests.fakes import FakeProvider, Script
from tests.redis_support import REDIS_URL

# coredis 6.9.0 leaves the anyio streams of a dropped connection to the garbage collector.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*MemoryObject(Receive|Send)Stream"
    ":pytest.PytestUnraisableExceptionWarning"
)

LEASE_S = 0.6
WAIT_S = 10


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    yield
    gc.collect()


@asynccontextmanager
async def node(
    prefix: str, directory: Path, origin: Origin, *, max_total_bytes: int = 5 * 1024**3
) -> AsyncIterator[Supervisor]:
    settings = ImageFilesSettings(
        directory=directory, download_attempts=2, max_total_bytes=max_total_bytes
    )
    async with (
        httpx.AsyncClient(transport=httpx.MockTransport(origin.handle)) as client,
        open_image_files(settings, client=client) as files,
        open_redis_store(REDIS_URL, prefix, node=new_node_id(), lease_s=LEASE_S) as store,
        open_supervisor(
            FakeProvider(default=Script(latency_s=0.02, url=URL)),
            SupervisorSettings(),
            store=store,
            files=files,
            cluster=ClusterNode(store, url=REDIS_URL, lease_s=LEASE_S),
        ) as supervisor,
    ):
        yield supervisor
    gc.collect()


async def finished_job(supervisor: Supervisor) -> str:
    snapshot, _ = await supervisor.submit(owner="alice", prompt="a red fox", num_images=1)
    with await supervisor.subscribe_job(
        snapshot.job_id, owner="alice", transport=Transport.SSE
    ) as subscription:
        await read_to_done(subscription)
    return snapshot.job_id


async def test_every_node_redirects_to_a_copy_pending_on_another_then_serves_the_file(
    redis_prefix: str, tmp_path: Path
) -> None:
    directory = tmp_path / "images"
    origin = Origin(hold=trio.Event())
    async with node(redis_prefix, directory, origin) as a:
        job_id = await finished_job(a)
        name = f"{job_id}-0.png"
        pending = ImageCopy(
            job_id=job_id, index=0, name=name, source=URL.format(job_id=job_id, index=0)
        )
        assert a.files is not None
        async with node(redis_prefix, directory, Origin()) as b:
            assert b.files is not None
            assert b.files.locate(name) is None  # not b's own copy
            assert await b.locate_copy(name) == pending  # found in the store
            assert await b.locate_copy(f"{job_id}-7.png") is None
            assert await b.locate_copy("not-a-copy") is None

            origin.release()
            with trio.fail_after(WAIT_S):
                await a.files.wait_copies()
            assert (directory / name).is_file()
            assert await b.locate_copy(name) is None  # on disk: served by any node


async def test_the_image_directory_s_budget_holds_for_the_files_of_every_node(
    redis_prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "CLUSTER_EXPIRE_S", 0.05)
    monkeypatch.setattr(node_module, "BYTES_FLUSH_S", 0.05)
    directory = tmp_path / "images"
    budget = 2 * len(PNG) + len(PNG) // 2  # the files of two jobs fit, three do not
    async with (
        node(redis_prefix, directory, Origin(), max_total_bytes=budget) as a,
        node(redis_prefix, directory, Origin(), max_total_bytes=budget) as b,
    ):
        assert a.files is not None
        assert b.files is not None
        jobs = []
        for supervisor in (a, b, a, b):  # whichever node runs each, one after the other
            jobs.append(await finished_job(supervisor))
            with trio.fail_after(WAIT_S):
                await a.files.wait_copies()
                await b.files.wait_copies()

        async def two_newest_left() -> bool:
            await trio.lowlevel.checkpoint()
            return {path.name for path in directory.iterdir()} == {
                f"{job_id}-0.png" for job_id in jobs[2:]
            }

        await poll(two_newest_left)
        store = a.cluster.store if a.cluster is not None else None
        assert store is not None
        # Forgotten in the store (a node may still answer a finished job from memory a while).
        assert [await store.load_job(job_id, events=False) is None for job_id in jobs] == [
            True,
            True,
            False,
            False,
        ]
