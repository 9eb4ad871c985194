"""Where jobs are kept: the ``JobStore`` seam and its backends (memory, SQLite)."""

from actors.providers.base import Commit, RemoteWork
from actors.store.base import (
    AppendEvent,
    DeleteJob,
    JobRecord,
    JobStore,
    Operation,
    PutImages,
    PutJob,
    SetCopy,
    SetRemote,
    StoredJob,
    StoreHealth,
    StoreStatistics,
    commit,
)
from actors.store.memory import MemoryStore
from actors.store.sqlite import SQLiteStore, open_sqlite_store

__all__ = [
    "AppendEvent",
    "Commit",
    "DeleteJob",
    "JobRecord",
    "JobStore",
    "MemoryStore",
    "Operation",
    "PutImages",
    "PutJob",
    "RemoteWork",
    "SQLiteStore",
    "SetCopy",
    "SetRemote",
    "StoreHealth",
    "StoreStatistics",
    "StoredJob",
    "commit",
    "open_sqlite_store",
]
