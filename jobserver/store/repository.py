"""The job repository: every operation on stored jobs, written once for every driver.

Each method is one transaction: an ``Operation`` (a plain function of a ``driver.Tx``)
that the driver runs where it likes (see ``driver``).  Statements are SQLAlchemy Core,
dialect-neutral; the few places where SQLite needs a hint carry it as a SQLite-only
hint that other dialects ignore.  Rows are decoded by one function, ``decode_job``.

State changes are compare-and-set statements guarded by ``jobs.can_transition``: an
``UPDATE ... WHERE id = ? AND state = ?`` that changes one row or none, so two actors
(a cancel request and a finishing process) can never both win.  Every write about an
attempt (its process, progress, end or requeue) also compares the node incarnation that
claimed it (one start of a node) and the attempt's number, so a late write about an
attempt that is over changes nothing.  On SQLite the node is always the one server.

Methods that change a job's state return a ``Changed``: the job as stored after the
change, the state it left, and the jobs cancelled with it (its dependents), so that
callers publish every transition.

Beside ``jobs``: ``attempts`` (one row per start of a job's process), ``dependencies``
(read by the queue head, so a job whose dependencies have not all succeeded is never
admitted), ``schedules`` (the last cron slot fired), ``idempotency_keys`` and
``task_runs`` (what each measured attempt used).  Deleting a job cascades to its rows;
the pruner's delete leaves a row in ``pruned_jobs`` (id, owner, when), so that a read of
that id raises ``Gone`` instead of ``NotFound`` until the row is forgotten.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from jobserver.errors import Conflict, Gone, InvalidTransition, NotFound, ValidationError
from jobserver.jobs import (
    MAX_PRIORITY,
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
    new_job_id,
    parse_timestamp,
    utcnow,
)
from jobserver.store.driver import Batches, Driver, Row, Tx
from jobserver.store.schema import (
    JOB_COLUMNS,
    NOTIFY_CHANNEL,
    QUEUED_LITERAL,
    attempts,
    dependencies,
    idempotency_keys,
    jobs,
    nodes,
    pruned_jobs,
    schedules,
    task_runs,
)

MAX_PAGE = 1000
STATS_RECENT = 1000
SERIES_ROWS = 50_000  # finished jobs a task series reads at most (the newest)
LOCAL_NODE = "local"  # the node name of a single server (SQLite)


def dump_json(value: Any) -> str:
    """JSON text as stored: compact, UTF-8, and strictly JSON (no NaN)."""
    return _DUMP.encode(value)


# Built once: json.dumps with options builds an encoder per call (twice per submit).
_DUMP = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# -- what callers pass in and get back -----------------------------------------------------


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
    timeout: float | None = None
    run_after: datetime | None = None
    depends_on: tuple[str, ...] = ()
    idempotency: IdempotencyKey | None = None
    owner: str | None = None  # the token name submitting it; None: anonymous
    schedule: str | None = None  # the schedule firing it (set by fire_schedule)
    schedule_slot: datetime | None = None


@dataclass(frozen=True)
class TaskRun:
    """What one attempt of a task used (a row of ``task_runs``)."""

    task: str
    job_id: str
    attempt: int
    outcome: str
    peak_rss: int
    cpu_seconds: float
    wall_seconds: float
    finished_at: datetime


@dataclass(frozen=True)
class Finish:
    """An attempt ends for good: its job goes to a terminal state."""

    state: JobState
    result: Any = None
    error: JobError | None = None
    reason: str | None = None
    exit_code: int | None = None
    peak_rss: int | None = None
    cpu_seconds: float | None = None
    artifacts: tuple[Artifact, ...] | None = None


# What a requeue counts toward: max_retries, max_rescues, max_pressure_requeues, or none.
FAILURE, RESCUE, PRESSURE = "failure", "rescue", "pressure"


@dataclass(frozen=True)
class Requeue:
    """An attempt ends and its job goes back to the queue (a retry, a rescue, a shutdown,
    memory pressure).  A job whose cancel was acknowledged is cancelled instead: a
    requeue never drops a cancel."""

    reason: str
    counts: str | None = None  # FAILURE, RESCUE, PRESSURE, or None (a shutdown)
    run_after: datetime | None = None
    error: JobError | None = None
    exit_code: int | None = None

    @property
    def attempt_outcome(self) -> str:
        return {FAILURE: "retrying", PRESSURE: "pressure"}.get(self.counts or "", "interrupted")


@dataclass(frozen=True)
class Changed:
    """A state change: the job as stored after it, the state it left (None: it was just
    submitted), and the dependents cancelled with it, each with the state it left."""

    job: Job
    source: JobState | None
    cascaded: tuple[Job, ...] = ()


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


@dataclass(frozen=True)
class AttemptSpan:
    """One attempt of a job, for a timeline: when it ran, how it ended (None while it
    runs), the job's state now, and the node that ran it."""

    job_id: str
    task: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    outcome: str | None
    state: JobState
    node: str | None


@dataclass(frozen=True)
class TaskBucket:
    """The jobs of one task that finished in one time bucket: how many, by state, and the
    p50/p95 duration (start to finish of their last attempt) of those that succeeded."""

    start: datetime
    finished: int
    succeeded: int
    failed: int
    cancelled: int
    duration_p50: float | None  # seconds; None when none succeeded
    duration_p95: float | None


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a bulk operation touches: every criterion given must hold.  ``states``
    empty means every state the operation applies to; ``created_before`` bounds the age."""

    task: str | None = None
    states: tuple[JobState, ...] = ()
    created_before: datetime | None = None
    owner: str | None = None  # None: every client's jobs (an admin)


# The queue head, and per limited task in it its jobs running on every node (counted under
# the task's lock; empty on SQLite, where this server's own running jobs are all of them).
Choose = Callable[[list[QueueEntry], Mapping[str, int]], Sequence[str]]

# How the leader ends a dead incarnation's running job: the end and the reason to log.
Rescue = Callable[[Job], tuple["Finish | Requeue", str]]
# Given the live nodes' (name, definitions), raise if this node's definitions conflict.
CheckDefinitions = Callable[[list[tuple[str, Any]]], None]


@dataclass(frozen=True)
class NodeRecord:
    """One incarnation of a node, as ``GET /api/v1/system`` shows it.  ``alive`` and
    ``heartbeat_age`` are judged by the database's clock."""

    name: str
    incarnation: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age: float  # seconds since its last heartbeat
    dead_at: datetime | None
    alive: bool  # not declared dead, and heard from within the node timeout
    leader: bool
    url: str | None
    resources: dict[str, Any]  # what it last published: capacity, free, max_jobs
    running: int  # the jobs its attempts run, as stored
    cordoned: bool


@dataclass(frozen=True)
class Beat:
    """What one heartbeat did: whether this incarnation is still alive (False: it was
    declared dead, and must stop its jobs and register anew), whether it leads, and as
    the leader the incarnations it declared dead and the jobs it rescued (with reasons)."""

    alive: bool
    leader: bool = False
    declared_dead: tuple[str, ...] = ()
    rescued: tuple[tuple[Changed, str], ...] = ()


