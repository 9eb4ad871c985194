"""A provider's remote-work journal kept in the job store."""

from __future__ import annotations

from datetime import datetime

from actors.store.base import Commit, JobStore, SetRemote


class StoreJournal:
    """Notes each image's remote work (a prediction id, or a create in flight) in ``store``.

    Concurrency: sync; each note is one queued write, stored in order with the job's own.
    """

    def __init__(self, store: JobStore) -> None:
        self._store = store

    def note(
        self, job_id: str, index: int, *, remote_id: str | None, pending_since: datetime | None
    ) -> Commit:
        return self._store.write(SetRemote(job_id, index, remote_id, pending_since))


class NullJournal:
    """Remembers nothing: for a provider whose process is the only one that could resume."""

    def note(
        self,
        job_id: str,  # noqa: ARG002 (the protocol's)
        index: int,  # noqa: ARG002
        *,
        remote_id: str | None,  # noqa: ARG002
        pending_since: datetime | None,  # noqa: ARG002
    ) -> Commit:
        commit = Commit()
        commit.settle()
        return commit
