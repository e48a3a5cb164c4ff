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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from jobserver.errors import NotFound, ServerLocked, StorageUnavailable
from jobserver.jobs import (
    TERMINAL_STATES,
    Job,
    JobError,
    JobState,
    check_transition,
    format_timestamp,
    parse_timestamp,
)

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
sa.Index("ix_jobs_state_id", jobs.c.state, jobs.c.id)
sa.Index("ix_jobs_task_id", jobs.c.task, jobs.c.id)

MAX_PAGE = 1000


def dump_json(value: Any) -> str:
    """JSON text as stored: compact, UTF-8, and strictly JSON (no NaN)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


@dataclass(frozen=True)
class NewJob:
    task: str
    args: dict[str, Any]
    priority: int
    max_retries: int


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

    def __init__(self, writer: AsyncEngine, reader: AsyncEngine) -> None:
        self._writer = writer
        self._reader = reader

    @classmethod
    def open(cls, database: Path, *, synchronous: str = "FULL") -> Store:
        """Engines on an existing, migrated file (see ``migrate``)."""
        url = f"sqlite+aiosqlite:///{database}"
        writer = create_async_engine(url, pool_size=1, max_overflow=0, pool_timeout=60)
        reader = create_async_engine(url, pool_size=4, max_overflow=0, pool_timeout=60)
        _configure_sqlite(writer.sync_engine, begin="BEGIN IMMEDIATE", synchronous=synchronous)
        _configure_sqlite(reader.sync_engine, begin="BEGIN", synchronous=synchronous)
        return cls(writer, reader)

    async def close(self) -> None:
        await self._writer.dispose()
        await self._reader.dispose()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """One write transaction (BEGIN IMMEDIATE, committed on exit)."""
        try:
            async with self._writer.begin() as conn:
                yield conn
        except OperationalError as exc:
            raise _unavailable(exc) from exc

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with self._reader.connect() as conn:
                yield conn
        except OperationalError as exc:
            raise _unavailable(exc) from exc

    # -- reads -------------------------------------------------------------------

    async def get(self, job_id: str) -> Job:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        return _job_from_row(row)

    async def page(
        self,
        *,
        state: JobState | None = None,
        task: str | None = None,
        limit: int = 50,
        before: str | None = None,
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
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        return [_job_from_row(row) for row in rows]

    async def queue_head(self, limit: int, now: datetime) -> list[Job]:
        """Queued jobs that may start now, highest priority first, then oldest."""
        async with self._read() as conn:
            rows = (await conn.execute(queue_head_query(limit, now))).all()
        return [_job_from_row(row) for row in rows]

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
        values = {
            "id": job_id,
            "task": new.task,
            "args": dump_json(new.args),
            "state": JobState.QUEUED.value,
            "priority": new.priority,
            "created_at": format_timestamp(now),
            "max_retries": new.max_retries,
        }
        async with self._write() as conn:
            row = (await conn.execute(jobs.insert().values(values).returning(jobs))).one()
        return _job_from_row(row)

    async def claim(self, job_id: str, now: datetime) -> Job | None:
        """queued → running, counting an attempt; None if the job is no longer queued."""
        async with self._write() as conn:
            return await self._set_state(
                conn,
                job_id,
                JobState.QUEUED,
                JobState.RUNNING,
                started_at=format_timestamp(now),
                attempts=jobs.c.attempts + 1,
                pid=None,
                pid_started_at=None,
                reason=None,
            )

    async def record_process(self, job_id: str, pid: int, pid_started_at: float | None) -> None:
        async with self._write() as conn:
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == JobState.RUNNING.value)
                .values(pid=pid, pid_started_at=pid_started_at)
            )

    async def finish(self, job_id: str, finish: Finish, now: datetime) -> Job | None:
        """running → a terminal state; None if the job was not running."""
        async with self._write() as conn:
            return await self._set_state(
                conn,
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
                failures=jobs.c.failures + (1 if finish.state is JobState.FAILED else 0),
                pid=None,
            )

    async def requeue(
        self,
        job_id: str,
        *,
        reason: str,
        run_after: datetime | None = None,
        error: JobError | None = None,
        failed: bool = False,
        rescued: bool = False,
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
        if rescued:
            values["rescues"] = jobs.c.rescues + 1
        if failed:
            values["failures"] = jobs.c.failures + 1
        async with self._write() as conn:
            return await self._set_state(conn, job_id, JobState.RUNNING, JobState.QUEUED, **values)

    async def fail_unstarted(self, job_id: str, error: JobError, now: datetime) -> Job | None:
        """queued → failed without running (e.g. a job rescued too often: ``lost``)."""
        async with self._write() as conn:
            return await self._set_state(
                conn,
                job_id,
                JobState.QUEUED,
                JobState.FAILED,
                finished_at=format_timestamp(now),
                error_type=error.type,
                error=error.message,
                traceback=None,
                reason=error.type,
            )

    async def request_cancel(self, job_id: str, now: datetime) -> Job:
        """A queued job is cancelled at once; a running one is flagged for the scheduler,
        which signals its process.  A finished job raises ``InvalidTransition``."""
        async with self._write() as conn:
            job = await self._locked_get(conn, job_id)
            check_transition(job.state, JobState.CANCELLED, job_id)
            if job.state is JobState.QUEUED:
                cancelled = await self._set_state(
                    conn,
                    job_id,
                    JobState.QUEUED,
                    JobState.CANCELLED,
                    finished_at=format_timestamp(now),
                    reason="cancelled by request before it started",
                )
                assert cancelled is not None  # the write lock is held since the read
                return cancelled
            if job.cancel_requested:
                return job
            row = (
                await conn.execute(
                    jobs.update()
                    .where(jobs.c.id == job_id)
                    .values(cancel_requested_at=format_timestamp(now))
                    .returning(jobs)
                )
            ).one()
            return _job_from_row(row)

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
        row = (await conn.execute(sa.select(jobs).where(jobs.c.id == job_id))).first()
        if row is None:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        return _job_from_row(row)

    async def _set_state(
        self,
        conn: AsyncConnection,
        job_id: str,
        source: JobState,
        target: JobState,
        **values: Any,
    ) -> Job | None:
        check_transition(source, target, job_id)
        row = (
            await conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id, jobs.c.state == source.value)
                .values(state=target.value, **values)
                .returning(jobs)
            )
        ).first()
        return None if row is None else _job_from_row(row)


def queue_head_query(limit: int, now: datetime) -> sa.Select[Any]:
    """Queued jobs whose time has come, by priority then age: read through ix_jobs_queue."""
    return (
        sa.select(jobs)
        .where(jobs.c.state == JobState.QUEUED.value)
        .where(sa.or_(jobs.c.run_after.is_(None), jobs.c.run_after <= format_timestamp(now)))
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(limit)
    )


def _unavailable(exc: OperationalError) -> StorageUnavailable:
    return StorageUnavailable(
        "the job database cannot be used right now (disk full, read-only or locked); "
        "nothing was changed; retry later",
        str(exc.orig),
    )


def _job_from_row(row: Row[Any]) -> Job:
    m = row._mapping
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


def migrate(database: Path) -> None:
    """Create the file if needed, switch it to WAL, and apply every pending migration."""
    from alembic import command
    from alembic.config import Config

    database.parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(f"sqlite:///{database}")
    try:
        with engine.begin() as conn:
            # WAL persists in the file: readers (an admin's sqlite3 shell) never block writers.
            conn.exec_driver_sql("PRAGMA journal_mode = WAL")
            config = Config()
            config.set_main_option("script_location", str(migrations_dir()))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
    finally:
        engine.dispose()


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
