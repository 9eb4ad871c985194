"""A provider's remote-work journal (``actors.providers.base.RemoteJournal``) kept in the job
store."""

from __future__ import annotations

from datetime import datetime

from actors.providers.base import Commit
from actors.store.base import JobStore, SetRemote


class StoreJournal:
    """Notes each image's remote work (a prediction id, or a create in flight) in ``store``.

    Concurrency: sync; each note is one queued write, stored in order with the job's own (a note
    ``with_image`` inside the job's next write).
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def note(
        self,
        job_id: str,
        index: int,
        *,
        remote_id: str | None,
        pending_since: datetime | None,
        with_image: bool = False,
    ) -> Commit:
        operation = SetRemote(job_id, index, remote_id, pending_since)
        if with_image:
            return self._store.write_with_next(operation)
        return self._store.write(operation)
