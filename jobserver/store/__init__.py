"""The job store: a dialect-neutral repository (``repository.Store``) over a narrow
driver seam (``driver``); ``sqlite`` holds everything SQLite, ``postgres`` everything
PostgreSQL.  ``schema`` is the tables and migrating to them.  ``open_driver`` and
``open_store`` are how the server gets one: a path is a SQLite file, a ``postgresql://``
URL a PostgreSQL database."""

from __future__ import annotations

from pathlib import Path

from jobserver.store.driver import Driver
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
    Beat,
    Changed,
    Finish,
    IdempotencyKey,
    JobFilter,
    NewJob,
    NodeRecord,
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
    "Beat",
    "Changed",
    "Checkpoint",
    "DatabaseLock",
    "Finish",
    "IdempotencyKey",
    "JobFilter",
    "KeptOutcome",
    "NewJob",
    "NodeRecord",
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
    "open_driver",
    "open_store",
    "pending_migrations",
]


def open_driver(
    database: Path | str, *, synchronous: str = "FULL", idle_timeout: float | None = None
) -> Driver:
    """The driver for ``database``: a path is a SQLite file (``synchronous`` is its
    durability), a ``postgresql://`` URL a PostgreSQL database (``idle_timeout``: see
    ``PostgresDriver``)."""
    if isinstance(database, Path):
        return SqliteDriver(database, synchronous=synchronous)
    from jobserver.store.postgres import PostgresDriver  # psycopg: only for PostgreSQL

    return PostgresDriver(database, idle_timeout=idle_timeout)


def open_store(database: Path | str, *, synchronous: str = "FULL") -> Store:
    """The repository on a migrated database (see ``migrate`` and ``postgres.migrate``)."""
    return Store(open_driver(database, synchronous=synchronous))
