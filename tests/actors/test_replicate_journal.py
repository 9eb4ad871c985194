"""The Replicate provider's journal in the job store, and resuming from it after a restart.

Against the fake Replicate server on a real socket (real clock), with a ``MemoryStore`` behind
``StoreJournal`` as the journal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import trio
import trio.testing
from quart import request

from actors.errors import (
    NotStartedError,
    PermanentProviderError,
    StoreUnavailable,
    TransientProviderError,
)
from actors.messages import ImageStatus, JobStatus
from actors.providers.base import ImageRequest
from actors.providers.replicate import ReplicateProvider, open_replicate_provider
from actors.settings import SupervisorSettings
from actors.store import (
    Commit,
    DeleteJob,
    JobRecord,
    JobStore,
    MemoryStore,
    PutJob,
    RemoteWork,
    SetRemote,
    commit,
)
from actors.store.journal import StoreJournal
from actors.store.redis import RedisStore, open_client, open_redis_store
from actors.supervisor import open_supervisor
from tests.actors.test_replicate import settings_for
from tests.fake_replicate import TOKEN, FakeReplicate, run_fake_replicate
from tests.redis_support import REDIS_URL, keys_under

JOB = "job-1"
PROMPT = "a red fox"


def image(index: int = 0, attempt: int = 1, pending_since: datetime | None = None) -> ImageRequest:
    return ImageRequest(
        job_id=JOB, index=index, prompt=PROMPT, attempt=attempt, pending_since=pending_since
    )


async def generate(provider: ReplicateProvider, request: ImageRequest) -> str:
    with trio.fail_after(10):
        return await provider.generate(request)


async def with_job(store: JobStore, job_id: str = JOB) -> None:
    """Write the job the journal's notes belong to (SQLite and Redis would insist on it)."""
    record = JobRecord(
        job_id=job_id,
        seq=1,
        owner="alice",
        prompt=PROMPT,
        num_images=2,
        idempotency_key=None,
        status=JobStatus.RUNNING,
        created_at=datetime.now(UTC),
    )
    await commit(store, PutJob(record))


async def store_with_job() -> MemoryStore:
    """A store holding the job the journal's notes belong to."""
    store = MemoryStore(resumable=True)
    await with_job(store)
    return store


async def journal_of(store: JobStore) -> dict[int, tuple[str | None, datetime | None]]:
    return {work.index: (work.remote_id, work.pending_since) for work in await remote_work(store)}


async def remote_work(store: JobStore) -> list[RemoteWork]:
    """The journal of job ``JOB`` (the store may hold others)."""
    (stored,) = [job for job in await store.load() if job.job.job_id == JOB]
    return list(stored.remote)


async def create_directly(fake: FakeReplicate, prompt: str = PROMPT) -> str:
    """A prediction made through the fake's own API, not by the provider (an earlier process)."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=fake.base_url, headers=headers) as client:
        response = await client.post(
            "/v1/models/black-forest-labs/flux-schnell/predictions",
            json={"input": {"prompt": prompt}},
        )
    response.raise_for_status()
    prediction_id = response.json()["id"]
    assert isinstance(prediction_id, str)
    return prediction_id


@pytest.fixture
async def fake() -> AsyncIterator[FakeReplicate]:
    fake = FakeReplicate(latency_s=0.05)
    async with run_fake_replicate(fake):
        yield fake


class RecordingJournal(StoreJournal):
    """Every note in order, then stored as ``StoreJournal`` does."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.notes: list[tuple[int, str | None, datetime | None]] = []

    def note(
        self,
        job_id: str,
        index: int,
        *,
        remote_id: str | None,
        pending_since: datetime | None,
        with_image: bool = False,
    ) -> Commit:
        self.notes.append((index, remote_id, pending_since))
        return super().note(
            job_id, index, remote_id=remote_id, pending_since=pending_since, with_image=with_image
        )


