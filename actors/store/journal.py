"""A provider's remote-work journal (``actors.providers.base.RemoteJournal``) kept in the job
store."""

from __future__ import annotations

from datetime import datetime

import trio

from actors.providers.base import Commit
from actors.store.base import ClaimsRemoteWork, JobStore, SetRemote


class StoreJournal:
    """Notes each image's remote work (a prediction id, or a create in flight) in ``store``.

    Concurrency: sync; each note is one queued write, stored in order with the job's own (a note
    ``with_image`` inside the job's next write). A claim is a call of the store's own, when the
    store is shared by several processes (:class:`ClaimsRemoteWork`).
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self._claims = store if isinstance(store, ClaimsRemoteWork) else None

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

    async def claim(self, remote_id: str, job_id: str, index: int) -> bool:
        if self._claims is None:
            await trio.lowlevel.checkpoint()
            return True  # this process is the only one: its provider knows its claims
        return await self._claims.claim_remote(remote_id, job_id, index)