class Store:
    """The job repository over one driver (see the module docstring).  ``node`` is this
    node's name, shown in each attempt; ``incarnation`` (default: the name) this start
    of it, which claims and fences every write about an attempt.  A node declared dead
    registers again under a new incarnation (``register_node``)."""

    def __init__(self, driver: Driver, *, node: str = LOCAL_NODE, incarnation: str = "") -> None:
        self.driver = driver
        self.node = node
        self.incarnation = incarnation or node
        # Decoded jobs with the rows they came from: an unchanged job read again (a poll)
        # is not decoded again.  Keyed on the rows' values, never on an object.
        self._decoded: dict[str, tuple[tuple[Any, ...], Job]] = {}
        # Plain submits that arrive while one batch is written go into the next, a few
        # multi-row INSERTs for the lot: a statement per job cost twice the CPU.
        self._submits: Batches[dict[str, Any], Job] = Batches(self._insert_many, SUBMITS_MAX)
        self.submits = self._submits.stats

    @property
    def shared(self) -> bool:
        """Whether several nodes may share this database (PostgreSQL), or it is one
        server's own (SQLite)."""
        return self.driver.dialect.name == "postgresql"

    async def notify(self, payload: str) -> None:
        """Send ``payload`` to the nodes listening (PostgreSQL's NOTIFY on
        ``NOTIFY_CHANNEL``, on a shared database only).  It joins the next group commit
        and is delivered when that commits; a payload must stay under 8,000 bytes."""
        parameters = {"channel": NOTIFY_CHANNEL, "payload": payload}
        await self.driver.write(lambda tx: tx.rows(NOTIFY, parameters))

    async def close(self) -> None:
        await self._submits.drain()  # what is queued is committed and answered
        await self.driver.close()

    # -- reads -----------------------------------------------------------------------

    async def get(self, job_id: str, *, owner: str | None = None) -> Job:
        """The job; with ``owner``, only if that client submitted it (else ``NotFound``,
        so that a client cannot even learn that another client's id exists).  A job the
        pruner deleted raises ``Gone`` (to its owner only)."""

        found = await self.driver.read(lambda tx: self._lookup(tx, job_id, owner), quick=True)
        if isinstance(found, NotFound):
            raise found
        if owner is not None and found.owner != owner:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        return found

    def _read_job(self, tx: Tx, job_id: str) -> Job | None:
        found = self._lookup(tx, job_id, None)
        return None if isinstance(found, NotFound) else found

    def _lookup(self, tx: Tx, job_id: str, owner: str | None) -> Job | NotFound:
        """The one way a job is read by id: its row with its history and dependencies,
        in one statement (one snapshot, and one lookup on the event loop for a poll);
        for an id that names no job, what to raise (its pruned record comes along)."""
        found = tx.rows(JOB_WITH_EXTRAS, {"job_id": job_id})
        rows = [extra for extra in found if extra[_EXTRA] == "j"]
        if not rows:
            pruned = [(e[_EXTRA + 4], e[_EXTRA + 2]) for e in found if e[_EXTRA] == "p"]
            return _not_stored(job_id, owner, pruned)
        key = tuple(found)
        remembered = self._decoded.get(job_id)
        if remembered is not None and remembered[0] == key:
            return remembered[1]
        row = rows[0][:_EXTRA]
        history = sorted(extra[_EXTRA + 1 :] for extra in found if extra[_EXTRA] == "a")
        deps = sorted(extra[_EXTRA + 5 : _EXTRA + 7] for extra in found if extra[_EXTRA] == "d")
        job = decode_job(row, history, deps)
        if sum(len(value) for value in row if isinstance(value, str)) <= DECODED_TEXT:
            if len(self._decoded) >= DECODED_JOBS:
                del self._decoded[next(iter(self._decoded))]  # the oldest
            self._decoded[job_id] = (key, job)
        return job

    async def _insert_many(self, rows: list[dict[str, Any]]) -> list[Job]:
        await self.driver.insert(jobs, rows)
        # Decoded here, on the event loop: the writer's thread holds the GIL only for the
        # statements, and the stored rows are the values plus the columns' defaults (no
        # SELECT to read them back: that, and decoding it, cost more than building them).
        return [decode_mapping(_INSERTED_DEFAULTS | row) for row in rows]

    def _must_read(self, tx: Tx, job_id: str) -> Job:
        job = self._read_job(tx, job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
        return job

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
        new jobs get larger ids, so they never shift a page being walked).  At most
        ``MAX_PAGE + 1`` jobs: a caller showing a full page asks for one more to learn
        whether a next page exists."""
        query = sa.select(jobs).order_by(jobs.c.id.desc()).limit(min(limit, MAX_PAGE + 1))
        if state is not None:
            query = query.where(jobs.c.state == state.value)
        if task is not None:
            query = query.where(jobs.c.task == task)
        if before is not None:
            query = query.where(jobs.c.id < before)
        if owner is not None:
            query = query.where(jobs.c.owner == owner)
        return await self.driver.read(lambda tx: _with_extras(tx, tx.rows(query)))

    async def queue_head(self, limit: int, now: datetime) -> list[QueueEntry]:
        """Queued jobs that may start now, highest priority first, then oldest."""
        return await self.driver.read(
            lambda tx: _queue_head(tx, limit, now, QUEUE_PEEK), quick=True
        )

    async def running(self) -> list[Job]:
        """The jobs this incarnation's scheduler claimed and has not finished."""
        query = sa.select(jobs).where(
            jobs.c.state == JobState.RUNNING.value, jobs.c.incarnation == self.incarnation
        )
        return await self.driver.read(lambda tx: [decode_job(row) for row in tx.rows(query)])

    async def cancel_requested(self) -> set[str]:
        """Ids of this node's running jobs that a client asked to cancel."""
        return await self.driver.read(
            lambda tx: {
                row[0] for row in tx.rows(CANCEL_REQUESTED, {"incarnation": self.incarnation})
            },
            quick=True,
        )

    async def active_counts(self) -> dict[str, int]:
        """How many jobs are queued and running (an index range each, not a table scan)."""
        found: dict[str, int] = dict(
            await self.driver.read(lambda tx: tx.rows(ACTIVE_COUNTS), quick=True)
        )
        return {state: found.get(state, 0) for state in _ACTIVE}

    async def state_counts(self) -> dict[str, int]:
        """How many jobs are stored in each state (every state present, 0 if none)."""
        query = sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)
        found: dict[str, int] = dict(await self.driver.read(lambda tx: tx.rows(query)))
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
                jobs.c.started_at,
                jobs.c.finished_at,
                jobs.c.peak_rss,
                sa.func.row_number()
                .over(partition_by=jobs.c.task, order_by=jobs.c.id.desc())
                .label("n"),
            )
            .where(jobs.c.state == JobState.SUCCEEDED.value, jobs.c.started_at.is_not(None))
            .subquery()
        )
        samples = sa.select(
            ranked.c.task, ranked.c.started_at, ranked.c.finished_at, ranked.c.peak_rss
        ).where(ranked.c.n <= recent)
        count_rows, sample_rows = await self.driver.read(
            lambda tx: (tx.rows(counts), tx.rows(samples))
        )
        by_task: dict[str, dict[str, int]] = {}
        for task, state, n in count_rows:
            by_task.setdefault(task, {s.value: 0 for s in JobState})[state] = n
        durations: dict[str, list[float]] = {}
        memory: dict[str, list[int]] = {}
        for task, started, finished, peak_rss in sample_rows:
            seconds = (_time(finished) - _time(started)).total_seconds()
            durations.setdefault(task, []).append(max(0.0, seconds))
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

    async def recent_runs(self, task: str, limit: int) -> list[TaskRun]:
        """The task's last ``limit`` measured runs, newest first (through its index)."""
        parameters = {"task": task, "limit": limit}
        rows = await self.driver.read(lambda tx: tx.rows(RECENT_RUNS, parameters))
        return [
            TaskRun(task, job_id, attempt, outcome, peak, cpu, wall, _time(finished_at))
            for _, task, job_id, attempt, outcome, peak, cpu, wall, finished_at in rows
        ]

    async def recent_attempts(self, limit: int, owner: str | None = None) -> list[AttemptSpan]:
        """The attempts of the ``limit`` newest jobs that have started, and of every
        running job, by start time (through the primary key and the state index)."""
        started = sa.select(jobs.c.id).where(jobs.c.started_at.is_not(None))
        running = sa.select(jobs.c.id).where(jobs.c.state == JobState.RUNNING.value)
        if owner is not None:
            started = started.where(jobs.c.owner == owner)
            running = running.where(jobs.c.owner == owner)
        newest = started.order_by(jobs.c.id.desc()).limit(limit).subquery()
        query = (
            sa.select(
                attempts.c.job_id,
                jobs.c.task,
                attempts.c.attempt,
                attempts.c.started_at,
                attempts.c.finished_at,
                attempts.c.outcome,
                jobs.c.state,
                attempts.c.node,
            )
            .join(jobs, jobs.c.id == attempts.c.job_id)
            .where(
                sa.or_(
                    attempts.c.job_id.in_(sa.select(newest.c.id)),
                    attempts.c.job_id.in_(running),
                )
            )
            .order_by(attempts.c.started_at, attempts.c.job_id, attempts.c.attempt)
        )
        rows = await self.driver.read(lambda tx: tx.rows(query))
        return [
            AttemptSpan(
                job_id,
                task,
                attempt,
                _time(started),
                _maybe_time(ended),
                outcome,
                JobState(state),
                node,
            )
            for job_id, task, attempt, started, ended, outcome, state, node in rows
        ]

    async def task_series(
        self, since: datetime, bucket: float, rows: int = SERIES_ROWS
    ) -> dict[str, list[TaskBucket]]:
        """Per task, the jobs that finished since ``since`` in buckets of ``bucket``
        seconds (the first starting at ``since``), oldest first; empty buckets are left
        out.  Reads the newest ``rows`` finished jobs at most (through their index)."""
        query = (
            sa.select(jobs.c.task, jobs.c.state, jobs.c.started_at, jobs.c.finished_at)
            .where(jobs.c.finished_at >= format_timestamp(since))
            .order_by(jobs.c.finished_at.desc())
            .limit(rows)
        )
        found = await self.driver.read(lambda tx: tx.rows(query))
        counted: dict[tuple[str, int], dict[str, int]] = {}
        durations: dict[tuple[str, int], list[float]] = {}
        for task, state, started, finished in found:
            ended = _time(finished)
            key = (task, int((ended - since).total_seconds() // bucket))
            counted.setdefault(key, dict.fromkeys(("succeeded", "failed", "cancelled"), 0))
            counted[key][state] += 1
            if state == JobState.SUCCEEDED.value and started is not None:
                seconds = max(0.0, (ended - _time(started)).total_seconds())
                durations.setdefault(key, []).append(seconds)
        series: dict[str, list[TaskBucket]] = {}
        for (task, index), states in sorted(counted.items()):
            taken = sorted(durations.get((task, index), []))
            series.setdefault(task, []).append(
                TaskBucket(
                    start=since + timedelta(seconds=index * bucket),
                    finished=sum(states.values()),
                    succeeded=states["succeeded"],
                    failed=states["failed"],
                    cancelled=states["cancelled"],
                    duration_p50=_percentile(taken, 50),
                    duration_p95=_percentile(taken, 95),
                )
            )
        return series

    # -- submitting --------------------------------------------------------------------

    async def submit(
        self, new: NewJob, job_id: str, now: datetime, *, owner: str | None = None
    ) -> tuple[Changed, bool]:
        """Insert a queued job with its dependencies and idempotency key, in one
        transaction.  Returns (the submission, created): with a known key and the same
        body, the original job and False.  Unknown dependencies raise ValidationError, a
        key reused with another body raises Conflict; either way nothing is stored.  With
        ``owner``, only that client's jobs can be dependencies (another client's id is
        unknown)."""
        values = _new_job_values(new, job_id, now)
        if new.idempotency is None and not new.depends_on:
            # Nothing to read first: the row joins the next group commit, and the job is
            # built from the values and the columns' defaults, not read back.
            job = await self._submits.run(values)
            return Changed(job, None), True

        def submit(tx: Tx) -> tuple[Changed, bool]:
            key = new.idempotency
            if key is not None:
                original = _remembered_job(tx, key, now)
                if original is not None:
                    return Changed(self._must_read(tx, original), None), False
            if new.depends_on:
                _check_dependencies(tx, new.depends_on, owner)
            _insert_job(tx, values)
            if key is not None:
                original = _remember_key(tx, key, job_id, now)
                if original is not None:
                    # A submit with the same key committed while this one ran (drivers
                    # whose writes run concurrently): its job is the original, this
                    # transaction's row goes.
                    tx.run(DELETE_JOB, {"job_id": job_id})
                    return Changed(self._must_read(tx, original), None), False
            if new.depends_on:
                for dep in new.depends_on:
                    tx.run(ADD_DEPENDENCY, {"v_job_id": job_id, "v_depends_on": dep})
            # A dependency may already have failed: the new job is cancelled at once.
            failed = tx.rows(FAILED_DEPENDENCY, {"job_id": job_id})
            if failed:
                parent, parent_state = failed[0]
                _cancel_for_dependency(tx, job_id, parent, parent_state, now)
            return Changed(self._must_read(tx, job_id), None), True

        return await self.driver.write(submit, batched=False)

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
        its job, in one transaction: a slot fires at most once, even across restarts or
        several servers (a unique slot and a conflict-free insert, not leadership).
        None if another writer advanced the slot first, or nothing was inserted."""
        slot_text = format_timestamp(slot)
        last_job = job_id if new else None

        def fire(tx: Tx) -> Job | None:
            if previous is None:
                changed = tx.run(FIRST_SLOT, {"name": name, "slot": slot_text, "job": last_job})
            else:
                changed = tx.run(
                    NEXT_SLOT,
                    {
                        "w_name": name,
                        "w_previous": format_timestamp(previous),
                        "v_last_slot": slot_text,
                        "v_last_job_id": last_job,
                    },
                )
            if not changed or new is None:
                return None
            values = _new_job_values(new, job_id, now)
            values.update(
                reason=f"scheduled by {name} for {slot_text}",
                schedule=name,
                schedule_slot=slot_text,
            )
            return _insert_job(tx, values)

        return await self.driver.write(fire, batched=False)

    async def schedule_slots(self) -> dict[str, datetime]:
        """The last slot each schedule fired."""
        query = sa.select(schedules.c.name, schedules.c.last_slot)
        rows = await self.driver.read(lambda tx: tx.rows(query))
        return {name: _time(slot) for name, slot in rows}

    # -- the scheduler's writes --------------------------------------------------------

    async def claim_head(
        self, now: datetime, limit: int, choose: Choose, *, limited: Collection[str] = ()
    ) -> list[Changed]:
        """One transaction per scheduler tick: read the queue head (at most ``limit``
        jobs that may start now), let ``choose`` pick which to start (the scheduler's
        pure planning, called with the head), and claim those for this node: queued →
        running, counting an attempt and opening its ``attempts`` row.  ``choose`` may be
        called again if the transaction is retried, so it must only decide.

        ``limited`` names the tasks with a ``max_concurrency``.  On a shared database,
        for each of them in the head, the transaction takes that task's lock and counts
        its running jobs on every node, and ``choose`` gets the counts: another node's
        claim of the same task waits for this commit and then counts this one's claims,
        so a limit holds across the cluster, even in a race.  The lock is
        transaction-scoped: nothing to leak when a node dies."""

        def claim(tx: Tx) -> list[Changed]:
            head = _queue_head(tx, limit, now, QUEUE_HEAD)
            counted = {entry.task for entry in head}.intersection(limited)
            running = _running_everywhere(tx, counted) if self.shared and counted else {}
            chosen = set(choose(head, running))
            claimed = []
            for entry in head:
                if entry.id in chosen:
                    job = self._claim(tx, entry.id, now)
                    if job is not None:
                        claimed.append(Changed(job, JobState.QUEUED))
            return claimed

        return await self.driver.write(claim)

    def _claim(self, tx: Tx, job_id: str, now: datetime) -> Job | None:
        started = format_timestamp(now)
        job = _set_state(
            tx,
            job_id,
            JobState.QUEUED,
            JobState.RUNNING,
            started_at=started,
            increments={"attempts": 1},
            node=self.node,
            incarnation=self.incarnation,
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
            tx.run(
                OPEN_ATTEMPT,
                {
                    "v_job_id": job_id,
                    "v_attempt": job.attempts,
                    "v_started_at": started,
                    "v_node": self.node,
                },
            )
        return job

    async def record_process(
        self, job_id: str, attempt: int, pid: int, pid_started_at: float | None
    ) -> bool:
        """The process of this node's ``attempt`` of the job; False if that attempt is
        not running any more."""
        parameters = {
            **self._fence(job_id, attempt),
            "v_pid": pid,
            "v_pid_started_at": pid_started_at,
        }
        return bool(await self.driver.write(lambda tx: tx.run(RECORD_PROCESS, parameters)))

    async def set_progress(
        self, job_id: str, attempt: int, fraction: float | None, message: str, now: datetime
    ) -> bool:
        """Record the latest progress of this node's ``attempt``; False if that attempt is
        not running any more."""
        parameters = {
            **self._fence(job_id, attempt),
            "v_progress_fraction": fraction,
            "v_progress_message": message,
            "v_progress_updated_at": format_timestamp(now),
        }
        return bool(await self.driver.write(lambda tx: tx.run(SET_PROGRESS, parameters)))

    async def end_attempt(
        self,
        job_id: str,
        attempt: int,
        end: Finish | Requeue,
        now: datetime,
        run: TaskRun | None = None,
    ) -> Changed | None:
        """How this node's ``attempt`` of the job ended, in one transaction: the job's
        new state, the attempt's row closed, the dependents of a failed or cancelled job
        cancelled, and what the attempt used (``run``).  None if that attempt was not
        running any more (then nothing is written)."""

        def record(tx: Tx) -> Changed | None:
            if isinstance(end, Finish):
                changed = self._finish(tx, job_id, attempt, end, now)
            else:
                changed = self._requeue(tx, job_id, attempt, end, now)
            if changed is not None and run is not None:
                tx.run(RECORD_RUN, _run_values(run))
            return changed

        return await self.driver.write(record)

    def _fence(self, job_id: str, attempt: int, incarnation: str | None = None) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "w_incarnation": incarnation or self.incarnation,
            "w_attempt": attempt,
        }

    def _finish(
        self,
        tx: Tx,
        job_id: str,
        attempt: int,
        finish: Finish,
        now: datetime,
        incarnation: str | None = None,
    ) -> Changed | None:
        extra: dict[str, Any] = {}
        if finish.artifacts is not None:
            extra["artifacts"] = dump_json([a.__dict__ for a in finish.artifacts])
        error = finish.error
        job = _set_state(
            tx,
            job_id,
            JobState.RUNNING,
            finish.state,
            fence=(incarnation or self.incarnation, attempt),
            finished_at=format_timestamp(now),
            result=None if finish.result is None else dump_json(finish.result),
            error_type=error.type if error else None,
            error=error.message if error else None,
            traceback=error.traceback if error else None,
            reason=finish.reason,
            exit_code=finish.exit_code,
            peak_rss=finish.peak_rss,
            cpu_seconds=finish.cpu_seconds,
            increments={"failures": 1 if finish.state is JobState.FAILED else 0},
            pid=None,
            **extra,
        )
        if job is None:
            return None
        _close_attempt(tx, job, finish.state.value, error, now, finish.exit_code)
        return Changed(job, JobState.RUNNING, _cascade(tx, job, now))

    def _requeue(
        self,
        tx: Tx,
        job_id: str,
        attempt: int,
        requeue: Requeue,
        now: datetime,
        incarnation: str | None = None,
    ) -> Changed | None:
        found = tx.rows(CANCEL_FLAG, self._fence(job_id, attempt, incarnation))
        if found and found[0][0] is not None:
            # The client was told its cancel was accepted: the job ends cancelled, never
            # runs again (a requeue after a crash, a shutdown or pressure included).
            reason = f"cancelled by request; {requeue.reason.removeprefix('requeued: ')}"
            return self._finish(
                tx,
                job_id,
                attempt,
                Finish(JobState.CANCELLED, reason=reason, exit_code=requeue.exit_code),
                now,
                incarnation,
            )
        error = requeue.error
        values: dict[str, Any] = {
            "reason": requeue.reason,
            "run_after": None if requeue.run_after is None else format_timestamp(requeue.run_after),
            "pid": None,
            "pid_started_at": None,
        }
        if error is not None:
            values.update(error_type=error.type, error=error.message, traceback=error.traceback)
        counts = requeue.counts
        job = _set_state(
            tx,
            job_id,
            JobState.RUNNING,
            JobState.QUEUED,
            fence=(incarnation or self.incarnation, attempt),
            increments={
                "rescues": int(counts == RESCUE),
                "failures": int(counts == FAILURE),
                # killed to protect the machine: not a failure of the task
                "pressure_requeues": int(counts == PRESSURE),
            },
            **values,
        )
        if job is None:
            return None
        _close_attempt(tx, job, requeue.attempt_outcome, error, now, requeue.exit_code)
        return Changed(job, JobState.RUNNING)

    async def fail_unstarted(self, job_id: str, error: JobError, now: datetime) -> Changed | None:
        """queued → failed without running (a task no longer in the config)."""

        def fail(tx: Tx) -> Changed | None:
            job = _set_state(
                tx,
                job_id,
                JobState.QUEUED,
                JobState.FAILED,
                finished_at=format_timestamp(now),
                error_type=error.type,
                error=error.message,
                traceback=None,
                reason=error.type,
            )
            return None if job is None else Changed(job, JobState.QUEUED, _cascade(tx, job, now))

        return await self.driver.write(fail)

    # -- what clients ask for ----------------------------------------------------------

    async def request_cancel(
        self, job_id: str, now: datetime, *, owner: str | None = None
    ) -> Changed:
        """A queued job is cancelled at once; a running one is flagged for the scheduler
        of its node, which signals its process (the job's state is unchanged: ``source``
        is its state).  A finished job raises ``InvalidTransition``; with ``owner``,
        another client's job is ``NotFound``."""

        def cancel(tx: Tx) -> Changed:
            job = _owned(tx, job_id, owner)
            check_transition(job.state, JobState.CANCELLED, job_id)
            if job.state is JobState.QUEUED:
                cancelled = _set_state(
                    tx,
                    job_id,
                    JobState.QUEUED,
                    JobState.CANCELLED,
                    finished_at=format_timestamp(now),
                    reason="cancelled by request before it started",
                )
                assert cancelled is not None  # the write lock is held since the read
                cascaded = _cascade(tx, cancelled, now)
                return Changed(self._must_read(tx, job_id), JobState.QUEUED, cascaded)
            if not job.cancel_requested:
                tx.run(REQUEST_CANCEL, {"job_id": job_id, "v_at": format_timestamp(now)})
            return Changed(self._must_read(tx, job_id), job.state)

        # Alone, not in a shared batch: a bad id or a finished job fails this transaction
        # only, without rolling back the scheduler's writes beside it.
        return await self.driver.write(cancel, batched=False)

    async def retry(self, job_id: str, now: datetime, *, owner: str | None = None) -> Changed:
        """failed/cancelled → queued as a new attempt (a client's explicit retry).  The
        automatic retry budget starts again; ``attempts`` and the history keep counting.
        With ``owner``, another client's job is ``NotFound``."""

        def retry(tx: Tx) -> Changed:
            job = _owned(tx, job_id, owner)
            check_retry(job.state, job_id)
            (job,) = _with_extras(tx, tx.rows(JOB_BY_ID, {"job_id": job_id}))
            failed = [
                (dep, state)
                for dep, state in job.waiting_on
                if state in (JobState.FAILED.value, JobState.CANCELLED.value)
            ]
            if failed:
                dep, state = failed[0]
                raise InvalidTransition(
                    f"job {job_id} depends on {dep}, which is {state}; retry {dep} first",
                    {"id": job_id, "depends_on": dep, "state": state},
                )
            tx.run(
                RETRY,
                {
                    "job_id": job_id,
                    "w_state": job.state.value,
                    "v_reason": f"retried by request (was {job.state.value})",
                },
            )
            return Changed(self._must_read(tx, job_id), job.state)

        return await self.driver.write(retry, batched=False)

    async def cancel_matching(self, match: JobFilter, now: datetime) -> list[Changed]:
        """Cancel every queued or running job that ``match`` selects, like
        ``request_cancel`` does one (a running job is flagged; one already flagged is no
        change).  Jobs submitted after ``now`` are not touched."""

        def cancel(tx: Tx, job: Job) -> Changed | None:
            if job.state is JobState.QUEUED:
                cancelled = _set_state(
                    tx,
                    job.id,
                    JobState.QUEUED,
                    JobState.CANCELLED,
                    finished_at=format_timestamp(now),
                    reason="cancelled by request before it started",
                )
                if cancelled is None:  # cancelled by a cascade earlier in this batch
                    return None
                return Changed(cancelled, JobState.QUEUED, _cascade(tx, cancelled, now))
            if job.cancel_requested:
                return None
            tx.run(REQUEST_CANCEL, {"job_id": job.id, "v_at": format_timestamp(now)})
            return Changed(self._must_read(tx, job.id), job.state)

        return await self._each_matching(match, _CANCELLABLE, now, cancel)

    async def retry_matching(self, match: JobFilter, now: datetime) -> list[Changed]:
        """Retry every failed or cancelled job that ``match`` selects, like ``retry`` does
        one; a job whose dependency is still failed or cancelled (and not retried here
        before it) is left as it is."""

        def retry(tx: Tx, job: Job) -> Changed | None:
            if tx.rows(FAILED_DEPENDENCY, {"job_id": job.id}):
                return None
            reason = f"retried by request (was {job.state.value})"
            parameters = {"job_id": job.id, "w_state": job.state.value, "v_reason": reason}
            if not tx.run(RETRY, parameters):
                return None
            return Changed(self._must_read(tx, job.id), job.state)

        return await self._each_matching(match, _RETRIABLE, now, retry)

    async def _each_matching(
        self,
        match: JobFilter,
        allowed: tuple[JobState, ...],
        now: datetime,
        change: Callable[[Tx, Job], Changed | None],
    ) -> list[Changed]:
        """Apply ``change`` to each job ``match`` selects among ``allowed`` states, oldest
        first, ``BULK_BATCH`` jobs per transaction (a long run never holds the writer for
        long); each row is locked as it is read and each change is a compare-and-set."""
        states = [state.value for state in (match.states or allowed) if state in allowed]
        query = (
            sa.select(jobs)
            .where(jobs.c.state.in_(states), jobs.c.created_at <= format_timestamp(now))
            .order_by(jobs.c.id)
            .limit(BULK_BATCH)
            .with_for_update(key_share=True)
        )
        if match.task is not None:
            query = query.where(jobs.c.task == match.task)
        if match.created_before is not None:
            query = query.where(jobs.c.created_at < format_timestamp(match.created_before))
        if match.owner is not None:
            query = query.where(jobs.c.owner == match.owner)

        def batch(after: str, tx: Tx) -> tuple[list[Changed], str | None]:
            rows = tx.rows(query.where(jobs.c.id > after))
            changes = [found for row in rows if (found := change(tx, decode_job(row)))]
            return changes, (rows[-1][0] if len(rows) == BULK_BATCH else None)

        changes: list[Changed] = []
        after: str | None = ""
        while after is not None:
            done, after = await self.driver.write(functools.partial(batch, after), batched=False)
            changes += done
        return changes

    # -- retention ---------------------------------------------------------------------

    async def prunable(
        self, now: datetime, default: float, per_task: dict[str, float], limit: int = 500
    ) -> list[str]:
        """Ids of finished jobs older than their retention (queued/running never)."""
        terminal = [state.value for state in TERMINAL_STATES]

        def older(seconds: float) -> sa.ColumnElement[bool]:
            cutoff = format_timestamp(now - timedelta(seconds=seconds))
            return sa.and_(jobs.c.state.in_(terminal), jobs.c.finished_at < cutoff)

        queries = [
            sa.select(jobs.c.id).where(older(seconds), jobs.c.task == task).limit(limit)
            for task, seconds in per_task.items()
        ]
        queries.append(
            sa.select(jobs.c.id)
            .where(older(default), jobs.c.task.not_in(list(per_task)))
            .limit(limit)
        )
        return await self.driver.read(
            lambda tx: [row[0] for query in queries for row in tx.rows(query)]
        )

    async def delete_finished(self, job_ids: list[str], now: datetime) -> list[str]:
        """Delete these jobs if they are still finished (with their attempts, dependency
        rows and idempotency keys, by cascade), remembering each id as pruned ``now`` in
        the same transaction; returns the ids deleted."""
        if not job_ids:
            return []
        terminal = [state.value for state in TERMINAL_STATES]
        statement = (
            jobs.delete()
            .where(jobs.c.id.in_(job_ids), jobs.c.state.in_(terminal))
            .returning(jobs.c.id, jobs.c.owner)
        )
        pruned_at = format_timestamp(now)

        def delete(tx: Tx) -> list[str]:
            rows = tx.rows(statement)
            for job_id, owner in rows:
                tx.run(REMEMBER_PRUNED, {"id": job_id, "owner": owner, "pruned_at": pruned_at})
            return [job_id for job_id, _ in rows]

        return await self.driver.write(delete, batched=False)

    async def forget_pruned(self, before: datetime) -> int:
        """Forget the pruned ids pruned before ``before`` (they read as unknown again)."""
        statement = pruned_jobs.delete().where(pruned_jobs.c.pruned_at < format_timestamp(before))
        return await self.driver.write(lambda tx: tx.run(statement), batched=False)

    async def forget_idempotency_keys(self, before: datetime) -> int:
        statement = idempotency_keys.delete().where(
            idempotency_keys.c.created_at < format_timestamp(before)
        )
        return await self.driver.write(lambda tx: tx.run(statement), batched=False)

    # -- nodes (PostgreSQL: times on the database's clock) ------------------------------------

    async def register_node(
        self,
        incarnation: str,
        *,
        url: str | None,
        resources: dict[str, Any],
        definitions: dict[str, Any],
        timeout: float,
        check: CheckDefinitions,
    ) -> None:
        """Insert this node's new incarnation (and use it from now on), after ``check``
        has accepted its definitions against those of every live node.  Registrations
        take one lock row in turn, so two nodes starting at once both see each other."""

        def register(tx: Tx) -> None:
            tx.run(REGISTRY_ROW)
            tx.rows(REGISTRY_LOCK)
            live = tx.rows(LIVE_DEFINITIONS, {"timeout": timeout})
            check([(name, _json(found)) for name, found in live])
            tx.run(
                ADD_NODE,
                {
                    "incarnation": incarnation,
                    "name": self.node,
                    "url": url,
                    "resources": dump_json(resources),
                    "definitions": dump_json(definitions),
                },
            )

        await self.driver.write(register, batched=False)
        self.incarnation = incarnation

    async def heartbeat(
        self, resources: dict[str, Any], *, timeout: float, lease: float, rescue: Rescue
    ) -> Beat:
        """One transaction: renew this incarnation's heartbeat (with what it publishes),
        and the leader lease if it holds it or the lease expired (held ``lease`` seconds
        from now, on the database's clock).  As the leader, declare dead every node silent
        for ``timeout`` and end, fenced on (its incarnation, attempt), every job running
        under an incarnation that is not alive: requeued or failed as ``rescue`` says (an
        acknowledged cancel is kept).  Exactly once: a second leader's fenced write finds
        the attempt over.  An incarnation already declared dead renews nothing."""
        me = self.incarnation

        def beat(tx: Tx) -> Beat:
            renewed = tx.run(RENEW_NODE, {"me": me, "resources": dump_json(resources)})
            if not renewed:
                return Beat(alive=False)
            if not _take_lease(tx, LEADER, me, lease):
                return Beat(alive=True)
            dead = tuple(row[0] for row in tx.rows(DECLARE_DEAD, {"timeout": timeout}))
            tx.run(FORGET_NODES, {"kept": NODES_KEPT})
            now = _time(tx.rows(DATABASE_NOW)[0][0])
            rescued = []
            for row in tx.rows(ORPHANED_JOBS):
                job, incarnation = decode_job(row[1:]), row[0]
                end, reason = rescue(job)
                if isinstance(end, Finish):
                    change = self._finish(tx, job.id, job.attempts, end, now, incarnation)
                else:
                    change = self._requeue(tx, job.id, job.attempts, end, now, incarnation)
                if change is not None:
                    if change.job.state is JobState.CANCELLED:
                        reason = change.job.reason or reason
                    rescued.append((change, reason))
            return Beat(True, True, dead, tuple(rescued))

        return await self.driver.write(beat, batched=False)

    async def retire_node(self) -> None:
        """This incarnation stops (a graceful shutdown, after its jobs were requeued):
        it is dead from now on and gives up the leader lease, so another node leads at
        once instead of after the lease runs out."""
        me = self.incarnation

        def retire(tx: Tx) -> None:
            tx.run(RETIRE_NODE, {"me": me})
            tx.run(RELEASE_LEASES, {"me": me})

        await self.driver.write(retire, batched=False)

    async def nodes(self, timeout: float) -> list[NodeRecord]:
        """Every incarnation still remembered (dead ones for ``NODES_KEPT`` seconds),
        by name then start."""
        rows = await self.driver.read(lambda tx: tx.rows(NODES, {"timeout": timeout}))
        return [
            NodeRecord(
                name=name,
                incarnation=incarnation,
                started_at=_time(started),
                heartbeat_at=_time(beat),
                heartbeat_age=max(0.0, float(age)),
                dead_at=_maybe_time(dead),
                alive=bool(alive),
                leader=bool(leader),
                url=url,
                resources=_json(published),
                running=int(running),
                cordoned=bool(cordoned),
            )
            for (
                incarnation,
                name,
                started,
                beat,
                dead,
                url,
                published,
                cordoned,
                alive,
                age,
                leader,
                running,
            ) in rows
        ]


# -- operations' pieces ------------------------------------------------------------------

DECODED_JOBS = 256  # decoded jobs kept, with their rows
SUBMITS_MAX = 256  # plain submits per batch: 2,816 parameters, under every driver's limit
DECODED_TEXT = 16 * 1024  # characters of text a kept row may hold (args, result...)
_ACTIVE = (JobState.QUEUED.value, JobState.RUNNING.value)
BULK_BATCH = 200  # jobs per transaction of a bulk cancel or retry
_CANCELLABLE = (JobState.QUEUED, JobState.RUNNING)
_RETRIABLE = (JobState.FAILED, JobState.CANCELLED)


def _owned(tx: Tx, job_id: str, owner: str | None) -> Job:
    """The job, locked until the transaction ends: what the caller decides on it holds
    when it writes (a claim on another connection waits)."""
    rows = tx.rows(JOB_BY_ID_LOCKED, {"job_id": job_id})
    if not rows:
        raise _missing(tx, job_id, owner)
    job = decode_job(rows[0])
    if owner is not None and job.owner != owner:
        raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
    return job


def _missing(tx: Tx, job_id: str, owner: str | None) -> NotFound:
    """What to raise for an id that names no stored job: ``Gone`` with when it was pruned
    if the pruner deleted it (and, with ``owner``, it was that client's), else
    ``NotFound``."""
    return _not_stored(job_id, owner, tx.rows(PRUNED_BY_ID, {"job_id": job_id}))


def _not_stored(job_id: str, owner: str | None, pruned: list[Row]) -> NotFound:
    """``_missing`` from the id's pruned record (owner, pruned_at), if it has one."""
    if pruned and (owner is None or pruned[0][0] == owner):
        pruned_at = format_timestamp(_time(pruned[0][1]))
        return Gone(
            f"job {job_id!r} was pruned at {pruned_at} (past its retention): its state, "
            "result and files are no longer kept",
            {"id": job_id, "pruned_at": pruned_at},
        )
    return NotFound(f"no job with id {job_id!r}", {"id": job_id})


def _insert_job(tx: Tx, values: dict[str, Any]) -> Job:
    tx.insert(jobs, [values])
    return decode_mapping(_INSERTED_DEFAULTS | values)


def _remembered_job(tx: Tx, key: IdempotencyKey, now: datetime) -> str | None:
    """The job a known key created (checking it was for the same body), or None; a key
    older than its window is forgotten here."""
    found = tx.rows(KEY_BY_NAME, {"scope": key.scope, "key": key.key})
    if not found:
        return None
    body_hash, job_id, created_at = found[0]
    if _time(created_at) < now - timedelta(seconds=key.window):
        tx.run(FORGET_KEY, {"scope": key.scope, "key": key.key})
        return None
    if body_hash != key.body_hash:
        raise Conflict(
            f"Idempotency-Key {key.key!r} was used for a different request "
            f"(job {job_id}); use a new key for a new job",
            {"key": key.key, "job_id": job_id},
        )
    return str(job_id)


def _remember_key(tx: Tx, key: IdempotencyKey, job_id: str, now: datetime) -> str | None:
    """Store ``key`` for the new job ``job_id``; None if it was stored, else the job the
    key already names (another submit stored it first and has committed: the insert
    waits for it and then does nothing).  Raises Conflict like ``_remembered_job``."""
    while True:
        stored = tx.run(
            REMEMBER_KEY,
            {
                "scope": key.scope,
                "key": key.key,
                "body_hash": key.body_hash,
                "job_id": job_id,
                "created_at": format_timestamp(now),
            },
        )
        if stored:
            return None
        original = _remembered_job(tx, key, now)
        if original is not None:
            return original
        # The stored key was past its window and is forgotten now: store ours again.


def _check_dependencies(tx: Tx, depends_on: tuple[str, ...], owner: str | None) -> None:
    # FOR SHARE: a dependency cannot end until this submit commits, so a dependency that
    # fails either is seen failed here or sees the new dependent in its cascade; never an
    # orphan queued forever behind a failed job.
    query = (
        sa.select(jobs.c.id)
        .where(jobs.c.id.in_(depends_on), sa.true() if owner is None else jobs.c.owner == owner)
        .with_for_update(read=True)
    )
    known = {row[0] for row in tx.rows(query)}
    missing = [dep for dep in depends_on if dep not in known]
    if missing:
        raise ValidationError(
            "depends_on names jobs that do not exist",
            [{"field": "depends_on", "message": f"no job with id {dep!r}"} for dep in missing],
        )


def task_lock_key(task: str) -> int:
    """The key of ``task``'s transaction-scoped advisory lock on PostgreSQL: a stable hash
    of its name (the same on every node and release), a signed 64-bit integer.  Two tasks
    that happen to share a key only wait for each other's claims."""
    digest = hashlib.blake2b(f"jobserver task {task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


TASK_LOCK = sa.text("SELECT pg_advisory_xact_lock(:key)")
NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")
# A notice that the queue has work, from outside the nodes (events.Wakeups reads it).
QUEUE_NOTICE = '{"from":"enqueue","queue":true}'


def enqueue_in(tx: Tx, new: NewJob) -> str:
    """Insert a plain job (no dependencies, no idempotency key) in ``tx`` with the
    submit's own statement, and NOTIFY the nodes: an application's transaction
    (``jobserver.store.enqueue``).  The job, and the notice, exist only once ``tx``
    commits.  Returns the job's id."""
    job_id = new_job_id()
    _insert_job(tx, _new_job_values(new, job_id, utcnow()))
    tx.rows(NOTIFY, {"channel": NOTIFY_CHANNEL, "payload": QUEUE_NOTICE})
    return job_id


def checked_job(
    task: str,
    args: Mapping[str, Any] | None,
    priority: int,
    max_retries: int,
    timeout: float | None,
    run_after: datetime | None,
) -> NewJob:
    """The job to insert, or ``ValidationError`` naming each bad value (the caller's
    values are checked as they come, whatever their annotations say)."""
    problems: list[dict[str, str]] = []

    def whole(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(task, str) or not task.strip():
        problems.append({"field": "task", "message": "required: the name of a task"})
    args = {} if args is None else args
    if not isinstance(args, Mapping):
        problems.append({"field": "args", "message": "expected a JSON object (a mapping)"})
    else:
        try:
            dump_json(args)
        except (TypeError, ValueError) as exc:
            problems.append({"field": "args", "message": f"not JSON: {exc}"})
    if not whole(priority) or abs(priority) > MAX_PRIORITY:
        problems.append(
            {
                "field": "priority",
                "message": f"expected an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}",
            }
        )
    if not whole(max_retries) or max_retries < 0:
        problems.append({"field": "max_retries", "message": "expected an integer >= 0"})
    if timeout is not None and (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        problems.append({"field": "timeout", "message": "expected seconds > 0, or None"})
    if run_after is not None and (
        not isinstance(run_after, datetime) or run_after.utcoffset() is None
    ):
        problems.append(
            {"field": "run_after", "message": "expected a datetime with a time zone, or None"}
        )
    if problems:
        raise ValidationError("invalid job to enqueue", problems)
    return NewJob(
        task,
        dict(args),
        priority,
        max_retries,
        timeout=None if timeout is None else float(timeout),
        run_after=run_after,
    )


def _running_everywhere(tx: Tx, tasks: Collection[str]) -> dict[str, int]:
    """Lock each task (in one order on every node: no deadlock between claims), then
    count its running jobs on every node.  The count is a statement after the locks, so
    under READ COMMITTED it sees every claim committed by whoever held a lock before."""
    for task in sorted(tasks):
        tx.rows(TASK_LOCK, {"key": task_lock_key(task)})
    query = (
        sa.select(jobs.c.task, sa.func.count())
        .where(jobs.c.state == JobState.RUNNING.value, jobs.c.task.in_(sorted(tasks)))
        .group_by(jobs.c.task)
    )
    return {task: 0 for task in tasks} | {task: int(n) for task, n in tx.rows(query)}


def _take_lease(tx: Tx, name: str, me: str, ttl: float) -> bool:
    """Take lease ``name`` for ``ttl`` seconds if it is free, expired or already this
    incarnation's (renewed only by its holder: no session advisory lock, which a pooler
    in transaction mode breaks); whether this incarnation holds it now.  Never waits on
    another transaction holding the row: that one holds the lease for this beat."""
    found = tx.rows(LEASE_LOCKED, {"name": name})
    if not found:
        return bool(tx.run(FIRST_LEASE, {"name": name, "me": me, "ttl": ttl}))
    holder, valid = found[0]
    if holder != me and valid:
        return False
    tx.run(RENEW_LEASE, {"name": name, "me": me, "ttl": ttl})
    return True


def _queue_head(tx: Tx, limit: int, now: datetime, statement: sa.ClauseElement) -> list[QueueEntry]:
    rows = tx.rows(statement, {"limit": limit, "now": format_timestamp(now)})
    head = sorted(rows, key=lambda row: (-row[2], row[0]))[:limit]
    return [
        QueueEntry(job_id, task, priority, _time(ready)) for job_id, task, priority, ready in head
    ]


def _set_state(
    tx: Tx,
    job_id: str,
    source: JobState,
    target: JobState,
    increments: dict[str, int] | None = None,
    fence: tuple[str, int] | None = None,
    **values: Any,
) -> Job | None:
    """source → target, setting ``values`` and adding ``increments`` to counters; with
    ``fence`` (incarnation, attempt), only if that incarnation's attempt is the current
    one."""
    check_transition(source, target, job_id)
    increments = increments or {}
    statement = _set_state_statement(
        source, target, tuple(values), tuple(increments), fence is not None
    )
    parameters: dict[str, Any] = {"job_id": job_id}
    parameters.update({f"v_{name}": value for name, value in values.items()})
    parameters.update({f"add_{name}": value for name, value in increments.items()})
    if fence is not None:
        parameters["w_incarnation"], parameters["w_attempt"] = fence
    rows = tx.rows(statement, parameters)
    return decode_job(rows[0]) if rows else None


def _close_attempt(
    tx: Tx, job: Job, outcome: str, error: JobError | None, now: datetime, exit_code: int | None
) -> None:
    tx.run(
        CLOSE_ATTEMPT,
        {
            "w_job_id": job.id,
            "w_attempt": job.attempts,
            "v_finished_at": format_timestamp(now),
            "v_outcome": outcome,
            "v_error_type": error.type if error else None,
            "v_error": error.message if error else None,
            "v_exit_code": exit_code,
        },
    )


def _cascade(tx: Tx, job: Job, now: datetime) -> tuple[Job, ...]:
    """A failed or cancelled job cancels every queued job that (transitively) depends on
    it, in the caller's transaction; returns the jobs cancelled."""
    if job.state not in (JobState.FAILED, JobState.CANCELLED):
        return ()
    cancelled: list[Job] = []
    pending = [(job.id, job.state.value)]
    while pending:
        cause, cause_state = pending.pop()
        for (dependent,) in tx.rows(QUEUED_DEPENDENTS, {"cause": cause}):
            found = _cancel_for_dependency(tx, dependent, cause, cause_state, now)
            if found is not None:
                cancelled.append(found)
                pending.append((dependent, JobState.CANCELLED.value))
    return tuple(cancelled)


def _cancel_for_dependency(
    tx: Tx, job_id: str, cause: str, cause_state: str, now: datetime
) -> Job | None:
    """queued → cancelled because the job it depends on, ``cause``, ended unsucceeded."""
    reason = f"dependency {cause} {cause_state}"
    return _set_state(
        tx,
        job_id,
        JobState.QUEUED,
        JobState.CANCELLED,
        finished_at=format_timestamp(now),
        reason=reason,
        error_type="DependencyFailed",
        error=reason,
    )


def _with_extras(tx: Tx, rows: list[Row]) -> list[Job]:
    """The jobs of these rows, with their history and dependencies (two statements for
    any number of jobs)."""
    if not rows:
        return []
    ids = [row[0] for row in rows]
    history: dict[str, list[Row]] = {}
    for row in tx.rows(
        sa.select(attempts.c.job_id, *HISTORY_COLUMNS)
        .where(attempts.c.job_id.in_(ids))
        .order_by(attempts.c.job_id, attempts.c.attempt)
    ):
        history.setdefault(row[0], []).append(row[1:])
    deps: dict[str, list[Row]] = {}
    for row in tx.rows(
        sa.select(dependencies.c.job_id, *DEPENDENCY_COLUMNS)
        .join(_PARENT, _PARENT.c.id == dependencies.c.depends_on)
        .where(dependencies.c.job_id.in_(ids))
        .order_by(dependencies.c.job_id, dependencies.c.depends_on)
    ):
        deps.setdefault(row[0], []).append(row[1:])
    return [decode_job(row, history.get(row[0], ()), deps.get(row[0], ())) for row in rows]


def _run_values(run: TaskRun) -> dict[str, Any]:
    return {
        "v_task": run.task,
        "v_job_id": run.job_id,
        "v_attempt": run.attempt,
        "v_outcome": run.outcome,
        "v_peak_rss": run.peak_rss,
        "v_cpu_seconds": run.cpu_seconds,
        "v_wall_seconds": run.wall_seconds,
        "v_finished_at": format_timestamp(run.finished_at),
    }


def _new_job_values(new: NewJob, job_id: str, now: datetime) -> dict[str, Any]:
    values = {
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
        "schedule": new.schedule,
        "schedule_slot": None if new.schedule_slot is None else format_timestamp(new.schedule_slot),
    }
    # A column left out is NULL (none of these has a default), and binding None costs
    # sqlite3 an adapter lookup that fails with an exception, per value.
    return {name: value for name, value in values.items() if value is not None}


def _inserted_defaults() -> dict[str, Any]:
    """What a new row holds in the columns that ``_new_job_values`` leaves out: the
    column's server default (the migrations give the tables the same ones), else NULL."""
    return {
        column.name: None if column.server_default is None else int(column.server_default.arg)  # type: ignore[attr-defined]
        for column in jobs.columns
    }


_INSERTED_DEFAULTS = _inserted_defaults()


def _percentile(ordered: list[float] | list[int], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (no interpolation: a value that was
    really observed)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * q // 100))
    return float(ordered[int(rank) - 1])


# -- the one row decoder -------------------------------------------------------------------


def _time(value: str | datetime) -> datetime:
    """A stored time: ISO text (SQLite) or a datetime (PostgreSQL's timestamptz)."""
    if isinstance(value, str):
        return parse_timestamp(value)
    return value.astimezone(UTC)


def _maybe_time(value: str | datetime | None) -> datetime | None:
    return None if value is None else _time(value)


def _json(value: Any) -> Any:
    """Stored JSON: text (SQLite), or already decoded (PostgreSQL's json type)."""
    return json.loads(value) if isinstance(value, str) else value


def decode_job(row: Row, history: Sequence[Row] = (), deps: Sequence[Row] = ()) -> Job:
    """The job of a ``jobs`` row (columns in ``JOB_COLUMNS`` order), with its history rows
    (``HISTORY_COLUMNS``) and dependency rows (``DEPENDENCY_COLUMNS``) when read."""
    return decode_mapping(dict(zip(JOB_COLUMNS, row, strict=True)), history, deps)


def decode_mapping(m: Any, history: Sequence[Row] = (), deps: Sequence[Row] = ()) -> Job:
    error = None
    if m["error"] is not None:
        error = JobError(m["error_type"] or "Error", m["error"], m["traceback"])
    return Job(
        id=m["id"],
        task=m["task"],
        args=_json(m["args"]),
        state=JobState(m["state"]),
        priority=m["priority"],
        created_at=_time(m["created_at"]),
        started_at=_maybe_time(m["started_at"]),
        finished_at=_maybe_time(m["finished_at"]),
        attempts=m["attempts"],
        max_retries=m["max_retries"],
        failures=m["failures"],
        rescues=m["rescues"],
        result=None if m["result"] is None else _json(m["result"]),
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
            _time(m["progress_updated_at"]),
        ),
        artifacts=tuple(Artifact(**item) for item in _json(m["artifacts"] or "[]")),
        owner=m["owner"],
        pressure_requeues=m["pressure_requeues"],
        node=m["node"],
        schedule=m["schedule"],
        schedule_slot=_maybe_time(m["schedule_slot"]),
        history=tuple(
            Attempt(
                attempt=attempt,
                started_at=_time(started),
                finished_at=_maybe_time(finished),
                outcome=outcome,
                error_type=error_type,
                error=message,
                exit_code=exit_code,
                node=node,
            )
            for attempt, started, finished, outcome, error_type, message, exit_code, node in history
        ),
        depends_on=tuple(dep for dep, _ in deps),
        waiting_on=tuple((dep, state) for dep, state in deps if state != JobState.SUCCEEDED.value),
    )


# -- statements built once -------------------------------------------------------------------
# Building a SQLAlchemy statement costs more than SQLite takes to run it; the per-job
# statements are built once and bound.  (Bound names differ from column names:
# SQLAlchemy reserves those in SET clauses.)

_PARENT = jobs.alias("parent")
HISTORY_COLUMNS = (
    attempts.c.attempt,
    attempts.c.started_at,
    attempts.c.finished_at,
    attempts.c.outcome,
    attempts.c.error_type,
    attempts.c.error,
    attempts.c.exit_code,
    attempts.c.node,
)
DEPENDENCY_COLUMNS = (dependencies.c.depends_on, _PARENT.c.state)


def _job_with_extras() -> sa.CompoundSelect[Any]:
    """A job's row, then one row per attempt and dependency it has, or, for an id the
    pruner deleted, its record: the job's columns, then ``kind`` ('j' the job, 'a' an
    attempt, 'd' a dependency, 'p' pruned), then the attempt's HISTORY_COLUMNS (a
    dependency's id and state in the 5th and 6th of those; a pruned id's pruned_at and
    owner in the 2nd and 4th); the columns a row's kind does not use are NULL.  Index
    lookups appended to each other: no subquery to materialize and join (a third of a
    poll's time in SQLite), and an unknown id needs no second statement."""
    job_id: sa.BindParameter[str] = sa.bindparam("job_id")
    no_job = [sa.null().cast(column.type) for column in jobs.c]
    no_history = [sa.null().cast(column.type) for column in HISTORY_COLUMNS]
    kind = sa.literal_column("'j'", sa.Text).label("kind")
    job = sa.select(*jobs.c, kind, *no_history).where(jobs.c.id == job_id)
    history = sa.select(*no_job, sa.literal_column("'a'", sa.Text), *HISTORY_COLUMNS).where(
        attempts.c.job_id == job_id
    )
    deps = (
        sa.select(
            *no_job,
            sa.literal_column("'d'", sa.Text),
            *no_history[:4],
            dependencies.c.depends_on,
            _PARENT.c.state,
            *no_history[6:],
        )
        .join(_PARENT, _PARENT.c.id == dependencies.c.depends_on)
        .where(dependencies.c.job_id == job_id)
    )
    # An id the pruner deleted: its owner and when, in the outcome and started_at slots.
    pruned = sa.select(
        *no_job,
        sa.literal_column("'p'", sa.Text),
        no_history[0],
        pruned_jobs.c.pruned_at,
        no_history[2],
        pruned_jobs.c.owner,
        *no_history[4:],
    ).where(pruned_jobs.c.id == job_id)
    return sa.union_all(job, history, deps, pruned)


JOB_WITH_EXTRAS = _job_with_extras()
_EXTRA = len(JOB_COLUMNS)  # where a JOB_WITH_EXTRAS row's extra columns begin

JOB_BY_ID = sa.select(jobs).where(jobs.c.id == sa.bindparam("job_id"))
# A write that reads a job, decides, then writes it: no other transaction changes it in
# between (``NO KEY UPDATE``: a dependent's foreign key may still point at it).
JOB_BY_ID_LOCKED = JOB_BY_ID.with_for_update(key_share=True)


@functools.cache
def _set_state_statement(
    source: JobState,
    target: JobState,
    names: tuple[str, ...],
    counters: tuple[str, ...],
    fenced: bool,
) -> sa.Update:
    values: dict[str, Any] = {
        name: sa.bindparam(f"v_{name}", type_=jobs.c[name].type) for name in names
    }
    values.update({name: jobs.c[name] + sa.bindparam(f"add_{name}") for name in counters})
    statement = jobs.update().where(
        jobs.c.id == sa.bindparam("job_id"), jobs.c.state == source.value
    )
    if fenced:
        statement = statement.where(*_FENCE)
    return statement.values(state=target.value, **values).returning(jobs)


# A write about an attempt: this incarnation's, and the attempt still current.
_FENCE = (
    jobs.c.incarnation == sa.bindparam("w_incarnation"),
    jobs.c.attempts == sa.bindparam("w_attempt"),
)
_RUNNING_ATTEMPT = (
    jobs.c.id == sa.bindparam("job_id"),
    jobs.c.state == JobState.RUNNING.value,
    *_FENCE,
)


def _insert(table: sa.Table, names: tuple[str, ...]) -> sa.Insert:
    return table.insert().values({name: sa.bindparam(f"v_{name}") for name in names})


OPEN_ATTEMPT = _insert(attempts, ("job_id", "attempt", "started_at", "node"))
ADD_DEPENDENCY = _insert(dependencies, ("job_id", "depends_on"))
# Conflict-free (plain SQL that SQLite and PostgreSQL both accept, like FIRST_SLOT): of
# two submits racing with one key, the second finds the first's key, never an error.
REMEMBER_KEY = sa.text(
    "INSERT INTO idempotency_keys (scope, key, body_hash, job_id, created_at) "
    "VALUES (:scope, :key, :body_hash, :job_id, :created_at) "
    "ON CONFLICT (scope, key) DO NOTHING"
)
DELETE_JOB = jobs.delete().where(jobs.c.id == sa.bindparam("job_id"))
PRUNED_BY_ID = sa.select(pruned_jobs.c.owner, pruned_jobs.c.pruned_at).where(
    pruned_jobs.c.id == sa.bindparam("job_id")
)
# Plain SQL both dialects accept (like REMEMBER_KEY): an id pruned again (a test's reused
# id; never a server's, whose ids are new) is remembered with its latest pruning.
REMEMBER_PRUNED = sa.text(
    "INSERT INTO pruned_jobs (id, owner, pruned_at) VALUES (:id, :owner, :pruned_at) "
    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, pruned_at = excluded.pruned_at"
)
RECORD_RUN = _insert(
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
    .where(*_RUNNING_ATTEMPT)
    .values(pid=sa.bindparam("v_pid"), pid_started_at=sa.bindparam("v_pid_started_at"))
)
SET_PROGRESS = (
    jobs.update()
    .where(*_RUNNING_ATTEMPT)
    .values(
        {
            name: sa.bindparam(f"v_{name}")
            for name in ("progress_fraction", "progress_message", "progress_updated_at")
        }
    )
)
# Locked: a cancel request committed after this read cannot be dropped by the requeue.
CANCEL_FLAG = (
    sa.select(jobs.c.cancel_requested_at).where(*_RUNNING_ATTEMPT).with_for_update(key_share=True)
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
QUEUED_DEPENDENTS = (
    sa.select(jobs.c.id)
    .join(dependencies, dependencies.c.job_id == jobs.c.id)
    .where(dependencies.c.depends_on == sa.bindparam("cause"))
    .where(jobs.c.state == JobState.QUEUED.value)
)
FAILED_DEPENDENCY = (
    sa.select(_PARENT.c.id, _PARENT.c.state)
    .join(dependencies, dependencies.c.depends_on == _PARENT.c.id)
    .where(
        dependencies.c.job_id == sa.bindparam("job_id"),
        sa.or_(
            _PARENT.c.state == JobState.FAILED.value,
            _PARENT.c.state == JobState.CANCELLED.value,
        ),
    )
    .limit(1)
)
REQUEST_CANCEL = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"))
    .values(cancel_requested_at=sa.bindparam("v_at"))
)
RETRY = (
    jobs.update()
    .where(jobs.c.id == sa.bindparam("job_id"), jobs.c.state == sa.bindparam("w_state"))
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
        reason=sa.bindparam("v_reason"),
    )
)
CANCEL_REQUESTED = sa.select(jobs.c.id).where(
    jobs.c.state == JobState.RUNNING.value,
    jobs.c.cancel_requested_at.is_not(None),
    jobs.c.incarnation == sa.bindparam("incarnation"),
)
RECENT_RUNS = (
    sa.select(task_runs)
    .where(task_runs.c.task == sa.bindparam("task"))
    .order_by(task_runs.c.id.desc())
    .limit(sa.bindparam("limit"))
)
ACTIVE_COUNTS = (
    sa.select(jobs.c.state, sa.func.count()).where(jobs.c.state.in_(_ACTIVE)).group_by(jobs.c.state)
)
KEY_BY_NAME = sa.select(
    idempotency_keys.c.body_hash, idempotency_keys.c.job_id, idempotency_keys.c.created_at
).where(
    idempotency_keys.c.scope == sa.bindparam("scope"),
    idempotency_keys.c.key == sa.bindparam("key"),
)
FORGET_KEY = idempotency_keys.delete().where(
    idempotency_keys.c.scope == sa.bindparam("scope"),
    idempotency_keys.c.key == sa.bindparam("key"),
)
# Plain SQL that SQLite (3.24+) and PostgreSQL both accept: a slot is inserted once.
FIRST_SLOT = sa.text(
    "INSERT INTO schedules (name, last_slot, last_job_id) "
    "VALUES (:name, :slot, :job) ON CONFLICT (name) DO NOTHING"
)
NEXT_SLOT = (
    schedules.update()
    .where(
        schedules.c.name == sa.bindparam("w_name"),
        schedules.c.last_slot == sa.bindparam("w_previous"),
    )
    .values(last_slot=sa.bindparam("v_last_slot"), last_job_id=sa.bindparam("v_last_job_id"))
)


# -- nodes' statements: PostgreSQL (``now()`` is the database's clock at the start of the
# transaction; intervals are built from seconds with ``make_interval``).

LEADER = "leader"  # the lease the leader holds
REGISTRY = "registry"  # a lease row locked while a node registers; never held
NODES_KEPT = 86400.0  # seconds a dead incarnation stays listed
DATABASE_NOW = sa.text("SELECT now()")
REGISTRY_ROW = sa.text(
    f"INSERT INTO leases (name, holder, expires_at) VALUES ('{REGISTRY}', NULL, now()) "
    "ON CONFLICT (name) DO NOTHING"
)
REGISTRY_LOCK = sa.text(f"SELECT name FROM leases WHERE name = '{REGISTRY}' FOR UPDATE")
_ALIVE = "dead_at IS NULL AND heartbeat_at >= now() - make_interval(secs => :timeout)"
LIVE_DEFINITIONS = sa.text(f"SELECT name, definitions FROM nodes WHERE {_ALIVE} ORDER BY name")
ADD_NODE = sa.text(
    "INSERT INTO nodes (incarnation, name, started_at, heartbeat_at, url, resources, "
    "definitions) VALUES (:incarnation, :name, now(), now(), :url, :resources, :definitions)"
)
# Only a live incarnation renews: one declared dead stays dead.
RENEW_NODE = sa.text(
    "UPDATE nodes SET heartbeat_at = now(), resources = :resources "
    "WHERE incarnation = :me AND dead_at IS NULL"
)
# A lease row, unless another transaction holds it: a node frozen in the middle of its
# heartbeat must never make the others' heartbeats wait (they would fence themselves).
LEASE_LOCKED = sa.text(
    "SELECT holder, expires_at >= now() FROM leases WHERE name = :name FOR UPDATE SKIP LOCKED"
)
FIRST_LEASE = sa.text(
    "INSERT INTO leases (name, holder, expires_at) "
    "VALUES (:name, :me, now() + make_interval(secs => :ttl)) "
    "ON CONFLICT (name) DO NOTHING"
)
RENEW_LEASE = sa.text(
    "UPDATE leases SET holder = :me, expires_at = now() + make_interval(secs => :ttl) "
    "WHERE name = :name"
)
# Rows locked by a node frozen mid-transaction are skipped: declared on a later beat.
DECLARE_DEAD = sa.text(
    "UPDATE nodes SET dead_at = now() WHERE incarnation IN (SELECT incarnation FROM nodes "
    "WHERE dead_at IS NULL AND heartbeat_at < now() - make_interval(secs => :timeout) "
    "FOR UPDATE SKIP LOCKED) RETURNING incarnation"
)
FORGET_NODES = sa.text(
    "DELETE FROM nodes WHERE incarnation IN (SELECT incarnation FROM nodes "
    "WHERE dead_at < now() - make_interval(secs => :kept) FOR UPDATE SKIP LOCKED)"
)
RETIRE_NODE = sa.text(
    "UPDATE nodes SET dead_at = now() WHERE incarnation = :me AND dead_at IS NULL"
)
RELEASE_LEASES = sa.text("DELETE FROM leases WHERE holder = :me")
_LIVE_NODE = sa.exists(
    sa.select(1).where(nodes.c.incarnation == jobs.c.incarnation, nodes.c.dead_at.is_(None))
)
# Running jobs whose incarnation is not alive (declared dead, stopped, or unknown: a row
# an older version left running).  Skipped if another leader holds them right now.
ORPHANED_JOBS = (
    sa.select(jobs.c.incarnation, *jobs.c)
    .where(jobs.c.state == JobState.RUNNING.value, ~_LIVE_NODE)
    .order_by(jobs.c.id)
    .with_for_update(key_share=True, skip_locked=True)
)
NODES = sa.text(
    "SELECT incarnation, name, started_at, heartbeat_at, dead_at, url, resources, cordoned, "
    f"({_ALIVE}) AS alive, "
    "EXTRACT(EPOCH FROM now() - heartbeat_at) AS age, "
    f"COALESCE((SELECT holder FROM leases WHERE name = '{LEADER}' AND expires_at >= now()) "
    "= incarnation, false) AS leader, "
    "(SELECT count(*) FROM jobs WHERE jobs.state = 'running' "
    "AND jobs.incarnation = nodes.incarnation) AS running "
    "FROM nodes ORDER BY name, started_at"
)


def _queue_head_statement(*, lock: bool) -> sa.ClauseElement:
    """The queue head: two index walks that never touch a job that may not start yet: up
    to :limit jobs without run_after by priority then age (ix_jobs_ready), and up to
    :limit delayed jobs that are due, earliest due first (ix_jobs_delayed); the caller
    merges them by priority then age, so when more than :limit delayed jobs are due at
    once, the earliest due come first.  (One walk with run_after <= now as a filter read
    every delayed job queued ahead of the first ready one, on every scheduler wake: 13 ms
    with 100,000 delayed jobs.)  SQLite is told the partial indexes by name: without
    statistics it prefers the plain (state, ...) ones.  With ``lock`` (a claim), PostgreSQL
    locks the rows it reads, skipping rows another node holds; ``NO KEY UPDATE`` still
    lets a dependent's foreign key point at them.  Without (a read), nothing is locked:
    a read transaction may be read-only, where PostgreSQL refuses ``FOR ... UPDATE``,
    and a read must never make a claim skip a job."""
    parent = jobs.alias("head_parent")
    blocked = sa.exists(
        sa.select(1)
        .select_from(dependencies.join(parent, parent.c.id == dependencies.c.depends_on))
        .where(dependencies.c.job_id == jobs.c.id, parent.c.state != JobState.SUCCEEDED.value)
    )
    ready = (
        sa.select(jobs.c.id, jobs.c.task, jobs.c.priority, jobs.c.created_at.label("ready_since"))
        .with_hint(jobs, "INDEXED BY ix_jobs_ready", "sqlite")
        .where(jobs.c.state == QUEUED_LITERAL, jobs.c.run_after.is_(None), ~blocked)
        .order_by(jobs.c.priority.desc(), jobs.c.id)
        .limit(sa.bindparam("limit", literal_execute=False))
    )
    later = sa.case(
        (jobs.c.run_after > jobs.c.created_at, jobs.c.run_after), else_=jobs.c.created_at
    )
    delayed = (
        sa.select(jobs.c.id, jobs.c.task, jobs.c.priority, later.label("ready_since"))
        .with_hint(jobs, "INDEXED BY ix_jobs_delayed", "sqlite")
        .where(
            jobs.c.state == QUEUED_LITERAL,
            jobs.c.run_after.is_not(None),
            jobs.c.run_after <= sa.bindparam("now"),
            ~blocked,
        )
        .order_by(jobs.c.run_after)
        .limit(sa.bindparam("limit", literal_execute=False))
    )
    if lock:
        ready = ready.with_for_update(skip_locked=True, key_share=True)
        delayed = delayed.with_for_update(skip_locked=True, key_share=True)
    return sa.union_all(sa.select(ready.subquery()), sa.select(delayed.subquery()))


QUEUE_HEAD = _queue_head_statement(lock=True)  # a claim's: locks what it reads
QUEUE_PEEK = _queue_head_statement(lock=False)  # a read's: the same rows, no locks
