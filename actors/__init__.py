"""The actor system: a Supervisor runs a JobActor per job, which runs an ImageWorker per image."""

from actors.errors import (
    ActorError,
    IdempotencyConflict,
    JobNotFound,
    LimitExceeded,
    Overloaded,
    PermanentProviderError,
    ProviderError,
    ShuttingDown,
    TransientProviderError,
)
from actors.eventlog import EventLog
from actors.job import JobActor
from actors.messages import (
    DoneEvent,
    ImageSnapshot,
    ImageStatus,
    JobEvent,
    JobSnapshot,
    JobStatus,
    ProgressEvent,
    SupervisorStatistics,
    Transport,
)
from actors.retry import RetryPolicy
from actors.settings import SupervisorSettings
from actors.supervisor import Batch, Subscription, Supervisor, open_supervisor

__all__ = [
    "ActorError",
    "Batch",
    "DoneEvent",
    "EventLog",
    "IdempotencyConflict",
    "ImageSnapshot",
    "ImageStatus",
    "JobActor",
    "JobEvent",
    "JobNotFound",
    "JobSnapshot",
    "JobStatus",
    "LimitExceeded",
    "Overloaded",
    "PermanentProviderError",
    "ProgressEvent",
    "ProviderError",
    "RetryPolicy",
    "ShuttingDown",
    "Subscription",
    "Supervisor",
    "SupervisorSettings",
    "SupervisorStatistics",
    "TransientProviderError",
    "Transport",
    "open_supervisor",
]
