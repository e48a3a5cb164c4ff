"""The job store: a dialect-neutral repository (``repository.Store``) over a narrow
driver seam (``driver``); ``sqlite`` holds everything SQLite, ``postgres`` everything
PostgreSQL.  ``schema`` is the tables and migrating to them.  ``open_store`` is how the
server gets one (on SQLite; PostgreSQL is not wired into the server yet)."""

from __future__ import annotations

from pathlib import Path

from jobserver.store.kept import (
    OUTCOME_FILE,
    KeptOutcome,
    forget_outcome,
    keep_outcome,
    kept_outcome,
)
from jobserver.store.repository import (
    FAILURE,
    MAX_PAGE,
    PRESSURE,
    RESCUE,
    AttemptSpan,
    Changed,
    Finish,
    IdempotencyKey,
    JobFilter,
    NewJob,
    QueueEntry,
    Requeue,
    Store,
    TaskBucket,
    TaskRun,
    TaskStats,
    dump_json,
)
from jobserver.store.schema import metadata, migrations_dir
from jobserver.store.sqlite import (
    Checkpoint,
    DatabaseLock,
    SqliteDriver,
    migrate,
    pending_migrations,
)

__all__ = [
    "FAILURE",
    "MAX_PAGE",
    "OUTCOME_FILE",
    "PRESSURE",
    "RESCUE",
    "AttemptSpan",
    "Changed",
    "Checkpoint",
    "DatabaseLock",
    "Finish",
    "IdempotencyKey",
    "JobFilter",
    "KeptOutcome",
    "NewJob",
    "QueueEntry",
    "Requeue",
    "SqliteDriver",
    "Store",
    "TaskBucket",
    "TaskRun",
    "TaskStats",
    "dump_json",
    "forget_outcome",
    "keep_outcome",
    "kept_outcome",
    "metadata",
    "migrate",
    "migrations_dir",
    "open_store",
    "pending_migrations",
]


def open_store(database: Path, *, synchronous: str = "FULL") -> Store:
    """The repository on a migrated SQLite file (see ``migrate``)."""
    return Store(SqliteDriver(database, synchronous=synchronous))