class HeldJournal(StoreJournal):
    """Notes reach the store at once but count as stored only after :meth:`release`."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__(store)
        self.held: list[Commit] = []
        #: Each note's ``with_image``, in order.
        self.with_image: list[bool] = []
        self.noted = trio.Event()

    def note(
        self,
        job_id: str,
        index: int,
        *,
        remote_id: str | None,
        pending_since: datetime | None,
        with_image: bool = False,
    ) -> Commit:
        super().note(
            job_id, index, remote_id=remote_id, pending_since=pending_since, with_image=with_image
        )
        self.with_image.append(with_image)
        held = Commit()
        self.held.append(held)
        self.noted.set()
        return held

    def release(self) -> None:
        for held in self.held:
            if not held.settled:
                held.settle()


# --- journaling --------------------------------------------------------------------------------


async def test_a_create_is_journaled_as_pending_before_it_reaches_replicate() -> None:
    fake = FakeReplicate(latency_s=0.05)
    store = await store_with_job()
    seen_by_the_create: list[dict[int, tuple[str | None, datetime | None]]] = []

    @fake.app.before_request
    async def look_at_the_journal() -> None:
        if request.method == "POST" and request.path.endswith("/predictions"):
            seen_by_the_create.append(await journal_of(store))

    before = datetime.now(UTC)
    async with (
        run_fake_replicate(fake),
        open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider,
    ):
        url = await generate(provider, image())

    ((pending_id, pending_since),) = [entry[0] for entry in seen_by_the_create]
    assert pending_id is None
    assert pending_since is not None
    assert before <= pending_since <= datetime.now(UTC)
    (prediction_id,) = fake.predictions
    assert url.endswith(f"/files/{prediction_id}/out-0.webp")
    assert await journal_of(store) == {0: (prediction_id, None)}


def make_image_soon(nursery: trio.Nursery, provider: ReplicateProvider) -> trio.Event:
    """Generate image 0 in ``nursery``; the event is set once it is made."""
    done = trio.Event()

    async def make_image() -> None:
        await generate(provider, image())
        done.set()

    nursery.start_soon(make_image)
    return done


async def test_no_create_is_sent_until_its_pending_note_is_stored(fake: FakeReplicate) -> None:
    store = await store_with_job()
    journal = HeldJournal(store)

    async with (
        open_replicate_provider(settings_for(fake), journal=journal) as provider,
        trio.open_nursery() as nursery,
    ):
        done = make_image_soon(nursery, provider)
        with trio.fail_after(5):
            await journal.noted.wait()
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert fake.create_requests == 0

        journal.release()  # the create goes out, and its answer is the finished image
        with trio.fail_after(5):
            await done.wait()

    # The id's note goes with the image's own write (one transaction), not waited for here.
    assert fake.create_requests == 1
    assert journal.with_image == [False, True]
    assert [held.settled for held in journal.held] == [True, False]
    assert await journal_of(store) == {0: (next(iter(fake.predictions)), None)}


async def test_a_prediction_still_running_is_polled_only_once_its_id_is_noted() -> None:
    fake = FakeReplicate(latency_s=1.5)  # longer than Prefer: wait=1: answered "starting"
    store = await store_with_job()
    journal = HeldJournal(store)

    async with (
        run_fake_replicate(fake),
        open_replicate_provider(settings_for(fake, wait_s=1), journal=journal) as provider,
        trio.open_nursery() as nursery,
    ):
        done = make_image_soon(nursery, provider)
        with trio.fail_after(5):
            await journal.noted.wait()
        journal.release()  # the pending note is stored: the create goes out
        with trio.fail_after(5):
            while len(journal.held) < 2:
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        polls = fake.get_requests
        await trio.sleep(0.7)  # past the prediction's end: a poll would finish the image
        assert (fake.get_requests, done.is_set()) == (polls, False)

        journal.release()
        with trio.fail_after(5):
            await done.wait()

    assert journal.with_image == [False, False]
    assert fake.get_requests > polls
    assert await journal_of(store) == {0: (next(iter(fake.predictions)), None)}


async def test_a_create_whose_note_cannot_be_stored_is_not_sent(fake: FakeReplicate) -> None:
    store = await store_with_job()
    store.broken = "disk full"

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        with pytest.raises(NotStartedError, match="cannot note the create first: disk full"):
            await generate(provider, image())

    assert fake.create_requests == 0
    store.broken = None
    assert await journal_of(store) == {}


async def test_a_refused_create_clears_the_pending_note(fake: FakeReplicate) -> None:
    store = await store_with_job()
    journal = RecordingJournal(store)
    settings = settings_for(fake, api_token="r8_wrong")  # 401: Replicate created nothing

    async with open_replicate_provider(settings, journal=journal) as provider:
        with pytest.raises(PermanentProviderError):
            await generate(provider, image())

    assert fake.predictions == {}
    assert [(index, remote_id, since is None) for index, remote_id, since in journal.notes] == [
        (0, None, False),
        (0, None, True),
    ]
    assert await journal_of(store) == {0: (None, None)}


async def test_a_throttled_create_is_journaled_pending_again_before_it_is_sent_again(
    fake: FakeReplicate,
) -> None:
    fake.faults.retry_after_s = 0
    fake.faults.forced_creates.extend(["429"])
    store = await store_with_job()
    journal = RecordingJournal(store)

    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        with pytest.raises(NotStartedError) as throttled:
            await generate(provider, image())
        assert throttled.value.retry_after_s is not None
        await trio.sleep(throttled.value.retry_after_s)
        await generate(provider, image(attempt=2))

    (prediction_id,) = fake.predictions
    assert [(remote_id, since is None) for _, remote_id, since in journal.notes] == [
        (None, False),
        (None, True),
        (None, False),
        (prediction_id, True),
    ]
    assert fake.create_requests == 2


async def test_a_first_create_soon_after_admission_goes_on_the_admissions_note(
    fake: FakeReplicate,
) -> None:
    store = await store_with_job()
    admitted = datetime.now(UTC)
    await commit(store, SetRemote(JOB, 0, None, admitted))  # as the job's admission writes it
    journal = RecordingJournal(store)

    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        await generate(provider, image(pending_since=admitted))

    (prediction_id,) = fake.predictions
    assert [(remote_id, since is None) for _, remote_id, since in journal.notes] == [
        (prediction_id, True)  # no pending note of its own before the create
    ]
    assert await journal_of(store) == {0: (prediction_id, None)}


async def test_an_old_admission_note_is_not_relied_on(fake: FakeReplicate) -> None:
    store = await store_with_job()
    admitted = datetime.now(UTC) - timedelta(minutes=1)
    await commit(store, SetRemote(JOB, 0, None, admitted))
    journal = RecordingJournal(store)

    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        await generate(provider, image(pending_since=admitted))

    (prediction_id,) = fake.predictions
    assert [(remote_id, since is None) for _, remote_id, since in journal.notes] == [
        (None, False),
        (prediction_id, True),
    ]


async def test_after_a_throttled_first_create_the_next_notes_itself(fake: FakeReplicate) -> None:
    fake.faults.retry_after_s = 0
    fake.faults.forced_creates.extend(["429"])
    store = await store_with_job()
    admitted = datetime.now(UTC)
    await commit(store, SetRemote(JOB, 0, None, admitted))
    journal = RecordingJournal(store)

    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        with pytest.raises(NotStartedError) as throttled:
            await generate(provider, image(pending_since=admitted))
        assert throttled.value.retry_after_s is not None
        await trio.sleep(throttled.value.retry_after_s)
        await generate(provider, image(pending_since=admitted))

    (prediction_id,) = fake.predictions
    # The 429 cleared the admission's note: the create after it is noted before it is sent.
    assert [(remote_id, since is None) for _, remote_id, since in journal.notes] == [
        (None, True),
        (None, False),
        (prediction_id, True),
    ]


async def test_a_create_sent_on_the_admissions_note_is_reconciled_after_a_restart(
    fake: FakeReplicate,
) -> None:
    fake.faults.forced_creates.extend(["hang-created"])  # created, then never answered
    store = await store_with_job()
    admitted = datetime.now(UTC)
    await commit(store, SetRemote(JOB, 0, None, admitted))

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        with trio.move_on_after(1):  # the process dies with the create unanswered
            await provider.generate(image(pending_since=admitted))
    assert await journal_of(store) == {0: (None, admitted)}  # only the admission's note

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()

    (prediction_id,) = fake.predictions
    assert url.endswith(f"/files/{prediction_id}/out-0.webp")
    assert (fake.create_requests, stats["reconciled"], stats["creates"]) == (1, 1, 0)
    assert await journal_of(store) == {0: (prediction_id, None)}


# --- resuming ----------------------------------------------------------------------------------


async def test_a_journaled_prediction_is_polled_and_nothing_is_created(fake: FakeReplicate) -> None:
    prediction_id = await create_directly(fake)
    store = await store_with_job()
    await commit(store, SetRemote(JOB, 0, prediction_id, None))

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()

    assert url.endswith(f"/files/{prediction_id}/out-0.webp")
    assert (fake.create_requests, len(fake.predictions)) == (1, 1)  # only the direct one
    assert (stats["resumed"], stats["creates"], stats["reconciled"]) == (1, 0, 0)
    assert isinstance(stats["polls"], int)
    assert stats["polls"] >= 1


async def test_a_pending_create_is_reconciled_with_the_prediction_it_made(
    fake: FakeReplicate,
) -> None:
    store = await store_with_job()
    pending_since = datetime.now(UTC)
    await commit(store, SetRemote(JOB, 0, None, pending_since))
    prediction_id = await create_directly(fake)  # what the earlier process's create made

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()

    assert url.endswith(f"/files/{prediction_id}/out-0.webp")
    assert (fake.create_requests, len(fake.predictions)) == (1, 1)
    assert (stats["reconciled"], stats["creates"]) == (1, 0)
    assert await journal_of(store) == {0: (prediction_id, None)}


async def test_a_pending_create_that_made_nothing_is_created_once(fake: FakeReplicate) -> None:
    store = await store_with_job()
    await commit(store, SetRemote(JOB, 0, None, datetime.now(UTC)))
    other_id = await create_directly(fake, prompt="another prompt")

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()

    (new_id,) = set(fake.predictions) - {other_id}
    assert url.endswith(f"/files/{new_id}/out-0.webp")
    assert (stats["reconciled"], stats["creates"]) == (0, 1)
    assert await journal_of(store) == {0: (new_id, None)}


async def test_a_finished_images_prediction_is_never_adopted_by_a_pending_create(
    fake: FakeReplicate,
) -> None:
    store = await store_with_job()
    await commit(store, SetRemote(JOB, 1, None, datetime.now(UTC)))
    image_0s = await create_directly(fake)  # same input, but it served image 0 already

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [image_0s])
        url = await generate(provider, image(index=1, attempt=2))
        stats = provider.statistics()

    assert f"/files/{image_0s}/" not in url
    assert len(fake.predictions) == 2
    assert (stats["reconciled"], stats["creates"]) == (0, 1)


# --- claims: no prediction serves two images, whichever process of a cluster takes it ------------
#
# Against the real Redis store (a prefix of the test's own), which the processes of a cluster
# share: each claims there the predictions it takes.

OTHER_JOB = "job-2"


@pytest.fixture
async def store(redis_prefix: str) -> AsyncIterator[RedisStore]:
    async with open_redis_store(REDIS_URL, redis_prefix) as store:
        await with_job(store)
        await with_job(store, OTHER_JOB)
        yield store


async def claim_of(prefix: str, prediction_id: str) -> str | None:
    async with open_client(REDIS_URL) as client:
        return await client.get(f"{prefix}claim:{prediction_id}")


@pytest.mark.parametrize("claimed_for", [OTHER_JOB, JOB])
async def test_reconciling_adopts_a_claimed_prediction_only_for_the_image_it_was_claimed_for(
    fake: FakeReplicate, store: RedisStore, redis_prefix: str, claimed_for: str
) -> None:
    # A prediction of the same input, made since the pending create and claimed already: by
    # another node's image (which runs on it), or by this image on a node that died before
    # noting its id (the next node takes the image over and finds it again).
    await commit(store, SetRemote(JOB, 0, None, datetime.now(UTC)))
    made = await create_directly(fake)
    assert await StoreJournal(store).claim(made, claimed_for, 0)

    async with open_replicate_provider(settings_for(fake), journal=StoreJournal(store)) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        url = await generate(provider, image(attempt=2))
        stats = provider.statistics()

    theirs = claimed_for == OTHER_JOB
    (used,) = set(fake.predictions) - {made} if theirs else {made}
    assert url.endswith(f"/files/{used}/out-0.webp")
    assert (stats["reconciled"], stats["creates"]) == ((0, 1) if theirs else (1, 0))
    assert await claim_of(redis_prefix, made) == f"{claimed_for}\t0"
    assert await claim_of(redis_prefix, used) == f"{JOB}\t0"


class TakenFirst(StoreJournal):
    """The first prediction the provider claims was claimed a moment before by another
    process's image (which found it in the list while the create was held open)."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store)
        self.taken: list[str] = []

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:
        if not self.taken:
            self.taken.append(remote_id)
            assert await super().claim(remote_id, OTHER_JOB, 0)
        return await super().claim(remote_id, job_id, index)


