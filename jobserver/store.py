"""Every SQL statement jobserver runs, and the SQLite file they run on.

The schema is plain on purpose: an admin with the ``sqlite3`` shell reads state as text,
timestamps as ISO 8601 text and args/result as JSON text (``json_extract`` works).

State changes are compare-and-set statements guarded by ``jobs.can_transition``: an
``UPDATE ... WHERE id = ? AND state = ?`` that changes one row or none, so two actors
(a cancel request and a finishing process) can never both win.

Writes go through one connection whose transactions begin ``IMMEDIATE`` (see
FIELD-NOTES: a deferred transaction that reads then writes fails with SQLITE_BUSY_SNAPSHOT
whatever the busy timeout); reads use a small pool of their own, which WAL lets run
beside the writer.  SQLite-only statements (pragmas, the file lock) are in the section
marked "SQLite specifics".

Beside ``jobs``: ``attempts`` (one row per start of a job's process, written in the
transaction of the job's transition), ``dependencies`` (read by the queue head query, so
a job whose dependencies have not all succeeded is never admitted), ``schedules`` (the
last cron slot fired) and ``idempotency_keys``.  Deleting a job cascades to all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from jobserver.errors import (
    Conflict,
    InvalidTransition,
    NotFound,
    ServerLocked,
    StorageUnavailable,
    ValidationError,
)
from jobserver.jobs import (
    TERMINAL_STATES,
    Artifact,
    Attempt,
    Job,
    JobError,
    JobState,
    Progress,
    check_retry,
    check_transition,
    format_timestamp,
    parse_timestamp,
    utcnow,
)

log = logging.getLogger("jobserver.store")
T = TypeVar("T")
Item = TypeVar("Item")
Result = TypeVar("Result")
# A write run in the writer's thread, on its sqlite3 connection (see _in_writer_thread).
Operation = Callable[[sqlite3.Connection], T]

metadata = sa.MetaData()

_STATES = ", ".join(f"'{state.value}'" for state in JobState)
_TERMINAL = ", ".join(f"'{state.value}'" for state in sorted(TERMINAL_STATES))

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("task", sa.Text, nullable=False),
    sa.Column("args", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Text, nullable=False),
    sa.Column("run_after", sa.Text),
    sa.Column("started_at", sa.Text),
    sa.Column("finished_at", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_retries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("rescues", sa.Integer, nullable=False, server_default="0"),
    sa.Column("result", sa.Text),
    sa.Column("error_type", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("traceback", sa.Text),
    sa.Column("reason", sa.Text),
    sa.Column("cancel_requested_at", sa.Text),
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
    sa.CheckConstraint("json_valid(args)", name="ck_jobs_args_json"),
    sa.CheckConstraint("result IS NULL OR json_valid(result)", name="ck_jobs_result_json"),
)
# The scheduler reads the queue head through this index, already in order: O(log n)
# whatever the number of finished jobs.  (Not a partial index: SQLite cannot use one for
# a query whose state is a bound parameter.)
sa.Index("ix_jobs_queue", jobs.c.state, jobs.c.priority.desc(), jobs.c.id)
# The queue head's two halves (migration 0006): jobs that may run now, and delayed ones.
_QUEUED: sa.ColumnElement[str] = sa.literal_column(
    "'queued'"
)  # a literal: SQLite matches a partial index's WHERE
sa.Index(
    "ix_jobs_ready",
    jobs.c.priority.desc(),
    jobs.c.id,
    sqlite_where=sa.and_(jobs.c.state == _QUEUED, jobs.c.run_after.is_(None)),
)
sa.Index(
    "ix_jobs_delayed",
    jobs.c.run_after,
    sqlite_where=sa.and_(jobs.c.state == _QUEUED, jobs.c.run_after.is_not(None)),
)
sa.Index("ix_jobs_state_id", jobs.c.state, jobs.c.id)
sa.Index("ix_jobs_task_id", jobs.c.task, jobs.c.id)
sa.Index("ix_jobs_owner_id", jobs.c.owner, jobs.c.id)

# --- lifecycle (issue 4): migration 0002 -----------------------------------------------
# New columns of ``jobs`` are appended by 0002 (SQLite adds columns at the end).
jobs.append_column(sa.Column("timeout", sa.Float))
jobs.append_column(sa.Column("progress_fraction", sa.Float))
jobs.append_column(sa.Column("progress_message", sa.Text))
jobs.append_column(sa.Column("progress_updated_at", sa.Text))
jobs.append_column(sa.Column("artifacts", sa.Text))
sa.Index("ix_jobs_finished_at", jobs.c.finished_at)

# One row per start of a job's process, written in the same transaction as the job's
# transition (claim inserts it; finish/requeue closes it).
attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("attempt", sa.Integer, primary_key=True),
    sa.Column("started_at", sa.Text, nullable=False),
    sa.Column("finished_at", sa.Text),
    sa.Column("outcome", sa.Text),
    sa.Column("error_type", sa.Text),
    sa.Column("error", sa.Text),
    sa.Column("exit_code", sa.Integer),
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
    sa.Column("last_slot", sa.Text, nullable=False),
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
    sa.Column("created_at", sa.Text, nullable=False),
)
sa.Index("ix_idempotency_keys_created_at", idempotency_keys.c.created_at)

# One row per finished attempt that was measured: what each task really uses, read by the
# scheduler to learn memory requests and by admins in the sqlite3 shell (migration 0003).
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
    sa.Column("finished_at", sa.Text, nullable=False),
)
sa.Index("ix_task_runs_task_id", task_runs.c.task, task_runs.c.id)

MAX_PAGE = 1000


def dump_json(value: Any) -> str:
    """JSON text as stored: compact, UTF-8, and strictly JSON (no NaN)."""
    return _DUMP.encode(value)


# Built once: json.dumps with options builds an encoder per call (twice per submit).
_DUMP = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class QueueEntry:
    """A queued job as the scheduler plans with it."""

    id: str
    task: str
    priority: int
    ready_since: datetime  # created, or its run_after if later


@dataclass(frozen=True)
class IdempotencyKey:
    scope: str  # the client ("anonymous" until there is authentication)
    key: str
    body_hash: str
    window: float  # seconds a key is remembered


@dataclass(frozen=True)
class NewJob:
    task: str
    args: dict[str, Any]
    priority: int
    max_retries: int
    # --- lifecycle (issue 4) ---
    timeout: float | None = None
    run_after: datetime | None = None
    depends_on: tuple[str, ...] = ()
    idempotency: IdempotencyKey | None = None
    owner: str | None = None  # the token name submitting it; None: anonymous


@dataclass(frozen=True)
class Finish:
    """What the scheduler records when an attempt ends for good."""

    state: JobState
    result: Any = None
    error: JobError | None = None
    reason: str | None = None
    exit_code: int | None = None
    peak_rss: int | None = None
    cpu_seconds: float | None = None
    artifacts: tuple[Artifact, ...] | None = None


@dataclass(frozen=True)
class TaskRun:
    """One measured attempt of a task (a row of ``task_runs``)."""

    task: str
    job_id: str
    attempt: int
    outcome: str
    peak_rss: int
    cpu_seconds: float
    wall_seconds: float
    finished_at: datetime


STATS_RECENT = 1000


@dataclass(frozen=True)
class TaskStats:
    """One task's numbers for ``GET /api/v1/stats``; percentiles over ``samples`` recent
    succeeded jobs (None when there are none)."""

    task: str
    count: int
    states: dict[str, int]
    success_rate: float | None  # succeeded / (succeeded + failed), all time
    duration_p50: float | None  # seconds
    duration_p95: float | None
    peak_rss_p95: int | None  # bytes
    peak_rss_max: int | None
    samples: int


def _percentile(ordered: list[float] | list[int], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (no interpolation: a value that was
    really observed)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])


class Store:
    """The jobs table, behind async methods that each run one short transaction."""

    def __init__(self, writer: AsyncEngine, reader: AsyncEngine, database: Path) -> None:
        self._writer = writer
        self._reader = reader
        self._database = database
        # --- group commit of plain submits (issue 6) ---
        self._inserts = _Batches(self._commit_batch, GROUP_COMMIT_MAX)
        self.group_commits = self._inserts.stats
        # --- fast reads (issue 6) ---
        self._fast: sqlite3.Connection | None = None
        self._fast_columns: tuple[str, ...] = ()  # GET_JOB_SQL's, known after its first run
        self._fast_jobs: dict[str, tuple[tuple[Any, ...], Job]] = {}  # id -> (row, job)
        # --- the scheduler's writes, several per transaction (issue 6) ---
        self._shared = _Batches(self._run_operations, SHARED_MAX)
        self.shared_commits = self._shared.stats

    @classmethod
    def open(cls, database: Path, *, synchronous: str = "FULL") -> Store:
        """Engines on an existing, migrated file (see ``migrate``)."""
        url = f"sqlite+aiosqlite:///{database}"
        # No rollback when the writer goes back to its pool: every write commits or rolls
        # back itself, and that reset was one more trip to aiosqlite's thread (issue 6).
        writer = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=60, pool_reset_on_return=None
        )
        reader = create_async_engine(url, pool_size=4, max_overflow=0, pool_timeout=60)
        _configure_sqlite(writer.sync_engine, begin="BEGIN IMMEDIATE", synchronous=synchronous)
        _configure_sqlite(reader.sync_engine, begin="BEGIN", synchronous=synchronous)
        return cls(writer, reader, database)

    async def close(self) -> None:
        # What is already queued is committed and answered.
        await self._inserts.drain()
        await self._shared.drain()
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        await self._writer.dispose()
        await self._reader.dispose()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (BEGIN IMMEDIATE, committed on exit)."""
        try:
            async with self._writer.begin() as conn:
                yield conn
        except (OperationalError, sqlite3.OperationalError) as exc:
            raise _unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._reader.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise _unavailable(exc) from exc

    # -- reads -------------------------------------------------------------------

    async def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job; with ``owner``, only if that client submitted it (else ``NotFound``,
        so that a client cannot even learn that another client's id exists)."""
        found = self._fast_get(job_id)
        if found is not None:
            if owner is not None and found.owner != owner:
                raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
            return found
        query = sa.select(jobs).where(jobs.c.id == job_id)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        async with self._read() as conn:
            row = (await conn.execute(query)).first()
            if row is None:
                raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
            return (await _with_extras(conn, [_job_from_row(row)]))[0]

    async def page(
        self,
        *,
        state: JobState | None = None,
        task: str | None = None,
        limit: int = 50,
        before: str | None = None,
        owner: str | None = None,
    ) -> list[Job]:
        """Newest first; ``before`` is the last id of the previous page (keyset pagination:
        new jobs get larger ids, so they never shift a page being walked)."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(min(limit, MAX_PAGE))
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if task is not None:
            query = query.where(jobs.c.task == task)
        if before is not None:
            query = query.where(jobs.c.id < before)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
            return await _with_extras(conn, [_job_from_row(row) for row in rows])

    async def queue_head(self, limit: int, now: datetime) -> list[QueueEntry]:
        """Queued jobs that may start now, highest priority first, then oldest."""
        # Read on every scheduler wake, so on the event loop like a poll, and only what
        # planning needs: decoding whole jobs cost more than the query (issue 6).
        parameters = {"limit": limit, "now": format_timestamp(now)}
        found = self._fast_rows(QUEUE_HEAD_SQL, parameters)
        if found is not None:
            rows: Any = found[0]
        else:
            async with self._read() as conn:
                rows = (await conn.exec_driver_sql(QUEUE_HEAD_SQL, parameters)).all()
        head = sorted(rows, key=lambda row: (-row[2], row[0]))[:limit]
        return [
            QueueEntry(job_id, task, priority, parse_timestamp(ready_since))
            for job_id, task, priority, ready_since in head
        ]

    async def in_state(self, state: JobState) -> list[Job]:
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(jobs).where(jobs.c.state == state.value))).all()
        return [_job_from_row(row) for row in rows]

    async def cancel_requested(self) -> set[str]:
        """Ids of running jobs a client asked to cancel."""
        query = sa.select(jobs.c.id).where(
            jobs.c.state == JobState.RUNNING.value, jobs.c.cancel_requested_at.is_not(None)
        )
        async with self._read() as conn:
            return set((await conn.execute(query)).scalars())

    async def active_counts(self) -> dict[str, int]:
        """How many jobs are queued and running (an index range each, not a table scan)."""
        active = (JobState.QUEUED.value, JobState.RUNNING.value)
        query = (
            sa.select(jobs.c.state, sa.func.count())
            .where(jobs.c.state.in_(active))
            .group_by(jobs.c.state)
        )
        async with self._read() as conn:
            found: dict[str, int] = {state: n for state, n in (await conn.execute(query)).all()}
        return {state: found.get(state, 0) for state in active}

    # -- writes ------------------------------------------------------------------

    async def insert(self, new: NewJob, job_id: str, now: datetime) -> Job:
        """Commit a queued job; when this returns, the row is durable."""
        job, _ = await self.submit(new, job_id, now)
        return job

    async def claim(self, job_id: str, now: datetime) -> Job | None:
        """queued → running, counting an attempt (and opening its ``attempts`` row); None if
        the job is no longer queued."""

        def claim(raw: sqlite3.Connection) -> Job | None:
            job = _set_state(
                raw,
                job_id,
                JobState.QUEUED,
                JobState.RUNNING,
                started_at=format_timestamp(now),
                increments={"attempts": 1},
                pid=None,
                pid_started_at=None,
                reason=None,
                error_type=None,
                error=None,
                traceback=None,
                progress_fraction=None,
                progress_message=None,
                progress_updated_at=None,
            )
            if job is not None:
                _run(
                    raw,
                    OPEN_ATTEMPT,
                    {
                        "v_job_id": job_id,
                        "v_attempt": job.attempts,
                        "v_started_at": format_timestamp(now),
                    },
                )
            return job

        return await self._in_shared_transaction(claim)

    async def record_process(self, job_id: str, pid: int, pid_started_at: float | None) -> None:
        def record(raw: sqlite3.Connection) -> None:
            _run(
                raw,
                RECORD_PROCESS,
                {"job_id": job_id, "v_pid": pid, "v_pid_started_at": pid_started_at},
            )

        await self._in_shared_transaction(record)

    async def finish(self, job_id: str, finish: Finish, now: datetime) -> Job | None:
        """running → a terminal state; None if the job was not running.  The attempt's row
        is closed, and a failure or cancel cancels the jobs that depend on this one."""
        extra: dict[str, Any] = {}
        if finish.artifacts is not None:
            extra["artifacts"] = dump_json([a.__dict__ for a in finish.artifacts])

        def record(raw: sqlite3.Connection) -> Job | None:
            job = _set_state(
                raw,
                job_id,
                JobState.RUNNING,
                finish.state,
                finished_at=format_timestamp(now),
                result=None if finish.result is None else dump_json(finish.result),
                error_type=finish.error.type if finish.error else None,
                error=finish.error.message if finish.error else None,
                traceback=finish.error.traceback if finish.error else None,
                reason=finish.reason,
                exit_code=finish.exit_code,
                peak_rss=finish.peak_rss,
                cpu_seconds=finish.cpu_seconds,
                increments={"failures": 1 if finish.state is JobState.FAILED else 0},
                pid=None,
                **extra,
            )
            if job is not None:
                _close_attempt(raw, job, finish.state.value, finish.error, now)
                _cascade(raw, job, now)
            return job

        return await self._in_shared_transaction(record)

    async def requeue(
        self,
        job_id: str,
        *,
        reason: str,
        run_after: datetime | None = None,
        error: JobError | None = None,
        failed: bool = False,
        rescued: bool = False,
        now: datetime | None = None,
        exit_code: int | None = None,
        pressure: bool = False,
    ) -> Job | None:
        """running → queued: a retry after the task failed (``failed`` counts toward
        ``max_retries``), a rescue after the server died (``rescued`` counts toward
        ``max_rescues``), or a shutdown (counts toward neither)."""
        values: dict[str, Any] = {
            "reason": reason,
            "run_after": None if run_after is None else format_timestamp(run_after),
            "pid": None,
            "pid_started_at": None,
            "cancel_requested_at": None,
        }
        if error is not None:
            values.update(error_type=error.type, error=error.message, traceback=error.traceback)
        increments = {
            "rescues": int(rescued),
            "failures": int(failed),
            # killed to protect the machine: not a failure of the task
            "pressure_requeues": int(pressure),
        }

        def record(raw: sqlite3.Connection) -> Job | None:
            job = _set_state(
                raw, job_id, JobState.RUNNING, JobState.QUEUED, increments=increments, **values
            )
            if job is not None:
                outcome = "retrying" if failed else "pressure" if pressure else "interrupted"
                _close_attempt(raw, job, outcome, error, now or utcnow(), exit_code)
            return job

        return await self._in_shared_transaction(record)

    async def fail_unstarted(self, job_id: str, error: JobError, now: datetime) -> Job | None:
        """queued → failed without running (e.g. a job rescued too often: ``lost``)."""

        def record(raw: sqlite3.Connection) -> Job | None:
            job = _set_state(
                raw,
                job_id,
                JobState.QUEUED,
                JobState.FAILED,
                finished_at=format_timestamp(now),
                error_type=error.type,
                error=error.message,
                traceback=None,
                reason=error.type,
            )
            if job is not None:
                _cascade(raw, job, now)
            return job

        return await self._in_shared_transaction(record)

    async def request_cancel(self, job_id: str, now: datetime, *, owner: str | None = None) -> Job:
        """A queued job is cancelled at once; a running one is flagged for the scheduler,
        which signals its process.  A finished job raises ``InvalidTransition``; with
        ``owner``, another client's job is ``NotFound``."""

        def cancel(raw: sqlite3.Connection) -> Job:
            rows = _run(raw, JOB_BY_ID, {"job_id": job_id})
            job = _job_from_values(rows[0]) if rows else None
            if job is None or (owner is not None and job.owner != owner):
                raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
            check_transition(job.state, JobState.CANCELLED, job_id)
            if job.state is JobState.QUEUED:
                cancelled = _set_state(
                    raw,
                    job_id,
                    JobState.QUEUED,
                    JobState.CANCELLED,
                    finished_at=format_timestamp(now),
                    reason="cancelled by request before it started",
                )
                assert cancelled is not None  # the write lock is held since the read
                _cascade(raw, cancelled, now)
                return cancelled
            if job.cancel_requested:
                return job
            (row,) = _run(
                raw,
                REQUEST_CANCEL,
                {"job_id": job_id, "v_cancel_requested_at": format_timestamp(now)},
            )
            return _job_from_values(row)

        # Alone, not in a shared batch: a bad id or a finished job fails this transaction
        # only, without rolling back the scheduler's writes beside it.
        return await self._write_alone(cancel)

    # -- what operators read: counts and per-task statistics --------------------------

    async def state_counts(self) -> dict[str, int]:
        """How many jobs are stored in each state (every state present, 0 if none)."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        async with self._read() as conn:
            found: dict[str, int] = {state: n for state, n in (await conn.execute(query)).all()}
        return {state.value: found.get(state.value, 0) for state in JobState}

    async def task_stats(self, recent: int = STATS_RECENT) -> list[TaskStats]:
        """Per task: jobs by state (all time), and duration and peak-memory percentiles of
        its ``recent`` most recently created succeeded jobs."""
        counts = sa.select(jobs.c.task, jobs.c.state, sa.func.count()).group_by(
            jobs.c.task, jobs.c.state
        )
        ranked = (
            sa.select(
                jobs.c.task,
                (
                    (sa.func.julianday(jobs.c.finished_at) - sa.func.julianday(jobs.c.started_at))
                    * 86400.0
                ).label("seconds"),
                jobs.c.peak_rss,
                sa.func.row_number()
                .over(partition_by=jobs.c.task, order_by=jobs.c.id.desc())
                .label("n"),
            )
            .where(jobs.c.state == JobState.SUCCEEDED.value, jobs.c.started_at.is_not(None))
            .subquery()
        )
        samples = sa.select(ranked.c.task, ranked.c.seconds, ranked.c.peak_rss).where(
            ranked.c.n <= recent
        )
        async with self._read() as conn:
            count_rows = (await conn.execute(counts)).all()
            sample_rows = (await conn.execute(samples)).all()
        by_task: dict[str, dict[str, int]] = {}
        for task, state, n in count_rows:
            by_task.setdefault(task, {s.value: 0 for s in JobState})[state] = n
        durations: dict[str, list[float]] = {}
        memory: dict[str, list[int]] = {}
        for task, seconds, peak_rss in sample_rows:
            durations.setdefault(task, []).append(max(0.0, float(seconds)))
            if peak_rss is not None:
                memory.setdefault(task, []).append(int(peak_rss))
        stats = []
        for task, states in sorted(by_task.items()):
            ended = states["succeeded"] + states["failed"]
            taken = sorted(durations.get(task, []))
            used = sorted(memory.get(task, []))
            stats.append(
                TaskStats(
                    task=task,
                    count=sum(states.values()),
                    states=states,
                    success_rate=None if ended == 0 else states["succeeded"] / ended,
                    duration_p50=_percentile(taken, 50),
                    duration_p95=_percentile(taken, 95),
                    peak_rss_p95=None if not used else int(_percentile(used, 95) or 0),
                    peak_rss_max=None if not used else used[-1],
                    samples=len(taken),
                )
            )
        return stats

    async def _locked_get(self, conn: AsyncConnection, job_id: str) -> Job:
        row = (await conn.execute(JOB_BY_ID, {"job_id": job_id})).first()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        return _job_from_row(row)

    # -- lifecycle (issue 4) -------------------------------------------------------

    async def submit(
        self, new: NewJob, job_id: str, now: datetime, *, owner: str | None = None
    ) -> tuple[Job, bool]:
        """Insert a queued job with its dependencies and idempotency key, in one
        transaction.  Returns (job, created): with a known key and the same body, the
        original job and False.  Unknown dependencies raise ValidationError, a key reused
        with another body raises Conflict; either way nothing is stored.  With ``owner``,
        only that client's jobs can be dependencies (another client's id is unknown)."""
        if new.idempotency is None and not new.depends_on:
            # Nothing to look up first: the row joins the next group commit.
            return await self._insert_grouped(_new_job_values(new, job_id, now)), True
        async with self._write() as conn:
            key = new.idempotency
            if key is not None:
                found = (
                    await conn.execute(
                        sa.select(idempotency_keys).where(
                            idempotency_keys.c.scope == key.scope,
                            idempotency_keys.c.key == key.key,
                        )
                    )
                ).first()
                cutoff = format_timestamp(now - timedelta(seconds=key.window))
                if found is not None and found.created_at < cutoff:
                    await conn.execute(
                        idempotency_keys.delete().where(
                            idempotency_keys.c.scope == key.scope,
                            idempotency_keys.c.key == key.key,
                        )
                    )
                    found = None
                if found is not None:
                    if found.body_hash != key.body_hash:
                        raise Conflict(
                            f"Idempotency-Key {key.key!r} was used for a different request "
                            f"(job {found.job_id}); use a new key for a new job",
                            {"key": key.key, "job_id": found.job_id},
                        )
                    original = await self._locked_get(conn, found.job_id)
                    return (await _with_extras(conn, [original]))[0], False
            if new.depends_on:
                known = set(
                    (
                        await conn.execute(
                            sa.select(jobs.c.id).where(
                                jobs.c.id.in_(new.depends_on),
                                sa.true() if owner is None else jobs.c.owner == owner,
                            )
                        )
                    ).scalars()
                )
                missing = [dep for dep in new.depends_on if dep not in known]
                if missing:
                    raise ValidationError(
                        "depends_on names jobs that do not exist",
                        [
                            {"field": "depends_on", "message": f"no job with id {dep!r}"}
                            for dep in missing
                        ],
                    )
            values = _new_job_values(new, job_id, now)
            row = (await conn.execute(jobs.insert().values(values).returning(jobs))).one()
            if new.depends_on:
                await conn.execute(
                    dependencies.insert(),
                    [{"job_id": job_id, "depends_on": dep} for dep in new.depends_on],
                )
            if key is not None:
                await conn.execute(
                    idempotency_keys.insert().values(
                        scope=key.scope,
                        key=key.key,
                        body_hash=key.body_hash,
                        job_id=job_id,
                        created_at=format_timestamp(now),
                    )
                )
            job = _job_from_row(row)
            # A dependency may already have failed: the new job is cancelled at once.
            await _cascade_new(conn, job, now)
            found_job = await self._locked_get(conn, job_id)
            return (await _with_extras(conn, [found_job]))[0], True

    async def retry(self, job_id: str, now: datetime, *, owner: str | None = None) -> Job:
        """failed/cancelled → queued as a new attempt (a client's explicit retry).  The
        automatic retry budget starts again; ``attempts`` and the history keep counting.
        With ``owner``, another client's job is ``NotFound``."""
        async with self._write() as conn:
            job = (await _with_extras(conn, [await self._locked_get(conn, job_id)]))[0]
            if owner is not None and job.owner != owner:
                raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
            check_retry(job.state, job_id)
            failed_deps = [
                (dep, state)
                for dep, state in job.waiting_on
                if state in (JobState.FAILED.value, JobState.CANCELLED.value)
            ]
            if failed_deps:
                dep, state = failed_deps[0]
                raise InvalidTransition(
                    f"job {job_id} depends on {dep}, which is {state}; retry {dep} first",
                    {"id": job_id, "depends_on": dep, "state": state},
                )
            row = (
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id, jobs.c.state == job.state.value)
                    .values(
                        state=JobState.QUEUED.value,
                        finished_at=None,
                        result=None,
                        error_type=None,
                        error=None,
                        traceback=None,
                        exit_code=None,
                        cancel_requested_at=None,
                        run_after=None,
                        failures=0,
                        reason=f"retried by request (was {job.state.value})",
                    )
                    .returning(jobs)
                )
            ).one()
            return (await _with_extras(conn, [_job_from_row(row)]))[0]

    async def set_progress(
        self, job_id: str, fraction: float | None, message: str, now: datetime
    ) -> bool:
        """Record a running job's latest progress (the one place progress is stored, so
        notifications can hook here).  False if the job is not running any more."""

        def record(raw: sqlite3.Connection) -> bool:
            found = _run(
                raw,
                SET_PROGRESS,
                {
                    "job_id": job_id,
                    "v_progress_fraction": fraction,
                    "v_progress_message": message,
                    "v_progress_updated_at": format_timestamp(now),
                },
            )
            return bool(found)

        return await self._in_shared_transaction(record)

    async def prunable(
        self, now: datetime, default: float, per_task: dict[str, float], limit: int = 500
    ) -> list[str]:
        """Ids of finished jobs older than their retention (queued/running never)."""
        terminal = [state.value for state in TERMINAL_STATES]
        found: list[str] = []
        async with self._read() as conn:
            for task, seconds in per_task.items():
                query = (
                    sa.select(jobs.c.id)
                    .where(jobs.c.state.in_(terminal), jobs.c.task == task)
                    .where(jobs.c.finished_at < format_timestamp(now - timedelta(seconds=seconds)))
                    .limit(limit)
                )
                found += list((await conn.execute(query)).scalars())
            query = (
                sa.select(jobs.c.id)
                .where(jobs.c.state.in_(terminal), jobs.c.task.not_in(list(per_task)))
                .where(jobs.c.finished_at < format_timestamp(now - timedelta(seconds=default)))
                .limit(limit)
            )
            found += list((await conn.execute(query)).scalars())
        return found

    async def delete_finished(self, job_ids: list[str]) -> list[str]:
        """Delete these jobs if they are still finished (with their attempts, dependency
        rows and idempotency keys, by cascade); returns the ids deleted."""
        if not job_ids:
            return []
        terminal = [state.value for state in TERMINAL_STATES]
        async with self._write() as conn:
            rows = await conn.execute(
                jobs.delete()
                .where(jobs.c.id.in_(job_ids), jobs.c.state.in_(terminal))
                .returning(jobs.c.id)
            )
            return list(rows.scalars())

    async def forget_idempotency_keys(self, before: datetime) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                idempotency_keys.delete().where(
                    idempotency_keys.c.created_at < format_timestamp(before)
                )
            )
        return int(result.rowcount)

    async def schedule_slots(self) -> dict[str, datetime]:
        """The last slot each schedule fired."""
        async with self._read() as conn:
            rows = (await conn.execute(sa.select(schedules.c.name, schedules.c.last_slot))).all()
        return {name: parse_timestamp(slot) for name, slot in rows}

    async def fire_schedule(
        self,
        name: str,
        previous: datetime | None,
        slot: datetime,
        new: NewJob | None,
        job_id: str,
        now: datetime,
    ) -> Job | None:
        """Advance schedule ``name`` from ``previous`` to ``slot`` and (if ``new``) insert
        its job, in one transaction: a slot fires at most once, even across restarts or two
        servers.  None if another writer advanced the slot first, or nothing was inserted."""
        slot_text = format_timestamp(slot)
        async with self._write() as conn:
            if previous is None:
                result = await conn.execute(
                    sa.text(
                        "INSERT INTO schedules (name, last_slot, last_job_id) "
                        "VALUES (:name, :slot, :job) ON CONFLICT (name) DO NOTHING"
                    ),
                    {"name": name, "slot": slot_text, "job": job_id if new else None},
                )
            else:
                result = await conn.execute(
                    schedules.update()
                    .where(
                        schedules.c.name == name,
                        schedules.c.last_slot == format_timestamp(previous),
                    )
                    .values(last_slot=slot_text, last_job_id=job_id if new else None)
                )
            if not result.rowcount or new is None:
                return None
            values = _new_job_values(new, job_id, now)
            values["reason"] = f"scheduled by {name} for {slot_text}"
            row = (await conn.execute(jobs.insert().values(values).returning(jobs))).one()
            return _job_from_row(row)

    # -- the file under an admin's hands (issue 5) ---------------------------------

    def wal_size(self) -> int:
        """Bytes in the write-ahead log (0 when there is none)."""
        try:
            return os.stat(self._database.with_name(self._database.name + "-wal")).st_size
        except FileNotFoundError:
            return 0

    async def checkpoint(self) -> Checkpoint:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` on a connection of its own that never waits:
        while a reader holds an old snapshot, it copies what it can and reports ``busy``
        instead of stalling the writer behind the reader (busy_timeout = 0)."""
        return await asyncio.to_thread(_checkpoint, self._database)

    async def synchronous(self) -> int:
        """The writer's ``PRAGMA synchronous``: 2 (FULL) or 1 (NORMAL)."""
        async with self._write() as conn:
            value = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        return int(value)

    async def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check``: ``["ok"]`` for a sound file."""
        async with self._read() as conn:
            rows = (await conn.exec_driver_sql("PRAGMA integrity_check")).all()
        return [str(row[0]) for row in rows]

    # -- task runs (resource-aware scheduling) ----------------------------------------

    async def record_run(self, run: TaskRun) -> None:
        def record(raw: sqlite3.Connection) -> None:
            _run(
                raw,
                RECORD_RUN,
                {
                    "v_task": run.task,
                    "v_job_id": run.job_id,
                    "v_attempt": run.attempt,
                    "v_outcome": run.outcome,
                    "v_peak_rss": run.peak_rss,
                    "v_cpu_seconds": run.cpu_seconds,
                    "v_wall_seconds": run.wall_seconds,
                    "v_finished_at": format_timestamp(run.finished_at),
                },
            )

        await self._in_shared_transaction(record)

    async def recent_runs(self, task: str, limit: int) -> list[TaskRun]:
        """The task's last ``limit`` measured runs, newest first (through its index)."""
        query = (
            sa.select(task_runs)
            .where(task_runs.c.task == task)
            .order_by(task_runs.c.id.desc())
            .limit(limit)
        )
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            TaskRun(
                task=row.task,
                job_id=row.job_id,
                attempt=row.attempt,
                outcome=row.outcome,
                peak_rss=row.peak_rss,
                cpu_seconds=row.cpu_seconds,
                wall_seconds=row.wall_seconds,
                finished_at=parse_timestamp(row.finished_at),
            )
            for row in rows
        ]

    # -- batched writes (issue 6): see _Batches -------------------------------------------
    # Plain submits (no idempotency key, no dependencies: nothing to read first) and the
    # scheduler's writes each join the next transaction of their batch.

    @contextlib.asynccontextmanager
    async def _driver(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """The writer connection (out of its pool, so no other write interleaves) and its
        aiosqlite connection, for statements sent in one trip each to aiosqlite's thread
        rather than SQLAlchemy's four (cursor, execute, fetch, close)."""
        try:
            async with self._writer.connect() as conn:
                yield conn, (await conn.get_raw_connection()).driver_connection
        except sqlite3.OperationalError as exc:
            raise _unavailable(exc) from exc

    async def _insert_grouped(self, values: dict[str, Any]) -> Job:
        job: Job = await self._inserts.run(values)
        return job

    async def _commit_batch(self, rows: list[dict[str, Any]]) -> list[Job]:
        """Insert ``rows`` in one transaction; the stored jobs, in order, once committed.

        One multi-row INSERT, then COMMIT, on the driver connection.  Through a
        SQLAlchemy transaction the same batch took eight round trips to aiosqlite's
        thread, each one a wake-up of that thread and a handover of the GIL while the
        event loop serves requests (issue 6).  One statement is atomic: a row that breaks
        a constraint fails the whole batch, which is then retried row by row."""
        columns = tuple(rows[0])
        values = [row[name] for row in rows for name in columns]
        sql = _insert_rows_sql(columns, len(rows))

        def insert(raw: sqlite3.Connection) -> None:
            raw.execute(sql, values)
            raw.commit()  # a no-op when the connection autocommits

        async with self._driver() as (_, driver):
            await _in_writer_thread(driver, insert)
        # The stored rows are the values plus the columns' defaults: no SELECT to read
        # them back (issue 6: that statement, and decoding its result rows, cost more than
        # building them).  New jobs without dependencies have no history and wait on
        # nothing: no extras.
        return [_job_from_mapping(_INSERTED_DEFAULTS | values) for values in rows]

    async def _in_shared_transaction(self, operation: Operation[T]) -> T:
        """Run ``operation`` in the next of the scheduler's shared transactions."""
        result: T = await self._shared.run(operation)
        return result

    async def _run_operations(self, operations: list[Operation[Any]]) -> list[Any]:
        """Run the scheduler's operations in one transaction, in one trip to the writer's
        thread (issue 6: statement by statement, a claim took four trips, 1.5 ms under
        load)."""
        async with self._driver() as (_, driver):
            return await _in_writer_thread(driver, lambda raw: _transaction(raw, operations))

    async def _write_alone(self, operation: Operation[T]) -> T:
        """Run ``operation`` in a transaction of its own, in one trip to the writer's thread."""

        def alone(raw: sqlite3.Connection) -> T:
            (result,) = _transaction(raw, [operation])
            return cast(T, result)

        async with self._driver() as (_, driver):
            return await _in_writer_thread(driver, alone)

    # -- fast reads (issue 6) ----------------------------------------------------------
    # Polling one job is the hottest request.  Through SQLAlchemy and aiosqlite it took
    # three statements (the row, its attempts, its dependencies), each several hops to
    # aiosqlite's thread and back, and SQLAlchemy rebuilt an aliased SELECT per call.
    # Here it is one statement (attempts and dependencies as JSON sub-selects) on a plain
    # sqlite3 connection, run on the event loop itself: a primary-key lookup costs tens
    # of microseconds, less than one thread hop.  In WAL mode a reader never waits for
    # the writer; the connection has busy_timeout 0, so in the rare case SQLite answers
    # BUSY (or anything else goes wrong) the read falls back to the pooled async path,
    # which waits and maps errors as before.

    def _fast_rows(self, sql: str, parameters: Any) -> tuple[list[Any], Any] | None:
        """The rows (tuples) of a read run on the event loop, with the cursor's
        description; None when the fast path cannot answer (the file is busy, or anything
        else failed): the caller reads the slow way."""
        try:
            if self._fast is None:
                if self._database is None:
                    return None
                self._fast = _open_fast_reader(self._database)
            cursor = self._fast.execute(sql, parameters)
            return cursor.fetchall(), cursor.description
        except sqlite3.Error:
            return None

    def _fast_get(self, job_id: str) -> Job | None:
        """The job (NotFound if there is none), or None when the fast path cannot say."""
        found = self._fast_rows(GET_JOB_SQL, (job_id,))
        if found is None:
            return None
        rows, description = found
        if not rows:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        values = rows[0]
        # A job polled again and again (the usual case) comes back as the same row:
        # decoding it cost more than reading it, so the last few hundred decoded jobs
        # are kept with their rows, and an identical row gives back the identical Job.
        # Jobs are frozen and nothing changes their args or result in place.
        remembered = self._fast_jobs.get(job_id)
        if remembered is not None and remembered[0] == values:
            return remembered[1]
        if not self._fast_columns:
            self._fast_columns = tuple(column[0] for column in description)
        job = self._decode_fast_row(values)
        if sum(len(value) for value in values if isinstance(value, str)) <= FAST_JOB_TEXT:
            if len(self._fast_jobs) >= FAST_JOBS:
                del self._fast_jobs[next(iter(self._fast_jobs))]  # the oldest
            self._fast_jobs[job_id] = (values, job)
        return job

    def _decode_fast_row(self, values: tuple[Any, ...]) -> Job:
        # A dict, not a sqlite3.Row: Row looks each name up by comparing it with every
        # column's, which cost more than building this (about 30 lookups a job).
        row = dict(zip(self._fast_columns, values, strict=True))
        history = sorted(json.loads(row["x_history"]))
        deps = sorted(json.loads(row["x_deps"]))
        return _job_from_mapping(
            row,
            history=tuple(
                Attempt(
                    attempt=attempt,
                    started_at=parse_timestamp(started),
                    finished_at=_maybe_time(finished),
                    outcome=outcome,
                    error_type=error_type,
                    error=error,
                    exit_code=exit_code,
                )
                for attempt, started, finished, outcome, error_type, error, exit_code in history
            ),
            depends_on=tuple(dep for dep, _ in deps),
            waiting_on=tuple(
                (dep, state) for dep, state in deps if state != JobState.SUCCEEDED.value
            ),
        )


@dataclass(frozen=True)
class Checkpoint:
    busy: bool  # a reader kept part of the log from being copied back
    wal_pages: int
    checkpointed_pages: int
    wal_size_after: int


def _checkpoint(database: Path) -> Checkpoint:
    db = sqlite3.connect(database, timeout=0, isolation_level=None)
    try:
        busy, log, done = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError as exc:
        raise StorageUnavailable(f"checkpoint failed: {exc}", str(exc)) from exc
    finally:
        db.close()
    try:
        after = os.stat(database.with_name(database.name + "-wal")).st_size
    except FileNotFoundError:
        after = 0
    return Checkpoint(bool(busy), int(log), int(done), after)


# The row of ``get``, with what ``_with_extras`` adds, in one statement.
GET_JOB_SQL = """
SELECT jobs.*,
  (SELECT json_group_array(json_array(a.attempt, a.started_at, a.finished_at, a.outcome,
                                      a.error_type, a.error, a.exit_code))
     FROM attempts AS a WHERE a.job_id = jobs.id) AS x_history,
  (SELECT json_group_array(json_array(d.depends_on, p.state))
     FROM dependencies AS d JOIN jobs AS p ON p.id = d.depends_on
    WHERE d.job_id = jobs.id) AS x_deps
FROM jobs WHERE jobs.id = ?
"""


FAST_JOBS = 256  # decoded jobs kept by the fast reader, with their rows
FAST_JOB_TEXT = 16 * 1024  # characters of text a kept row may hold (args, result...)


def _open_fast_reader(database: Path) -> sqlite3.Connection:
    # timeout=0: never wait on the event loop; a busy file falls back to the async path.
    connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False, timeout=0)
    connection.execute("PRAGMA query_only = ON")
    return connection


@dataclass
class GroupCommitStats:
    """Counters of the group commit: rows / transactions is the mean batch size."""

    transactions: int = 0
    rows: int = 0


class _Batches(Generic[Item, Result]):
    """Writes that arrive while one transaction commits all go into the next (issue 6).

    One commit with synchronous=FULL is an fsync, and every statement a trip to
    aiosqlite's thread: a transaction per submit, claim or outcome caps them at the
    disk's fsync rate and queues them behind each other.  ``commit`` writes a batch in
    one transaction and returns one result per item, in order.  Each caller is answered
    only after the commit that holds its item (a 202 still means "durable").  A batch
    that fails is rolled back and its items retried one transaction each, so one bad
    item never fails the others; a file that cannot be written at all fails them all at
    once.  The batch runs in a task of its own, so a caller that goes away (a client
    disconnecting) never cancels the others' commit.
    """

    def __init__(self, commit: Callable[[list[Item]], Awaitable[list[Result]]], limit: int) -> None:
        self._commit = commit
        self._limit = limit
        self._queued: list[tuple[Item, asyncio.Future[Result]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.stats = GroupCommitStats()

    async def run(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queued.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await future

    async def drain(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])  # wait() never raises the task's outcome

    async def _flush(self) -> None:
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued[: self._limit], self._queued[self._limit :]
                try:
                    results = await self._counted([item for item, _ in batch])
                except StorageUnavailable as exc:
                    # Locked past the busy timeout, disk full: one by one would only wait
                    # that long again.
                    for _, future in batch:
                        _answer(future, exc)
                    continue
                except Exception as exc:
                    if len(batch) == 1:
                        _answer(batch[0][1], exc)
                        continue
                    log.warning(
                        "a batch of %d writes failed (%s); retrying one by one", len(batch), exc
                    )
                    for item, future in batch:
                        try:
                            (result,) = await self._counted([item])
                        except Exception as one:
                            _answer(future, one)
                        else:
                            _answer(future, result)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    _answer(future, result)
        finally:
            # Cancelled (the loop is closing): nobody is left waiting forever.
            for _, future in batch + self._queued:
                if not future.done():
                    future.cancel()

    async def _counted(self, items: list[Item]) -> list[Result]:
        results = await self._commit(items)
        self.stats.transactions += 1
        self.stats.rows += len(items)
        return results


def _answer(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # its caller went away; the row is committed all the same
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


GROUP_COMMIT_MAX = 500  # rows per transaction: 5,000 parameters, well under SQLite's 32,766
SHARED_MAX = 200  # scheduler writes per shared transaction: bounds how long one holds the lock


@functools.lru_cache(maxsize=64)
def _insert_rows_sql(columns: tuple[str, ...], count: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {jobs.name} ({', '.join(columns)}) VALUES " + ", ".join([row] * count)


def _inserted_defaults() -> dict[str, Any]:
    """What a new row holds in the columns that ``_new_job_values`` leaves out: the
    column's server default (the migrations give the file the same ones), else NULL."""
    return {
        column.name: None
        if column.server_default is None
        else column.type.python_type(column.server_default.arg)  # type: ignore[attr-defined]
        for column in jobs.columns
    }


_INSERTED_DEFAULTS = _inserted_defaults()


def _new_job_values(new: NewJob, job_id: str, now: datetime) -> dict[str, Any]:
    return {
        "id": job_id,
        "task": new.task,
        "args": dump_json(new.args),
        "state": JobState.QUEUED.value,
        "priority": new.priority,
        "created_at": format_timestamp(now),
        "max_retries": new.max_retries,
        # A REAL column: what a read gives back (5.0, not 5) for the row built from these.
        "timeout": None if new.timeout is None else float(new.timeout),
        "run_after": None if new.run_after is None else format_timestamp(new.run_after),
        "owner": new.owner,
    }


async def _with_extras(conn: AsyncConnection, found: list[Job]) -> list[Job]:
    """Jobs with their history, their dependencies and the unfinished ones' states."""
    if not found:
        return found
    ids = [job.id for job in found]
    history: dict[str, list[Attempt]] = {}
    for row in (
        await conn.execute(
            sa.select(attempts)
            .where(attempts.c.job_id.in_(ids))
            .order_by(attempts.c.job_id, attempts.c.attempt)
        )
    ).all():
        history.setdefault(row.job_id, []).append(
            Attempt(
                attempt=row.attempt,
                started_at=parse_timestamp(row.started_at),
                finished_at=_maybe_time(row.finished_at),
                outcome=row.outcome,
                error_type=row.error_type,
                error=row.error,
                exit_code=row.exit_code,
            )
        )
    parent = jobs.alias("parent")
    deps: dict[str, list[tuple[str, str]]] = {}
    for row in (
        await conn.execute(
            sa.select(dependencies.c.job_id, dependencies.c.depends_on, parent.c.state)
            .join(parent, parent.c.id == dependencies.c.depends_on)
            .where(dependencies.c.job_id.in_(ids))
            .order_by(dependencies.c.job_id, dependencies.c.depends_on)
        )
    ).all():
        deps.setdefault(row.job_id, []).append((row.depends_on, row.state))
    return [
        dataclasses.replace(
            job,
            history=tuple(history.get(job.id, ())),
            depends_on=tuple(dep for dep, _ in deps.get(job.id, ())),
            waiting_on=tuple(
                (dep, state)
                for dep, state in deps.get(job.id, ())
                if state != JobState.SUCCEEDED.value
            ),
        )
        for job in found
    ]


def _set_state(
    raw: sqlite3.Connection,
    job_id: str,
    source: JobState,
    target: JobState,
    increments: dict[str, int] | None = None,
    **values: Any,
) -> Job | None:
    """source → target, setting ``values`` and adding ``increments`` to counters."""
    check_transition(source, target, job_id)
    increments = increments or {}
    statement = _set_state_statement(source, target, tuple(values), tuple(increments))
    parameters: dict[str, Any] = {"job_id": job_id}
    parameters.update({f"v_{name}": value for name, value in values.items()})
    parameters.update({f"add_{name}": value for name, value in increments.items()})
    rows = _run(raw, statement, parameters)
    return _job_from_values(rows[0]) if rows else None


def _close_attempt(
    raw: sqlite3.Connection,
    job: Job,
    outcome: str,
    error: JobError | None,
    now: datetime,
    exit_code: int | None = None,
) -> None:
    _run(
        raw,
        CLOSE_ATTEMPT,
        {
            "w_job_id": job.id,
            "w_attempt": job.attempts,
            "v_finished_at": format_timestamp(now),
            "v_outcome": outcome,
            "v_error_type": error.type if error else None,
            "v_error": error.message if error else None,
            "v_exit_code": job.exit_code if exit_code is None else exit_code,
        },
    )


def _cascade(raw: sqlite3.Connection, job: Job, now: datetime) -> None:
    """A failed or cancelled job cancels every queued job that (transitively) depends on
    it, in the caller's transaction."""
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        return
    pending = [(job.id, job.state.value)]
    while pending:
        cause, cause_state = pending.pop()
        for (dependent,) in _run(raw, QUEUED_DEPENDENTS, {"cause": cause}):
            check_transition(JobState.QUEUED, JobState.CANCELLED, dependent)
            reason = f"dependency {cause} {cause_state}"
            _run(
                raw,
                CANCEL_DEPENDENT,
                {"job_id": dependent, "v_finished_at": format_timestamp(now), "v_reason": reason},
            )
            pending.append((dependent, JobState.CANCELLED.value))
            log.info("job %s: queued -> cancelled: %s", dependent, reason)


async def _cascade_new(conn: AsyncConnection, job: Job, now: datetime) -> None:
    """Cancel a just-inserted job at once if one of its dependencies already failed."""
    parent = jobs.alias("parent")
    row = (
        await conn.execute(
            sa.select(parent.c.id, parent.c.state)
            .join(dependencies, dependencies.c.depends_on == parent.c.id)
            .where(
                dependencies.c.job_id == job.id,
                parent.c.state.in_([JobState.FAILED.value, JobState.CANCELLED.value]),
            )
            .limit(1)
        )
    ).first()
    if row is not None:
        reason = f"dependency {row.id} {row.state}"
        await conn.execute(
            jobs.update()
            .where(jobs.c.id == job.id)
            .values(
                state=JobState.CANCELLED.value,
                finished_at=format_timestamp(now),
                reason=reason,
                error_type="DependencyFailed",
                error=reason,
            )
        )


# -- statements built once (issue 6) ---------------------------------------------------
# Building a SQLAlchemy statement and its cache key costs more than SQLite takes to run
# it; the scheduler's writes run per job, so their statements are built once and bound.
# (Bound names differ from column names: SQLAlchemy reserves those in SET clauses.)


@functools.cache
def _set_state_statement(
    source: JobState, target: JobState, names: tuple[str, ...], counters: tuple[str, ...]
) -> sa.Update:
    values: dict[str, Any] = {
        name: sa.bindparam(f"v_{name}", type_=jobs.c[name].type) for name in names
    }
    values.update({name: jobs.c[name] + sa.bindparam(f"add_{name}") for name in counters})
    return (
        jobs.update()
        .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == source.value)
        .values(state=target.value, **values)
        .returning(jobs)
    )


def _insert_statement(table: sa.Table, names: tuple[str, ...]) -> sa.Insert:
    return table.insert().values({name: sa.bindparam(f"v_{name}") for name in names})


OPEN_ATTEMPT = _insert_statement(attempts, ("job_id", "attempt", "started_at"))
RECORD_RUN = _insert_statement(
    task_runs,
    (
        "task",
        "job_id",
        "attempt",
        "outcome",
        "peak_rss",
        "cpu_seconds",
        "wall_seconds",
        "finished_at",
    ),
)
RECORD_PROCESS = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == JobState.RUNNING.value)
    .values(pid=sa.bindparam("v_pid"), pid_started_at=sa.bindparam("v_pid_started_at"))
)
CLOSE_ATTEMPT = (
    attempts.update()
    .where(
        attempts.c.job_id == sa.bindparam("w_job_id"),
        attempts.c.attempt == sa.bindparam("w_attempt"),
        attempts.c.finished_at.is_(None),
    )
    .values(
        {
            name: sa.bindparam(f"v_{name}")
            for name in ("finished_at", "outcome", "error_type", "error", "exit_code")
        }
    )
)
SET_PROGRESS = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == JobState.RUNNING.value)
    .values(
        {
            name: sa.bindparam(f"v_{name}")
            for name in ("progress_fraction", "progress_message", "progress_updated_at")
        }
    )
    .returning(jobs.c.id)
)
QUEUED_DEPENDENTS = (
    sa.select(jobs.c.id)
    .join(dependencies, dependencies.c.job_id == jobs.c.id)
    .where(dependencies.c.depends_on == sa.bindparam("cause"))
    .where(jobs.c.state == JobState.QUEUED.value)
)
CANCEL_DEPENDENT = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == JobState.QUEUED.value)
    .values(
        state=JobState.CANCELLED.value,
        finished_at=sa.bindparam("v_finished_at"),
        reason=sa.bindparam("v_reason"),
        error_type="DependencyFailed",
        error=sa.bindparam("v_reason"),
    )
)
JOB_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
REQUEST_CANCEL = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"))
    .values(cancel_requested_at=sa.bindparam("v_cancel_requested_at"))
    .returning(jobs)
)
JOB_COLUMNS = tuple(column.name for column in jobs.c)
_DIALECT = sqlite_dialect(paramstyle="named")


@functools.cache
def _compiled(statement: sa.ClauseElement) -> tuple[str, dict[str, Any]]:
    """The SQL text of a statement built once, and the values of its literal parameters."""
    compiled = statement.compile(dialect=_DIALECT)
    return str(compiled), dict(compiled.params)


def _run(
    raw: sqlite3.Connection, statement: sa.ClauseElement, parameters: dict[str, Any]
) -> list[Any]:
    """Run a prebuilt statement in the writer's thread (inside an Operation).  Returns the
    rows, as tuples (of ``JOB_COLUMNS`` for ``RETURNING jobs``)."""
    sql, literals = _compiled(statement)
    return raw.execute(sql, {**literals, **parameters}).fetchall()


def _transaction(raw: sqlite3.Connection, operations: list[Operation[Any]]) -> list[Any]:
    """The operations' results, committed together; nothing of them if one raises."""
    raw.execute("BEGIN IMMEDIATE")
    try:
        results = [operation(raw) for operation in operations]
        raw.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            raw.execute("ROLLBACK")
        raise
    return results


def _in_writer_thread(driver: Any, function: Callable[[sqlite3.Connection], T]) -> Awaitable[T]:
    """``function(connection)`` on the writer's sqlite3 connection, in aiosqlite's thread,
    in one trip.  Each trip wakes that thread and hands the GIL over and back, 0.1 to 0.4
    ms under load; statement by statement, a transaction took one per statement (issue 6).
    aiosqlite offers no public call for this: ``_execute`` and ``_conn`` are its own
    (pyproject.toml pins the versions this runs on; every write goes through here)."""
    result: Awaitable[T] = driver._execute(function, driver._conn)
    return result


def _job_from_values(values: Any) -> Job:
    return _job_from_mapping(dict(zip(JOB_COLUMNS, values, strict=True)))


# The queue head: two index walks that never touch a job that may not start yet: up to
# :limit jobs without run_after by priority then age (ix_jobs_ready), and up to :limit
# delayed jobs that are due, earliest due first (ix_jobs_delayed); the caller merges them
# by priority then age, so when more than :limit delayed jobs are due at once the
# earliest due come first.  (One walk of ix_jobs_queue with run_after <= now as a filter
# read every delayed job queued ahead of the first ready one, on every scheduler wake:
# 13 ms with 100,000 delayed jobs.)  The indexes are named: without statistics SQLite
# prefers the plain (state, ...) ones, and 'queued' is written out because SQLite only
# uses a partial index whose WHERE the query repeats literally.  Timestamps are ISO 8601
# text of one format, so max() of the text is the later time.
QUEUE_HEAD_SQL = """
SELECT * FROM (
  SELECT id, task, priority, created_at AS ready_since
  FROM jobs INDEXED BY ix_jobs_ready
  WHERE state = 'queued' AND run_after IS NULL AND NOT EXISTS (
    SELECT 1 FROM dependencies JOIN jobs AS parent ON parent.id = dependencies.depends_on
    WHERE dependencies.job_id = jobs.id AND parent.state != 'succeeded')
  ORDER BY priority DESC, id LIMIT :limit)
UNION ALL
SELECT * FROM (
  SELECT id, task, priority, max(created_at, run_after) AS ready_since
  FROM jobs INDEXED BY ix_jobs_delayed
  WHERE state = 'queued' AND run_after IS NOT NULL AND run_after <= :now AND NOT EXISTS (
    SELECT 1 FROM dependencies JOIN jobs AS parent ON parent.id = dependencies.depends_on
    WHERE dependencies.job_id = jobs.id AND parent.state != 'succeeded')
  ORDER BY run_after LIMIT :limit)
"""


def _unavailable(exc: OperationalError | sqlite3.OperationalError) -> StorageUnavailable:
    return StorageUnavailable(
        "the job database cannot be used right now (disk full, read-only or locked); "
        "nothing was changed; retry later",
        str(exc.orig if isinstance(exc, OperationalError) else exc),
    )


def _job_from_row(row: Row[Any]) -> Job:
    return _job_from_mapping(row._mapping)


def _job_from_mapping(
    m: Any,
    *,
    history: tuple[Attempt, ...] = (),
    depends_on: tuple[str, ...] = (),
    waiting_on: tuple[tuple[str, str], ...] = (),
) -> Job:
    """The job of a row; with the extras (``_with_extras``) when the caller read them."""
    error = None
    if m["error"] is not None:
        error = JobError(m["error_type"] or "Error", m["error"], m["traceback"])
    return Job(
        id=m["id"],
        task=m["task"],
        args=json.loads(m["args"]),
        state=JobState(m["state"]),
        priority=m["priority"],
        created_at=parse_timestamp(m["created_at"]),
        started_at=_maybe_time(m["started_at"]),
        finished_at=_maybe_time(m["finished_at"]),
        attempts=m["attempts"],
        max_retries=m["max_retries"],
        failures=m["failures"],
        rescues=m["rescues"],
        result=None if m["result"] is None else json.loads(m["result"]),
        error=error,
        reason=m["reason"],
        cancel_requested=m["cancel_requested_at"] is not None,
        run_after=_maybe_time(m["run_after"]),
        pid=m["pid"],
        pid_started_at=m["pid_started_at"],
        exit_code=m["exit_code"],
        peak_rss=m["peak_rss"],
        cpu_seconds=m["cpu_seconds"],
        timeout=m["timeout"],
        progress=None
        if m["progress_updated_at"] is None
        else Progress(
            m["progress_fraction"],
            m["progress_message"] or "",
            parse_timestamp(m["progress_updated_at"]),
        ),
        artifacts=tuple(Artifact(**item) for item in json.loads(m["artifacts"] or "[]")),
        owner=m["owner"],
        pressure_requeues=m["pressure_requeues"],
        history=history,
        depends_on=depends_on,
        waiting_on=waiting_on,
    )


def _progress_from(m: Any) -> Progress | None:
    if m["progress_updated_at"] is None:
        return None
    return Progress(
        m["progress_fraction"],
        m["progress_message"] or "",
        parse_timestamp(m["progress_updated_at"]),
    )


def _maybe_time(text: str | None) -> datetime | None:
    return None if text is None else parse_timestamp(text)


# -- SQLite specifics ------------------------------------------------------------------
# Everything below is what a PostgreSQL backend would replace.

BUSY_TIMEOUT_MS = 10_000
JOURNAL_SIZE_LIMIT = 64 * 2**20


def _configure_sqlite(sync_engine: sa.Engine, *, begin: str, synchronous: str) -> None:
    """Per-connection pragmas, and transactions we begin ourselves.

    pysqlite's own implicit BEGIN is switched off (isolation_level=None) so that SQLAlchemy's
    ``begin`` event can issue ``BEGIN IMMEDIATE`` on the writer: the write lock is taken up
    front and waits on ``busy_timeout`` instead of failing mid-transaction.
    """

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
            f"PRAGMA synchronous = {synchronous}",
            "PRAGMA foreign_keys = ON",
            f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(begin)


def migrations_dir() -> Path:
    """The Alembic scripts: shipped inside the package as ``jobserver.migrations``; in a
    source checkout that was not installed, the repository's ``migrations/``."""
    try:
        shipped = Path(str(resources.files("jobserver.migrations")))
    except ModuleNotFoundError:
        shipped = Path(__file__).resolve().parent.parent / "migrations"
    return shipped


def migrate(database: Path) -> tuple[str | None, str | None]:
    """Create the file if needed, switch it to WAL, and apply every pending migration;
    returns the schema revision before and after."""
    from alembic import command
    from alembic.config import Config
    from alembic.migration import MigrationContext

    # Alembic narrates every step at INFO; one line from us says what changed.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    database.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            # WAL persists in the file: readers (an admin's sqlite3 shell) never block writers.
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            before = MigrationContext.configure(conn).get_current_revision()
            config = Config()
            config.set_main_option("script_location", str(migrations_dir()))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
            after = MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
    if before != after:
        log.info("migrated %s from schema %s to %s", database, before or "(empty)", after)
    return before, after


def pending_migrations(database: Path) -> list[str]:
    """The revisions ``migrate`` would apply to an existing file, oldest first; empty for
    a file that does not exist (nothing to lose) or is up to date."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    if not database.is_file():
        return []
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    script = ScriptDirectory.from_config(config)
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_heads()
    finally:
        engine.dispose()
    applied = {rev.revision for rev in script.iterate_revisions(current, "base")}
    return [
        rev.revision
        for rev in reversed(list(script.walk_revisions()))
        if rev.revision not in applied
    ]


class DatabaseLock:
    """An exclusive ``flock`` on ``<database>.lock``, held while a server runs.

    Only one server may serve a file: a second one would requeue the first one's running
    jobs as if their server had died.  The lock dies with the process, even on SIGKILL.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ServerLocked(
                f"another jobserver (pid {holder}) is already serving {self.path.with_suffix('')}; "
                "stop it first or point this one at another database",
                {"pid": holder, "lock": str(self.path)},
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
