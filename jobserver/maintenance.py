"""Work on stored jobs that no request asked for: the startup rescuer, the pruner, the
cron firer and, on PostgreSQL, this node's life among others (``NodeLife``: heartbeats,
the leader's rescue of dead nodes' jobs, self-fencing).  The pruner and the cron firer
are small services with the same shape (``start``/``stop`` safe
to call twice, ``tick(now)`` that tests call directly with a fake clock).

Rescue (at start, before the scheduler runs): a job left ``running`` by a server that died
has no process watching it any more.  Its leftover processes are killed first (the leader
only if pid *and* start time match, so a recycled pid is never signalled; anything else
found by the job-id tag in its environment, which also catches grandchildren that left
the process group), then the job goes back to the queue.  The guarantee this gives is
at-least-once: a task interrupted this way runs again from the start.  A job rescued more
than ``max_rescues`` times fails as ``lost`` so that a job that kills the server cannot
loop forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
import zoneinfo
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from croniter import croniter

from jobserver.errors import ConfigError
from jobserver.events import Events
from jobserver.jobs import Job, JobError, JobState, format_timestamp, new_job_id, utcnow
from jobserver.resources import find_tagged_processes, is_same_process
from jobserver.runner import JOB_ID_ENV, kill_group, kill_process
from jobserver.store import (
    RESCUE,
    Beat,
    Changed,
    Checkpoint,
    Finish,
    NewJob,
    Requeue,
    SqliteDriver,
    Store,
    forget_outcome,
    kept_outcome,
)

log = logging.getLogger("jobserver.maintenance")


async def rescue_interrupted(
    store: Store,
    max_rescues: int,
    now: datetime,
    events: Events | None = None,
    jobs_dir: Path | None = None,
    owned: Callable[[], Collection[str] | None] | None = None,
) -> list[Job]:
    """Requeue (or fail as lost) every job this node's previous run left running; returns
    them.  A job whose cancel was acknowledged ends cancelled instead (``Requeue``).  A
    job whose attempt had ended but whose end the store could not take (kept in
    ``jobs_dir``) gets that end instead: a finished job is not run again.

    ``owned`` (the reconciler, while this server runs): the ids of the jobs whose attempt
    this server watches, or None while a start is in flight; those are left alone.  It is
    asked after the rows were read, for each job just before its processes are killed
    (no await in between), so an attempt started since the read is never touched."""
    events = events or Events()
    rescued = []
    for job in await store.running():
        if owned is not None:
            mine = owned()
            if mine is None or job.id in mine:
                continue
        kill_leftovers(job)
        job_dir = None if jobs_dir is None else jobs_dir / job.id
        kept = None if job_dir is None else kept_outcome(job_dir, job.attempts)
        if job_dir is not None and kept is not None:
            change = await store.end_attempt(job.id, kept.attempt, kept.end, kept.now, kept.run)
            forget_outcome(job_dir)
            if change is not None:
                reason = kept.reason
                if change.job.state is JobState.CANCELLED and isinstance(kept.end, Requeue):
                    reason = change.job.reason
                _publish(events, change, f"{reason} (outcome kept while the store was down)")
                rescued.append(change.job)
            continue
        why = (
            "the server stopped while it ran"
            if owned is None
            else "this server no longer watched its attempt"
        )
        end, reason = rescue_end(job, max_rescues, why)
        change = await store.end_attempt(job.id, job.attempts, end, now)
        if change is not None:
            if change.job.state is JobState.CANCELLED:
                reason = change.job.reason or reason
            _publish(events, change, reason)
            rescued.append(change.job)
    return rescued


def rescue_end(job: Job, max_rescues: int, why: str) -> tuple[Finish | Requeue, str]:
    """How a running job nobody watches any more ends, and the reason to log: back to
    the queue counting a rescue, or, past ``max_rescues``, failed as ``lost`` (a job that
    kills its server must not loop forever).  The store keeps an acknowledged cancel."""
    if job.rescues >= max_rescues:
        error = JobError(
            "lost",
            f"lost: interrupted {job.rescues + 1} times, the last because {why} "
            f"(max_rescues = {max_rescues}); not requeued again",
        )
        return Finish(JobState.FAILED, error=error, reason="lost"), (
            f"lost after {job.rescues} rescues"
        )
    reason = f"requeued after {why} (rescue {job.rescues + 1} of {max_rescues})"
    return Requeue(reason, counts=RESCUE), reason


def _publish(events: Events, change: Changed, reason: str | None) -> None:
    events.transition(change.job, change.source, reason=reason)
    for dependent in change.cascaded:
        events.transition(dependent, JobState.QUEUED, reason=dependent.reason)


def kill_leftovers(job: Job) -> None:
    if (
        job.pid is not None
        and job.pid_started_at is not None
        and is_same_process(job.pid, job.pid_started_at)
    ):
        kill_group(job.pid)
    for pid in find_tagged_processes(JOB_ID_ENV, job.id):
        kill_process(pid)


class _Periodic:
    """A loop calling ``tick(now)`` every ``interval`` seconds until ``stop``."""

    interval: float
    name: str

    def __init__(
        self,
        clock: Callable[[], datetime] = utcnow,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        self._clock = clock
        # Several nodes: tick only while this node leads (None: always, one server).
        self._leading = leading
        self._task: asyncio.Task[None] | None = None

    async def tick(self, now: datetime) -> Any:
        raise NotImplementedError

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"jobserver-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                if self._leading is None or self._leading():
                    await self.tick(self._clock())
            except Exception:
                log.exception("%s tick failed; retrying on the next tick", self.name)
            await asyncio.sleep(self.interval)


class Reconciler(_Periodic):
    """Settles, without a restart, the jobs the store shows running on this node that no
    attempt of this server watches (an outcome that could not be recorded, a launch that
    failed half way), as the rescue after a restart would: a kept outcome if there is
    one, else back to the queue counting a rescue."""

    name = "reconciler"

    def __init__(
        self,
        store: Store,
        owned: Callable[[], Collection[str] | None],
        max_rescues: int,
        jobs_dir: Path,
        events: Events | None = None,
        *,
        interval: float = 5.0,
    ) -> None:
        super().__init__()
        self._store = store
        self._owned = owned
        self._max_rescues = max_rescues
        self._jobs_dir = jobs_dir
        self._events = events
        self.interval = interval

    async def tick(self, now: datetime) -> list[Job]:
        """Settle every orphaned running job; returns them as stored after."""
        settled = await rescue_interrupted(
            self._store, self._max_rescues, now, self._events, self._jobs_dir, self._owned
        )
        for job in settled:
            log.warning("job %s: running with no attempt watching it; %s", job.id, job.reason)
        return settled


class WalCheckpointer(_Periodic):
    """Keeps the write-ahead log bounded.

    SQLite checkpoints the WAL by itself every 1000 pages, but a reader that holds an old
    snapshot (an admin's open transaction in the ``sqlite3`` shell) stops it from being
    reset, and the log then grows with every write.  Every ``interval`` this service looks
    at the log's size and, past ``max_size``, runs ``PRAGMA wal_checkpoint(TRUNCATE)``
    without waiting on readers: once the reader leaves, the next tick truncates the log.
    """

    name = "wal-checkpointer"

    def __init__(self, driver: SqliteDriver, max_size: int, interval: float = 1.0) -> None:
        super().__init__()
        self._driver = driver
        self._max_size = max_size
        self.interval = interval
        self._warned = 0.0

    async def tick(self, now: datetime | None = None) -> Checkpoint | None:
        """Checkpoint if the log is past its bound; returns what the checkpoint did."""
        size = self._driver.wal_size()
        if size <= self._max_size:
            return None
        result = await self._driver.checkpoint()
        if result.busy and time.monotonic() - self._warned > 60:
            self._warned = time.monotonic()
            log.warning(
                "the WAL is %d bytes (bound %d) and cannot be reset: a reader holds an old "
                "snapshot (an open transaction in a sqlite3 shell?); it is truncated as "
                "soon as that reader ends its transaction",
                size,
                self._max_size,
            )
        elif not result.busy:
            log.info("WAL checkpointed and truncated (was %d bytes)", size)
        return result


class Pruner(_Periodic):
    """Deletes finished jobs older than their retention, with their attempts, dependency
    rows, idempotency keys (by cascade) and their directory (log, result, artifacts).
    Queued and running jobs are never touched: the store deletes only terminal rows.
    Each pruned id is remembered (its reads answer 410 Gone) for ``pruned_memory``."""

    name = "pruner"
    BATCH = 500

    def __init__(
        self,
        store: Store,
        jobs_dir: Path,
        retention: float,
        per_task: Mapping[str, float],
        *,
        interval: float = 60.0,
        idempotency_window: float = 86400.0,
        pruned_memory: float = 30 * 86400.0,
        clock: Callable[[], datetime] = utcnow,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(clock, leading)
        self._store = store
        self._jobs_dir = jobs_dir
        self._retention = retention
        self._per_task = dict(per_task)
        self.interval = interval
        self._idempotency_window = idempotency_window
        self._pruned_memory = pruned_memory

    async def due(self, now: datetime) -> list[str]:
        """The ids a tick would prune now (at most one batch)."""
        return await self._store.prunable(now, self._retention, self._per_task, self.BATCH)

    async def tick(self, now: datetime) -> list[str]:
        """Prune one batch; returns the ids deleted."""
        deleted = await self._store.delete_finished(await self.due(now), now)
        for job_id in deleted:
            await asyncio.to_thread(shutil.rmtree, self._jobs_dir / job_id, True)
        await self._store.forget_idempotency_keys(now - timedelta(seconds=self._idempotency_window))
        await self._store.forget_pruned(now - timedelta(seconds=self._pruned_memory))
        if deleted:
            log.info("pruned %d finished job(s) past their retention", len(deleted))
        return deleted

    async def run_until_done(self, now: datetime) -> list[str]:
        deleted: list[str] = []
        while batch := await self.tick(now):
            deleted += batch
        return deleted


@dataclass(frozen=True)
class CronJob:
    """One configured schedule, with its task's submit settings resolved."""

    name: str
    task: str
    cron: str
    args: Mapping[str, Any]
    timezone: str
    catch_up: float
    priority: int
    max_retries: int


class CronService(_Periodic):
    """Submits each schedule's job once per cron slot.

    The last fired slot is stored per schedule, and advancing it and inserting the job
    happen in one transaction (compare-and-set on the previous slot), so a slot fires at
    most once, whatever restarts happen.  After downtime, the latest missed slot fires
    once if it is younger than ``catch_up``; older missed slots are skipped and logged.
    A schedule seen for the first time starts from the slot before now (nothing fires
    for the past).
    """

    name = "cron"

    def __init__(
        self,
        store: Store,
        schedules: Mapping[str, CronJob],
        wake: Callable[[], None],
        *,
        interval: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
        events: Events | None = None,
        leading: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(clock, leading)
        self._store = store
        self._schedules = dict(schedules)
        self._wake = wake
        self.interval = interval
        self._events = events or Events()

    async def tick(self, now: datetime) -> list[Job]:
        """Fire what is due at ``now``; returns the jobs submitted."""
        if not self._schedules:
            return []
        fired: list[Job] = []
        slots = await self._store.schedule_slots()
        for schedule in self._schedules.values():
            job = await self._fire(schedule, slots.get(schedule.name), now)
            if job is not None:
                fired.append(job)
                self._events.transition(job, None, reason=f"schedule {schedule.name}")
        if fired:
            self._wake()
        return fired

    async def _fire(
        self, schedule: CronJob, previous: datetime | None, now: datetime
    ) -> Job | None:
        zone = zoneinfo.ZoneInfo(schedule.timezone)
        latest = latest_slot(schedule.cron, zone, now)
        if previous is None:
            await self._store.fire_schedule(schedule.name, None, latest, None, "", now)
            return None
        if latest <= previous:
            return None
        missed = count_slots(schedule.cron, zone, previous, latest) - 1
        if (now - latest).total_seconds() > schedule.catch_up:
            log.warning(
                "schedule %s: skipped %d slot(s) up to %s, older than catch_up (%g s)",
                schedule.name,
                missed + 1,
                format_timestamp(latest),
                schedule.catch_up,
            )
            await self._store.fire_schedule(schedule.name, previous, latest, None, "", now)
            return None
        if missed > 0:
            log.warning(
                "schedule %s: %d earlier missed slot(s) skipped; firing the latest, %s",
                schedule.name,
                missed,
                format_timestamp(latest),
            )
        new = NewJob(schedule.task, dict(schedule.args), schedule.priority, schedule.max_retries)
        job = await self._store.fire_schedule(
            schedule.name, previous, latest, new, new_job_id(), now
        )
        if job is not None:
            log.info(
                "schedule %s: slot %s -> job %s", schedule.name, format_timestamp(latest), job.id
            )
        return job


def latest_slot(cron: str, zone: zoneinfo.ZoneInfo, now: datetime) -> datetime:
    """The last slot of ``cron`` (read in ``zone``) at or before ``now``, in UTC."""
    local = now.astimezone(zone)
    base = local.replace(microsecond=0) + timedelta(seconds=1)
    slot: datetime = croniter(cron, base).get_prev(datetime)
    if slot > local:
        slot = croniter(cron, slot).get_prev(datetime)
    return slot.astimezone(UTC)


def count_slots(cron: str, zone: zoneinfo.ZoneInfo, after: datetime, until: datetime) -> int:
    """How many slots are in (after, until], counting at most 10 000."""
    iterator = croniter(cron, after.astimezone(zone))
    count = 0
    while count < 10_000:
        slot: datetime = iterator.get_next(datetime)
        if slot.astimezone(UTC) > until:
            break
        count += 1
    return count


# -- this node among others (PostgreSQL) --------------------------------------------------

FENCE_FRACTION = 0.75  # of node_timeout: silent this long, a node kills its own jobs
LEASE_FRACTION = 0.5  # of node_timeout: how long a renewal holds the leader lease


def definition_conflicts(mine: Mapping[str, Any], live: list[tuple[str, Any]]) -> list[str]:
    """Each difference between this node's definitions and a live node's, for a task or
    schedule both define, in words.  A name only one of them knows is no conflict (a
    rolling upgrade adds or removes tasks one node at a time)."""
    found = []
    for node, theirs in live:
        for kind in ("tasks", "schedules"):
            ours, others = mine.get(kind, {}), theirs.get(kind, {})
            for name in sorted(set(ours) & set(others)):
                for key in sorted(set(ours[name]) | set(others[name])):
                    here, there = ours[name].get(key), others[name].get(key)
                    if here != there:
                        found.append(
                            f"{kind}.{name}.{key} is {json.dumps(here)} here but "
                            f"{json.dumps(there)} on live node {node!r}"
                        )
    return found


class NodeLife:
    """This node's life among the nodes sharing one PostgreSQL database (docs/cluster.md).

    ``register`` inserts a new incarnation (refused when a task or schedule conflicts
    with a live node's).  Every ``heartbeat_interval`` a heartbeat renews it, publishes
    ``resources()``, and renews or takes the leader lease; the leader declares nodes
    silent for ``node_timeout`` dead and rescues their jobs in the same transaction
    (``Store.heartbeat``).  Judged by the database's clock, never by comparing nodes'.

    Self-fencing: ``healthy`` is false once no heartbeat has succeeded for
    ``FENCE_FRACTION`` of the timeout (measured here, from the start of the last one that
    did); the scheduler claims nothing meanwhile, and ``fence`` is called once to kill
    this node's jobs: by the time the leader may declare it dead, they are stopped.  A
    node that finds itself declared dead (it was frozen, or cut off) registers a new
    incarnation; its old attempts' late writes are refused by their fence.  Heartbeats
    run in tasks of their own, so a database that hangs does not stop the fencing."""

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_interval: float,
        node_timeout: float,
        url: str | None,
        definitions: dict[str, Any],
        resources: Callable[[], dict[str, Any]],
        max_rescues: int,
        fence: Callable[[str], None],
        wake: Callable[[], None],
        events: Events | None = None,
    ) -> None:
        self._store = store
        self._interval = heartbeat_interval
        self._timeout = node_timeout
        self._url = url
        self._definitions = definitions
        self._resources = resources
        self._max_rescues = max_rescues
        self._fence = fence
        self._wake = wake
        self._events = events or Events()
        self._fence_after = FENCE_FRACTION * node_timeout
        self._lease = LEASE_FRACTION * node_timeout
        self._last_ok = float("-inf")  # monotonic start of the last heartbeat that held
        self._leader = False
        self._fenced = False
        self._task: asyncio.Task[None] | None = None
        self._beat: asyncio.Task[Beat | None] | None = None

    def healthy(self) -> bool:
        """Whether this node may claim jobs: it heartbeated recently enough."""
        return time.monotonic() - self._last_ok < self._fence_after

    def leading(self) -> bool:
        """Whether this node holds the leader lease, as far as it can know: its last
        renewal began less than the lease's length ago."""
        return self._leader and time.monotonic() - self._last_ok < self._lease

    async def register(self) -> None:
        """A new incarnation of this node, used from now on.  ConfigError (nothing
        stored) if a task or schedule conflicts with a live node's."""

        def check(live: list[tuple[str, Any]]) -> None:
            conflicts = definition_conflicts(self._definitions, live)
            if conflicts:
                raise ConfigError(
                    f"node {self._store.node!r} cannot join: its definitions conflict with "
                    f"live nodes': {'; '.join(conflicts)}.  Give the task or schedule the "
                    "same definition on every node, or a new name (a task only one node "
                    "knows is fine)",
                    {"conflicts": conflicts},
                )

        started = time.monotonic()
        incarnation = f"{self._store.node}.{secrets.token_hex(6)}"
        await self._store.register_node(
            incarnation,
            url=self._url,
            resources=self._resources(),
            definitions=self._definitions,
            timeout=self._timeout,
            check=check,
        )
        self._last_ok, self._leader, self._fenced = started, False, False
        log.info("node %s: registered as incarnation %s", self._store.node, incarnation)

    async def tick(self) -> Beat | None:
        """One heartbeat (tests call it directly); None if it failed."""
        self._check_fence()
        started = time.monotonic()
        try:
            beat = await self._store.heartbeat(
                self._resources(),
                timeout=self._timeout,
                lease=self._lease,
                rescue=self._rescue,
            )
        except Exception as exc:
            log.warning("node %s: heartbeat failed: %s", self._store.node, exc)
            self._check_fence()
            return None
        if not beat.alive:
            old = self._store.incarnation
            self._leader = False
            if not self._fenced:
                self._fenced = True
                self._fence(f"incarnation {old} was declared dead")
            log.error(
                "node %s: incarnation %s was declared dead (silent for node_timeout); its "
                "jobs were rescued elsewhere and its late results are refused; joining "
                "again as a new incarnation",
                self._store.node,
                old,
            )
            try:
                await self.register()
            except Exception as exc:
                log.error("node %s: could not join again: %s", self._store.node, exc)
            return beat
        if self._fenced:
            log.warning("node %s: heartbeats again; claiming jobs again", self._store.node)
        self._last_ok, self._leader, self._fenced = started, beat.leader, False
        for dead in beat.declared_dead:
            log.warning("node incarnation %s declared dead: silent for node_timeout", dead)
        for change, reason in beat.rescued:
            _publish(self._events, change, reason)
        if beat.rescued:
            self._wake()
        return beat

    def _rescue(self, job: Job) -> tuple[Finish | Requeue, str]:
        return rescue_end(job, self._max_rescues, f"its node {job.node} was declared dead")

    def _check_fence(self) -> None:
        if self._fenced or self.healthy():
            return
        self._fenced = True
        silent = time.monotonic() - self._last_ok
        log.error(
            "node %s: no heartbeat for %.1f s (%.0f%% of node_timeout): killing this "
            "node's jobs and claiming none until a heartbeat succeeds",
            self._store.node,
            silent,
            100 * FENCE_FRACTION,
        )
        self._fence(f"no heartbeat for {silent:.1f} s")

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="jobserver-heartbeat")

    async def stop(self) -> None:
        for task in (self._task, self._beat):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._beat = None

    async def _loop(self) -> None:
        while True:
            if self._beat is None or self._beat.done():
                self._beat = asyncio.create_task(self.tick(), name="jobserver-heartbeat-beat")
            self._check_fence()
            await asyncio.sleep(self._interval)