async def test_a_create_whose_prediction_another_process_took_gives_the_image_another(
    fake: FakeReplicate, store: RedisStore, redis_prefix: str
) -> None:
    journal = TakenFirst(store)
    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        url = await generate(provider, image())
        stats = provider.statistics()

    (taken,) = journal.taken
    (own,) = set(fake.predictions) - {taken}
    assert url.endswith(f"/files/{own}/out-0.webp")
    assert (fake.create_requests, stats["swapped"]) == (2, 1)
    assert await claim_of(redis_prefix, taken) == f"{OTHER_JOB}\t0"
    assert await claim_of(redis_prefix, own) == f"{JOB}\t0"


class Unreachable(StoreJournal):
    """A journal whose claims fail (Redis down) until :attr:`down` is cleared."""

    down = True

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:
        if self.down:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable("Redis at redis://127.0.0.1:6379/0 did not answer")
        return await super().claim(remote_id, job_id, index)


async def test_a_create_whose_claim_cannot_be_made_is_found_again_not_made_again(
    fake: FakeReplicate,
) -> None:
    store = await store_with_job()
    journal = Unreachable(store)
    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        with pytest.raises(TransientProviderError, match="cannot claim prediction"):
            await generate(provider, image())
        (made,) = fake.predictions
        # The create stays pending in the journal: a restart would reconcile it too.
        assert (await journal_of(store))[0][0] is None
        journal.down = False
        url = await generate(provider, image(attempt=2))

    # The next attempt claims what the create answered with first (no list, no create).
    assert url.endswith(f"/files/{made}/out-0.webp")
    assert (fake.create_requests, fake.list_requests) == (1, 0)
    assert await journal_of(store) == {0: (made, None)}


