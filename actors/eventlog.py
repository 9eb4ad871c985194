"""A job's append-only event log: the fan-out primitive behind SSE, WebSocket and replay."""

from __future__ import annotations

import trio

from actors.messages import JobEvent


class EventLog:
    """Append-only log of one job's events, read by any number of cursor-based subscribers.

    Event ids are 1, 2, 3, ... in append order. A subscriber keeps the id of the last event it
    has seen (its cursor; 0 for a full replay) and calls :meth:`wait_events_after`, which answers
    every newer event at once, or waits for the next append. The log holds at most one event per
    image plus ``done``, so it is bounded by the job's size.

    Concurrency: written by exactly one task (the job's actor) with the sync :meth:`append` and
    :meth:`close`; the writer never blocks and never sees its readers. Readers only hold a cursor,
    so a slow reader just gets a bigger batch next time and a stuck one holds no memory.
    """

    def __init__(self) -> None:
        self._events: list[JobEvent] = []
        self._closed = False
        self._changed = trio.Event()

    @property
    def next_id(self) -> int:
        """The id the next appended event must carry."""
        return len(self._events) + 1

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_id(self) -> int:
        return len(self._events)

    def events_after(self, cursor: int) -> tuple[JobEvent, ...]:
        """Every event with ``id > cursor``, without waiting."""
        return tuple(self._events[max(cursor, 0) :])

    def append(self, event: JobEvent) -> None:
        """Add ``event`` (whose id must be :attr:`next_id`) and wake every waiting reader."""
        if self._closed:
            raise trio.ClosedResourceError("event log is closed")
        if event.id != self.next_id:
            raise ValueError(f"event id {event.id} is not the next id {self.next_id}")
        self._events.append(event)
        self._wake()

    def close(self) -> None:
        """Mark the log complete; readers drain what is left and then get an empty batch."""
        if not self._closed:
            self._closed = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_events_after(self, cursor: int) -> tuple[JobEvent, ...]:
        """Wait until there are events with ``id > cursor`` and return them all, in order.

        Returns an empty tuple once the log is closed and holds nothing after ``cursor``.
        Always a checkpoint, even when it can answer at once.
        """
        while True:
            batch = self.events_after(cursor)
            if batch or self._closed:
                await trio.lowlevel.checkpoint()
                return batch
            await self._changed.wait()
