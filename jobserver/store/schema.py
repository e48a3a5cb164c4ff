"""The tables, written once for every dialect, and migrating a database to them.

How values are stored, per dialect (the decision the drivers and migrations follow):

- **Times.** The repository binds every time as ISO 8601 text of one fixed format
  (``jobs.format_timestamp``: UTC, milliseconds, ``Z``), which sorts and compares as
  text exactly as the times do.  SQLite stores that text (an admin reads it as is in
  the ``sqlite3`` shell); PostgreSQL stores ``timestamptz``, receives the text as an
  untyped literal and compares on the database's own clock.  The row decoder accepts
  both text and ``datetime``.
- **JSON** (``args``, ``result``, ``artifacts``). Bound as compact JSON text.  SQLite
  stores text and checks it with ``json_valid`` (a CHECK that exists on SQLite only);
  PostgreSQL's ``json`` type rejects invalid JSON by itself.
- **Partial indexes** carry their condition for both dialects (``sqlite_where`` and
  ``postgresql_where``); the states are written as literals because SQLite only uses a
  partial index whose WHERE a query repeats literally.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from jobserver.jobs import TERMINAL_STATES, JobState

log = logging.getLogger("jobserver.store")

metadata = sa.MetaData()
# PostgreSQL: the channel the nodes LISTEN on, and NOTIFY (see events.Wakeups).
NOTIFY_CHANNEL = "jobserver"

# Text on SQLite (what admins read), typed on PostgreSQL (see the module docstring).
TIMESTAMP: sa.types.TypeEngine[Any] = sa.Text().with_variant(
    postgresql.TIMESTAMP(timezone=True), "postgresql"
)
JSON_TEXT: sa.types.TypeEngine[Any] = sa.Text().with_variant(postgresql.JSON(), "postgresql")

_STATES = ", ".join(f"'{state.value}'" for state in JobState)
_TERMINAL = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))
# A literal, not a bound parameter: SQLite matches a partial index's WHERE as written.
QUEUED_LITERAL: sa.ColumnElement[str] = sa.literal_column("'queued'")


def json_check(column: str, *, nullable: bool) -> sa.CheckConstraint:
    """``json_valid`` on SQLite, where JSON is plain text; PostgreSQL's type checks it."""
    test = f"json_valid({column})"
    constraint = sa.CheckConstraint(
        test if not nullable else f"{column} IS NULL OR {test}", name=f"ck_jobs_{column}_json"
    )
    constraint.ddl_if(dialect="sqlite")
    return constraint


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("args", JSON_TEXT, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", TIMESTAMP, nullable=False),
    sa.Column("run_after", TIMESTAMP),
    sa.Column("started_at", TIMESTAMP),
    sa.Column("finished_at", TIMESTAMP),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rescues", sa.Integer, nullable=False, server_default="0"),
    sa.Column("result", JSON_TEXT),
    sa.Column("error_type", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("traceback", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("cancel_requested_at", TIMESTAMP),
    sa.Column("pid", sa.Integer),
    sa.Column("pid_started_at", sa.Float),
    sa.Column("exit_code", sa.Integer),
    sa.Column("peak_rss", sa.Integer),
    sa.Column("cpu_seconds", sa.Float),
    sa.Column("owner", sa.Text),  # the token name that submitted it; NULL: anonymous
    # Times the scheduler killed and requeued it under memory pressure (migration 0003).
    sa.Column("pressure_requeues", sa.Integer, nullable=False, server_default="0"),
    sa.CheckConstraint(f"state IN ({_STATES})", name="ck_jobs_state"),
    sa.CheckConstraint(
        f"(state IN ({_TERMINAL})) = (finished_at IS NOT NULL)", name="ck_jobs_finished_at"
    ),
    json_check("args", nullable=False),
    json_check("result", nullable=True),
)
# New columns are appended in migration order (SQLite adds columns at the end).
# Migration 0002 (lifecycle):
jobs.append_column(sa.Column("timeout", sa.Float))
jobs.append_column(sa.Column("progress_fraction", sa.Float))
jobs.append_column(sa.Column("progress_message", sa.Text))
jobs.append_column(sa.Column("progress_updated_at", TIMESTAMP))
jobs.append_column(sa.Column("artifacts", JSON_TEXT))
# Migration 0007: the node whose scheduler claimed the current attempt.  Every write
# about an attempt compares (node, attempts), so a late write about an older attempt, or
# from a node that no longer owns the job, changes nothing.
jobs.append_column(sa.Column("node", sa.Text))
# Migration 0009: the cron schedule that fired the job and the slot it fired for (NULL
# for a job a client submitted).
jobs.append_column(sa.Column("schedule", sa.Text))
jobs.append_column(sa.Column("schedule_slot", TIMESTAMP))

# Migration 0010: the incarnation (one start of a node) that claimed the current attempt.
# The fence is (incarnation, attempts): a node restarted under its name is a new
# incarnation and never inherits its previous run's attempts.  ``node`` keeps the name.
jobs.append_column(sa.Column("incarnation", sa.Text))

sa.Index("ix_jobs_queue", jobs.c.state, jobs.c.priority.desc(), jobs.c.id)
# The queue head's two halves (migration 0006): jobs that may run now, and delayed ones.
_READY = sa.and_(jobs.c.state == QUEUED_LITERAL, jobs.c.run_after.is_(None))
_DELAYED = sa.and_(jobs.c.state == QUEUED_LITERAL, jobs.c.run_after.is_not(None))
sa.Index(
    "ix_jobs_ready",
    jobs.c.priority.desc(),
    jobs.c.id,
    sqlite_where=_READY,
    postgresql_where=_READY,
)
sa.Index("ix_jobs_delayed", jobs.c.run_after, sqlite_where=_DELAYED, postgresql_where=_DELAYED)
sa.Index("ix_jobs_state_id", jobs.c.state, jobs.c.id)
sa.Index("ix_jobs_task_id", jobs.c.task, jobs.c.id)
sa.Index("ix_jobs_owner_id", jobs.c.owner, jobs.c.id)
sa.Index("ix_jobs_finished_at", jobs.c.finished_at)

# One row per start of a job's process, written in the transaction of the job's
# transition (a claim opens it; the attempt's end closes it).
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("started_at", TIMESTAMP, nullable=False),
    sa.Column("finished_at", TIMESTAMP),
    sa.Column("outcome", sa.Text),
    sa.Column("error_type", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("exit_code", sa.Integer),
    sa.Column("node", sa.Text),  # migration 0007: the node that ran it
)

# job_id waits until depends_on has succeeded.
dependencies = sa.Table(
    "dependencies",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column(
        "depends_on", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
)
sa.Index("ix_dependencies_depends_on", dependencies.c.depends_on)

# The last cron slot each schedule fired, so a restart never fires a slot twice.
schedules = sa.Table(
    "schedules",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("last_slot", TIMESTAMP, nullable=False),
    sa.Column("last_job_id", sa.Text),
)

# Idempotency-Key → the job its first submit created, per client scope.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("body_hash", sa.Text, nullable=False),
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", TIMESTAMP, nullable=False),
)
sa.Index("ix_idempotency_keys_created_at", idempotency_keys.c.created_at)

# One row per finished attempt that was measured: what each task really uses, read by the
# scheduler to learn memory requests and by admins (migration 0003).
task_runs = sa.Table(
    "task_runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),  # the state it went to, or "requeued"
    sa.Column("peak_rss", sa.Integer, nullable=False),  # bytes, the tree's sampled peak
    sa.Column("cpu_seconds", sa.Float, nullable=False),
    sa.Column("wall_seconds", sa.Float, nullable=False),
    sa.Column("finished_at", TIMESTAMP, nullable=False),
)
sa.Index("ix_task_runs_task_id", task_runs.c.task, task_runs.c.id)

# The ids the pruner deleted, with their owner and when (migration 0008): a read of one
# is answered "gone" rather than "not found"; forgotten after [jobs] pruned_memory.
pruned_jobs = sa.Table(
    "pruned_jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("owner", sa.Text),
    sa.Column("pruned_at", TIMESTAMP, nullable=False),
)
sa.Index("ix_pruned_jobs_pruned_at", pruned_jobs.c.pruned_at)

# The nodes sharing a PostgreSQL database (migration 0010): one row per incarnation,
# the start of one ``jobserver serve``.  Heartbeats and deaths are stamped by the
# database's clock.  ``resources``: what the node last published (capacity, free,
# running); ``definitions``: its tasks and schedules, compared with a starting node's.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("incarnation", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("started_at", TIMESTAMP, nullable=False),
    sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
    sa.Column("dead_at", TIMESTAMP),
    sa.Column("url", sa.Text),
    sa.Column("resources", JSON_TEXT, nullable=False),
    sa.Column("definitions", JSON_TEXT, nullable=False),
    sa.Column("cordoned", sa.Boolean, nullable=False, server_default=sa.false()),
)
sa.Index("ix_nodes_name", nodes.c.name)

# Leases (migration 0010): a named role held by one incarnation until ``expires_at``
# (the database's clock), renewed by its holder only.  "leader" runs rescue, pruning
# and cron.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text),
    sa.Column("expires_at", TIMESTAMP, nullable=False),
)

JOB_COLUMNS = tuple(column.name for column in jobs.c)


def migrations_dir() -> Path:
    """The Alembic scripts: shipped inside the package as ``jobserver.migrations``; in a
    source checkout that was not installed, the repository's ``migrations/``."""
    try:
        return Path(str(resources.files("jobserver.migrations")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent.parent / "migrations"


def upgrade_to_head(conn: sa.Connection) -> tuple[str | None, str | None]:
    """Apply every pending migration on ``conn``; the revision before and after."""
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext

    before = MigrationContext.configure(conn).get_current_revision()
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = conn
    command.upgrade(config, "head")
    after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def pending_revisions(conn: sa.Connection) -> list[str]:
    """The revisions ``upgrade_to_head`` would apply, oldest first."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    script = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(conn).get_current_heads()
    applied = {rev.revision for rev in script.iterate_revisions(current, "base")}
    return [
        rev.revision
        for rev in reversed(list(script.walk_revisions()))
        if rev.revision not in applied
    ]