class SlowFirstClaim(StoreJournal):
    """The first claim takes a second (a slow store): the attempt's deadline cuts it short."""

    def __init__(self, store: JobStore) -> None:
        super().__init__(store)
        self.claims = 0

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:
        self.claims += 1
        if self.claims == 1:
            await trio.sleep(1)
        return await super().claim(remote_id, job_id, index)


@pytest.mark.parametrize("found", [False, True], ids=["answered", "reconciled"])
async def test_an_attempt_cut_short_while_claiming_leaves_the_prediction_to_the_next(
    fake: FakeReplicate, found: bool
) -> None:
    store = await store_with_job()
    if found:  # a create pending at a restart: its prediction is found in the list
        await commit(store, SetRemote(JOB, 0, None, datetime.now(UTC)))
        await create_directly(fake)
    journal = SlowFirstClaim(store)
    async with open_replicate_provider(settings_for(fake), journal=journal) as provider:
        provider.resume_remote_work(await remote_work(store), [])
        with trio.move_on_after(0.5) as deadline:
            await provider.generate(image(attempt=1 + found))
        assert deadline.cancelled_caught
        (made,) = fake.predictions
        url = await generate(provider, image(attempt=2 + found))

    assert url.endswith(f"/files/{made}/out-0.webp")
    assert fake.create_requests == 1
    assert await journal_of(store) == {0: (made, None)}


