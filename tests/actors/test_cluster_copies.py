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

from actors.cluster import ClusterNode, new_node_id
from actors.files import ImageFilesSettings, open_image_files
from actors.messages import ImageCopy, Transport
from actors.settings import SupervisorSettings
from actors.store.redis import open_redis_store
from actors.supervisor import Supervisor, open_supervisor
from tests.actors.test_cluster import read_to_done
from tests.actors.test_copy_behind import URL, Origin
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
async def node(prefix: str, directory: Path, origin: Origin) -> AsyncIterator[Supervisor]:
    settings = ImageFilesSettings(directory=directory, download_attempts=2)
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
