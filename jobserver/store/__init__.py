"""The job store: a dialect-neutral repository (``repository.Store``) over a narrow
driver seam (``driver``); ``sqlite`` holds everything SQLite, ``postgres`` everything
PostgreSQL.  ``schema`` is the tables and migrating to them.  ``open_driver`` and
``open_store`` are how the server gets one: a path is a SQLite file, a ``postgresql://``
URL a PostgreSQL database."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    checked_job,
    dump_json,
    enqueue_in,
)
from jobserver.store.schema import metadata, migrations_dir

if TYPE_CHECKING:
    from jobserver.store.postgres import CallerConnection
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
    "enqueue",
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


def enqueue(
    connection: CallerConnection,
    task: str,
    args: Mapping[str, Any] | None = None,
    *,
    priority: int = 0,
    max_retries: int = 0,
    timeout: float | None = None,
    run_after: datetime | None = None,
) -> str:
    """Insert a job in the caller's open transaction on the jobserver database (PostgreSQL)
    and return its id.  ``connection`` is the application's own: a psycopg 3 connection,
    or a SQLAlchemy ``Connection`` over psycopg.  The job is stored, and the nodes woken,
    only when the caller commits; a rollback leaves nothing.

    The row is the one ``POST /api/v1/jobs`` stores, written by the same statement.
    Checked here: ``task`` is a name, ``args`` a JSON object, ``priority``,
    ``max_retries``, ``timeout`` and ``run_after`` in range (``ValidationError``, nothing
    inserted).  Not checked here (no config is loaded): that a node knows the task and
    that the arguments fit it.  Nodes that do not know the task leave the job queued; the
    node that runs it fails it if its arguments do not fit."""
    from jobserver.store.postgres import caller_transaction  # psycopg: only for PostgreSQL

    new = checked_job(task, args, priority, max_retries, timeout, run_after)
    return enqueue_in(caller_transaction(connection), new)