async def test_deleting_a_job_deletes_its_claims(store: RedisStore, redis_prefix: str) -> None:
    journal = StoreJournal(store)
    assert await journal.claim("p-1", JOB, 0)
    assert await journal.claim("p-2", JOB, 1)
    assert await journal.claim("p-1", JOB, 0)  # the same image again
    assert not await journal.claim("p-1", JOB, 1)  # another image
    assert {key for key in await keys_under(redis_prefix) if "claim" in key} == {
        f"{redis_prefix}claim:p-1",
        f"{redis_prefix}claim:p-2",
        f"{redis_prefix}job:{JOB}:claimed",
    }

    await commit(store, DeleteJob(JOB))

    assert not {key for key in await keys_under(redis_prefix) if "claim" in key}
    # A worker of the deleted job still running somewhere takes nothing, and leaves nothing.
    assert not await journal.claim("p-3", JOB, 0)
    assert not {key for key in await keys_under(redis_prefix) if "claim" in key}


# --- the whole service stopping and starting again ---------------------------------------------


@pytest.mark.parametrize(
    ("latency_s", "stop_after_s", "journaled"),
    [
        (0.8, 0.3, "pending"),  # stopped while the create is held open by Prefer: wait
        (1.6, 1.3, "id"),  # stopped while polling the prediction the create answered with
    ],
)
async def test_a_restart_carries_on_with_the_same_prediction(
    fake: FakeReplicate, latency_s: float, stop_after_s: float, journaled: str
) -> None:
    fake.latency_s = latency_s
    store = MemoryStore(resumable=True)
    settings = settings_for(fake, wait_s=1)
    supervisor_settings = SupervisorSettings(provider_cancel_s=1)

    async with (
        open_replicate_provider(settings, journal=StoreJournal(store)) as provider,
        open_supervisor(provider, supervisor_settings, store=store) as supervisor,
    ):
        snapshot, _ = await supervisor.submit(owner="alice", prompt=PROMPT, num_images=1)
        job_id = snapshot.job_id
        await trio.sleep(stop_after_s)
    (stored,) = await store.load()
    ((remote_id, pending_since),) = [(w.remote_id, w.pending_since) for w in stored.remote]
    assert (remote_id is None, pending_since is None) == (journaled == "pending", journaled == "id")

    async with (
        open_replicate_provider(settings, journal=StoreJournal(store)) as provider,
        open_supervisor(provider, supervisor_settings, store=store) as supervisor,
    ):
        job = supervisor.get(job_id, owner="alice")
        with trio.fail_after(10):
            await job.wait_finished()
        stats = provider.statistics()

    (prediction_id,) = fake.predictions
    assert fake.create_requests == 1
    assert fake.cancel_requests == []
    assert stats["creates"] == 0
    ((status, url, attempts),) = [(i.status, i.url, i.attempts) for i in job.snapshot().images]
    assert (status, attempts) == (ImageStatus.COMPLETED, 2)
    assert url is not None
    assert url.endswith(f"/files/{prediction_id}/out-0.webp")
