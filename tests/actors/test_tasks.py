"""keep_running (actors/tasks.py): a background loop outlives its own bugs. Trio's virtual clock."""

from __future__ import annotations

import itertools
import logging

import pytest
import trio
import trio.testing

from actors.tasks import TaskFailures, keep_running

logger = logging.getLogger("tests.tasks")


async def test_a_loop_that_raises_is_counted_and_started_again_after_growing_waits(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    starts: list[float] = []

    async def loop() -> None:
        starts.append(trio.current_time())
        if len(starts) <= 7:
            raise ValueError(f"bug {len(starts)}")

    failures = TaskFailures()
    await keep_running("loop", loop, failures, log=logger)

    waits = [later - earlier for earlier, later in itertools.pairwise(starts)]
    assert waits == [1, 2, 4, 8, 16, 30, 30]
    assert failures == TaskFailures(total=7, last="loop: ValueError('bug 7')")
    logged = [record for record in caplog.records if record.name == "tests.tasks"]
    assert len(logged) == 7
    assert all(record.exc_info for record in logged)


async def test_cancellation_and_base_exceptions_are_not_caught(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def forever() -> None:
        await trio.sleep_forever()

    failures = TaskFailures()
    with trio.move_on_after(5) as scope:
        await keep_running("loop", forever, failures, log=logger)
    assert scope.cancelled_caught

    async def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await keep_running("loop", interrupted, failures, log=logger)
    assert failures.total == 0
