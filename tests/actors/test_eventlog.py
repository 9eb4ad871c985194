"""EventLog: replay, resume, wake-ups, closing, and many readers at different speeds."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from actors.eventlog import EventLog
from actors.messages import DoneEvent, ImageStatus, JobEvent, JobStatus, ProgressEvent
from tests.fakes import FIXED_NOW, read_all


def progress(event_id: int, index: int = 0) -> ProgressEvent:
    return ProgressEvent(
        id=event_id,
        index=index,
        status=ImageStatus.COMPLETED,
        url=f"https://img.test/job/{index}.png",
        error=None,
        attempts=1,
        started_at=FIXED_NOW,
        finished_at=FIXED_NOW,
    )


def done(event_id: int) -> DoneEvent:
    return DoneEvent(
        id=event_id,
        status=JobStatus.COMPLETED,
        total_ms=1000,
        ttfi_ms=1000,
        completed_count=event_id - 1,
        failed_count=0,
    )


def log_with(count: int) -> EventLog:
    log = EventLog()
    for event_id in range(1, count + 1):
        log.append(progress(event_id, index=event_id - 1))
    return log


def ids(events: tuple[JobEvent, ...] | list[JobEvent]) -> list[int]:
    return [event.id for event in events]


async def test_cursor_zero_replays_every_event_in_order() -> None:
    log = log_with(3)

    with trio.fail_after(1):
        batch = await log.wait_events_after(0)

    assert ids(batch) == [1, 2, 3]


async def test_cursor_n_resumes_with_only_newer_events() -> None:
    log = log_with(5)

    with trio.fail_after(1):
        batch = await log.wait_events_after(3)

    assert ids(batch) == [4, 5]


def test_negative_cursor_is_a_full_replay() -> None:
    log = log_with(2)

    assert ids(log.events_after(-7)) == [1, 2]


def test_ids_track_appends() -> None:
    log = log_with(2)

    assert (log.last_id, log.next_id, log.closed) == (2, 3, False)


async def test_wait_wakes_on_append(nursery: trio.Nursery) -> None:
    log = log_with(1)
    got: list[tuple[JobEvent, ...]] = []

    async def reader() -> None:
        got.append(await log.wait_events_after(1))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    assert got == []

    log.append(progress(2))
    with trio.fail_after(1):
        await trio.testing.wait_all_tasks_blocked()

    assert [ids(batch) for batch in got] == [[2]]


async def test_closed_log_answers_what_is_left_then_empty() -> None:
    log = log_with(2)
    log.append(done(3))
    log.close()

    with trio.fail_after(1):
        assert ids(await log.wait_events_after(1)) == [2, 3]
        assert await log.wait_events_after(3) == ()


async def test_close_wakes_a_waiting_reader_with_an_empty_batch(nursery: trio.Nursery) -> None:
    log = log_with(1)
    got: list[tuple[JobEvent, ...]] = []

    async def reader() -> None:
        got.append(await log.wait_events_after(1))

    nursery.start_soon(reader)
    await trio.testing.wait_all_tasks_blocked()
    log.close()
    with trio.fail_after(1):
        await trio.testing.wait_all_tasks_blocked()

    assert got == [()]


def test_close_is_idempotent() -> None:
    log = log_with(1)
    log.close()
    log.close()

    assert log.closed


def test_append_after_close_raises() -> None:
    log = log_with(1)
    log.close()

    with pytest.raises(trio.ClosedResourceError):
        log.append(progress(2))
    assert log.last_id == 1


@pytest.mark.parametrize("wrong_id", [1, 3, 0])
def test_append_with_an_id_other_than_next_raises(wrong_id: int) -> None:
    log = log_with(1)

    with pytest.raises(ValueError, match=f"event id {wrong_id} is not the next id 2"):
        log.append(progress(wrong_id))
    assert log.last_id == 1


async def test_wait_events_after_checkpoints_when_events_are_ready() -> None:
    log = log_with(2)

    with trio.fail_after(1), trio.testing.assert_checkpoints():
        await log.wait_events_after(0)


async def test_wait_events_after_checkpoints_when_closed_and_drained() -> None:
    log = log_with(1)
    log.close()

    with trio.fail_after(1), trio.testing.assert_checkpoints():
        await log.wait_events_after(1)


async def test_slow_and_fast_readers_both_see_every_event_in_id_order(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    log = EventLog()
    seen: dict[str, list[int]] = {"fast": [], "slow": []}
    batches: dict[str, int] = {"fast": 0, "slow": 0}
    finished = {name: trio.Event() for name in seen}

    async def reader(name: str, pause_s: float) -> None:
        cursor = 0
        while batch := await log.wait_events_after(cursor):
            batches[name] += 1
            seen[name].extend(ids(batch))
            cursor = batch[-1].id
            await trio.sleep(pause_s)  # a slow consumer, e.g. a congested socket
        finished[name].set()

    nursery.start_soon(reader, "fast", 0)
    nursery.start_soon(reader, "slow", 1)
    await trio.testing.wait_all_tasks_blocked()

    t0 = trio.current_time()
    for event_id in range(1, 21):
        log.append(progress(event_id, index=event_id - 1))
        await trio.lowlevel.checkpoint()
    log.append(done(21))
    log.close()
    writer_s = trio.current_time() - t0

    with trio.fail_after(60):
        for event in finished.values():
            await event.wait()
    assert writer_s == 0
    assert seen["fast"] == seen["slow"] == list(range(1, 22))
    assert batches["slow"] < batches["fast"]


async def test_read_all_follows_a_live_log_until_done(nursery: trio.Nursery) -> None:
    log = log_with(1)
    got: list[JobEvent] = []

    async def follower() -> None:
        got.extend(await read_all(log))

    nursery.start_soon(follower)
    await trio.testing.wait_all_tasks_blocked()
    log.append(progress(2, index=1))
    log.append(done(3))
    log.close()
    with trio.fail_after(1):
        await trio.testing.wait_all_tasks_blocked()

    assert ids(got) == [1, 2, 3]
    assert isinstance(got[-1], DoneEvent)
