"""Deciding which queued jobs start now, and (below the pure part) the service that does it.

``plan()`` is pure: it reads a queue head, the jobs this server runs, a
``resources.Snapshot`` and the configured limits, and returns which jobs to start and
why each other one waits.  No I/O, no clock: tests drive it with fake snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jobserver.config import SchedulerSettings
from jobserver.events import Events
from jobserver.jobs import Job, JobError, JobState, Outcome, format_timestamp, utcnow
from jobserver.resources import Probe, Snapshot, process_start_time, tree_usage
from jobserver.runner import LaunchSpec, ProcessHandle, Runner
from jobserver.store import Finish, Store
from jobserver.tasks import Registry, Task

log = logging.getLogger("jobserver.scheduler")

# Requests such as 4 x 0.25 CPU must fit in 1.0 despite binary floating point.
_CPU_EPSILON = 1e-9


@dataclass(frozen=True)
class Request:
    """What a job declares it needs: CPUs (may be fractional) and memory in bytes."""

    cpus: float
    memory: int


@dataclass(frozen=True)
class QueuedJob:
    id: str
    task: str
    priority: int
    request: Request


@dataclass(frozen=True)
class RunningJob:
    """A job this server runs, with its latest measured use.

    Usage lags a start by seconds (a process takes time to fault in its memory), so
    ``memory_used`` and ``cpus_used`` are 0 right after the start.
    """

    id: str
    task: str
    request: Request
    memory_used: int  # latest measured RSS of the process tree, bytes
    cpus_used: float  # CPU rate over the last sampling window


@dataclass(frozen=True)
class Limits:
    max_jobs: int
    max_cpus: float | None
    max_memory: int | None
    reserve_cpus: float
    reserve_memory: int


@dataclass(frozen=True)
class Headroom:
    cpus: float
    memory: int


@dataclass(frozen=True)
class Plan:
    admit: tuple[str, ...]  # job ids to start now, in queue order
    waiting: Mapping[str, str]  # job id -> why it waits, for every queue-head job not admitted
    headroom: Headroom  # free after the admitted jobs; negative when over-committed
    capacity: Headroom  # the snapshot's capacity after max_cpus / max_memory


def plan(
    queue_head: Sequence[QueuedJob],
    running: Sequence[RunningJob],
    snapshot: Snapshot,
    limits: Limits,
) -> Plan:
    """Choose the queued jobs to start now.

    Preconditions: ``queue_head`` is sorted by priority (highest first), then age (id,
    oldest first); ids are unique; ``running`` are the jobs this server runs; requests,
    measured use and reserves are non-negative.

    The rule, per resource (CPUs and memory):

    - capacity = the snapshot's capacity, capped by ``max_cpus`` / ``max_memory``.
    - Each running job *claims* max(request, measured use) for the declared accounting,
      and its not-yet-used part max(0, request - used) for the live reading: a
      just-started job holds its full request until its measured use catches up, so a
      burst is never all admitted in one tick.
    - declared free = capacity - sum of claims - reserve.
    - live free = the snapshot's free now (``cpu_idle``, ``memory_available``)
      - sum of not-yet-used parts - reserve.
    - free = min(declared free, live free).
    - Walk the queue head in order.  Admit a job if running + admitted < ``max_jobs``
      and its request fits free for both CPUs and memory; then subtract its request
      from free (both) and go on.  A job that does not fit does not block later,
      smaller jobs (skip ahead).
    - Every job not admitted gets a reason with numbers: the resource it waits for,
      the ``max_jobs`` limit, or that its request exceeds capacity minus reserve and so
      it can never start.

    Because free only shrinks during the walk, a waiting job never fits the final
    headroom while a job slot is free: the machine is never left idle while a fitting
    job waits.
    """
    capacity_cpus = snapshot.cpu_capacity
    if limits.max_cpus is not None:
        capacity_cpus = min(capacity_cpus, limits.max_cpus)
    capacity_memory = snapshot.memory_capacity
    if limits.max_memory is not None:
        capacity_memory = min(capacity_memory, limits.max_memory)

    claimed_cpus = sum(max(job.request.cpus, job.cpus_used) for job in running)
    claimed_memory = sum(max(job.request.memory, job.memory_used) for job in running)
    unused_cpus = sum(max(0.0, job.request.cpus - job.cpus_used) for job in running)
    unused_memory = sum(max(0, job.request.memory - job.memory_used) for job in running)

    free_cpus = (
        min(capacity_cpus - claimed_cpus, snapshot.cpu_idle - unused_cpus) - limits.reserve_cpus
    )
    free_memory = (
        min(capacity_memory - claimed_memory, snapshot.memory_available - unused_memory)
        - limits.reserve_memory
    )

    slots = limits.max_jobs - len(running)
    admit: list[str] = []
    waiting: dict[str, str] = {}
    for job in queue_head:
        reason = _never_fits(job.request, capacity_cpus, capacity_memory, snapshot, limits)
        if reason is None and slots <= 0:
            reason = f"max_jobs limit {limits.max_jobs} reached"
        if reason is None:
            reason = _shortfall(job.request, free_cpus, free_memory)
        if reason is None:
            admit.append(job.id)
            slots -= 1
            free_cpus -= job.request.cpus
            free_memory -= job.request.memory
        else:
            waiting[job.id] = reason

    return Plan(
        admit=tuple(admit),
        waiting=waiting,
        headroom=Headroom(cpus=free_cpus, memory=free_memory),
        capacity=Headroom(cpus=capacity_cpus, memory=capacity_memory),
    )


def _never_fits(
    request: Request,
    capacity_cpus: float,
    capacity_memory: int,
    snapshot: Snapshot,
    limits: Limits,
) -> str | None:
    """Why ``request`` exceeds capacity minus reserve, or None if it does not."""
    problems = []
    usable_memory = capacity_memory - limits.reserve_memory
    if request.memory > usable_memory:
        fixes = ["lower the task's memory request"]
        if limits.max_memory is not None and limits.max_memory < snapshot.memory_capacity:
            fixes.append("raise max_memory")
        if limits.reserve_memory > 0 and request.memory <= capacity_memory:
            fixes.append("lower reserve_memory")
        problems.append(
            f"needs {_format_size(request.memory)} memory but capacity after reserve is "
            f"{_format_size(usable_memory)}: it can never start; {' or '.join(fixes)}"
        )
    usable_cpus = capacity_cpus - limits.reserve_cpus
    if request.cpus > usable_cpus + _CPU_EPSILON:
        fixes = ["lower the task's cpus request"]
        if limits.max_cpus is not None and limits.max_cpus < snapshot.cpu_capacity:
            fixes.append("raise max_cpus")
        if limits.reserve_cpus > 0 and request.cpus <= capacity_cpus + _CPU_EPSILON:
            fixes.append("lower reserve_cpus")
        problems.append(
            f"needs {request.cpus:.2f} CPU but capacity after reserve is "
            f"{_format_cpus(usable_cpus)} CPU: it can never start; {' or '.join(fixes)}"
        )
    return "; ".join(problems) or None


def _shortfall(request: Request, free_cpus: float, free_memory: int) -> str | None:
    """Why ``request`` does not fit what is free now, or None if it fits."""
    problems = []
    if request.memory > free_memory:
        problems.append(
            f"waiting for memory: needs {_format_size(request.memory)}, "
            f"{_format_size(free_memory)} free after reserve"
        )
    if request.cpus > free_cpus + _CPU_EPSILON:
        problems.append(
            f"waiting for CPU: needs {request.cpus:.2f} CPU, "
            f"{_format_cpus(free_cpus)} free after reserve"
        )
    return "; ".join(problems) or None


def _format_cpus(cpus: float) -> str:
    # Over-commitment makes free negative; "0.00 free" reads better than "-0.30 free".
    return f"{max(0.0, cpus):.2f}"


def _format_size(size: int) -> str:
    """Bytes as "512 B", "512.0 MiB", "2.0 GiB"; negative (over-committed) shows as "0 B"."""
    if size < 1024:
        return f"{max(0, size)} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if round(value, 1) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


# -- The Scheduler service: applies plan() through the store and the runner ------------

QUEUE_HEAD_SIZE = 200
VIEW_HEAD_SIZE = 10
RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
# PSI "some avg10" (percent) at or above which the machine counts as under pressure.
PRESSURE_THRESHOLD = 10.0


def retry_delay(failures: int, jitter: float) -> float:
    """Exponential backoff for the n-th failure (1-based): 1 s, 2 s, 4 s … capped at
    5 min; ``jitter`` in [0, 1) spreads retries of jobs that failed together by up to 20%."""
    base = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2.0 ** (failures - 1))
    return base * (1 + 0.2 * jitter)


@dataclass
class _Attempt:
    """A job this server is running, with what the scheduler watches about it."""

    job: Job
    handle: ProcessHandle
    request: Request
    timeout: float | None
    started: float  # monotonic
    watcher: asyncio.Task[None] | None = None
    memory_used: int = 0
    peak_rss: int = 0
    cpu_seconds: float = 0.0
    cpus_used: float = 0.0
    sampled: float = 0.0  # monotonic time of the last usage sample
    stop_reason: str | None = None  # "cancel" | "timeout" | "shutdown"
    kill_at: float | None = None  # monotonic deadline for SIGKILL after SIGTERM


class Scheduler:
    """Turns queued rows into processes and finished processes into rows.

    ``tick`` runs on every wake (a submit, a cancel, a process exit) and every
    ``poll_interval``; tests call it directly.  ``start``/``stop`` are safe to call twice.
    """

    def __init__(
        self,
        *,
        store: Store,
        runner: Runner,
        probe: Probe,
        registry: Registry,
        settings: SchedulerSettings,
        jobs_dir: Path,
        clock: Callable[[], datetime] = utcnow,
        events: Events | None = None,
    ) -> None:
        self._store = store
        self._runner = runner
        self._probe = probe
        self._registry = registry
        self._settings = settings
        self._jobs_dir = jobs_dir
        self._clock = clock
        self._limits = Limits(
            max_jobs=settings.max_jobs,
            max_cpus=settings.max_cpus,
            max_memory=settings.max_memory,
            reserve_cpus=settings.reserve_cpus,
            reserve_memory=settings.reserve_memory,
        )
        self._running: dict[str, _Attempt] = {}
        self._waiting: dict[str, str] = {}
        self._head: list[str] = []
        self._last_plan: Plan | None = None
        self._last_snapshot: Snapshot | None = None
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._tick_lock = asyncio.Lock()
        self._events = events or Events()
        self._under_pressure: set[str] = set()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is None:
            self._stopping = False
            self._loop_task = asyncio.create_task(self._loop(), name="jobserver-scheduler")

    async def stop(self) -> None:
        """Stop admitting, then terminate every running job's tree and put the job back in
        the queue (the interrupted attempt counts toward neither retries nor rescues)."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        attempts = list(self._running.values())
        for attempt in attempts:
            self._terminate(attempt, "shutdown")
        watchers = [a.watcher for a in attempts if a.watcher is not None]
        if watchers:
            _, pending = await asyncio.wait(watchers, timeout=self._settings.kill_grace)
            for attempt in attempts:
                attempt.handle.signal_tree(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending)

    def wake(self) -> None:
        self._wakeup.set()

    async def _loop(self) -> None:
        # Not `while True`: on Python 3.11 asyncio.wait_for swallows a cancel that arrives
        # as the wake-up event fires (CPython gh-86296), and stop() would wait forever.
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._settings.poll_interval)
            self._wakeup.clear()
            try:
                await self.tick(self._clock())
            except Exception:
                # One bad tick (a locked file, a vanished process) must not end scheduling.
                log.exception("scheduler tick failed; retrying on the next tick")

    # -- one step ----------------------------------------------------------------

    async def tick(self, now: datetime) -> None:
        async with self._tick_lock:
            monotonic = time.monotonic()
            self._sample_usage(monotonic)
            await self._enforce(monotonic)
            if not self._stopping:
                await self._admit(now, monotonic)

    def _sample_usage(self, monotonic: float) -> None:
        for attempt in self._running.values():
            if monotonic - attempt.sampled < self._settings.poll_interval / 2:
                continue
            usage = tree_usage(attempt.handle.pid)
            if usage is None:
                continue
            window = monotonic - attempt.sampled if attempt.sampled else 0.0
            if window > 0:
                attempt.cpus_used = max(0.0, usage.cpu_seconds - attempt.cpu_seconds) / window
            attempt.memory_used = usage.rss
            attempt.peak_rss = max(attempt.peak_rss, usage.rss)
            attempt.cpu_seconds = max(attempt.cpu_seconds, usage.cpu_seconds)
            attempt.sampled = monotonic

    async def _enforce(self, monotonic: float) -> None:
        """Cancel requests, timeouts, and SIGKILL for trees that ignored SIGTERM."""
        if not self._running:
            return
        for job_id in await self._store.cancel_requested():
            attempt = self._running.get(job_id)
            if attempt is not None and attempt.stop_reason is None:
                self._terminate(attempt, "cancel")
        for attempt in list(self._running.values()):
            elapsed = monotonic - attempt.started
            if (
                attempt.stop_reason is None
                and attempt.timeout is not None
                and elapsed > attempt.timeout
            ):
                self._terminate(attempt, "timeout")
            if attempt.kill_at is not None and monotonic >= attempt.kill_at:
                attempt.handle.signal_tree(signal.SIGKILL)

    def _terminate(self, attempt: _Attempt, reason: str) -> None:
        attempt.stop_reason = reason
        attempt.kill_at = time.monotonic() + self._settings.kill_grace
        attempt.handle.signal_tree(signal.SIGTERM)
        log.info("job %s: sent SIGTERM to its process group (%s)", attempt.job.id, reason)

    async def _admit(self, now: datetime, monotonic: float) -> None:
        head = await self._store.queue_head(QUEUE_HEAD_SIZE, now)
        queued: list[QueuedJob] = []
        for job in head:
            if job.task not in self._registry:
                error = JobError("UnknownTask", f"task {job.task!r} is no longer in the config")
                failed = await self._store.fail_unstarted(job.id, error, now)
                if failed is not None:
                    self._events.transition(failed, JobState.QUEUED, reason=error.message)
                continue
            request = _request(self._registry.get(job.task))
            queued.append(QueuedJob(job.id, job.task, job.priority, request))
        snapshot = self._probe.snapshot()
        decision = plan(queued, self._running_jobs(), snapshot, self._limits)
        self._record_pressure(snapshot)
        self._record_holds(decision.waiting)
        self._last_snapshot, self._last_plan = snapshot, decision
        self._waiting = dict(decision.waiting)
        self._head = [job.id for job in queued]
        for job_id in decision.admit:
            await self._launch(job_id, now, monotonic)

    async def _launch(self, job_id: str, now: datetime, monotonic: float) -> None:
        job = await self._store.claim(job_id, now)
        if job is None:  # cancelled between the read and the claim
            return
        queued_since = max(job.created_at, job.run_after or job.created_at)
        waited = (now - queued_since).total_seconds()
        self._events.recorder.admission(job.task)
        task = self._registry.get(job.task)
        spec = LaunchSpec(
            job.id, job.attempts, task.settings.function, job.args, self.job_dir(job.id)
        )
        try:
            handle = self._runner.start(spec)
        except OSError as exc:
            self._events.transition(
                job, JobState.QUEUED, reason=f"attempt {job.attempts}", duration=waited
            )
            error = JobError("SpawnFailed", f"could not start: {exc}")
            failed = await self._store.finish(
                job.id, Finish(JobState.FAILED, error=error, reason=error.type), self._clock()
            )
            if failed is not None:
                self._events.transition(failed, JobState.RUNNING, reason=error.message)
            return
        attempt = _Attempt(job, handle, _request(task), task.settings.timeout, monotonic)
        self._running[job.id] = attempt
        self._waiting.pop(job.id, None)
        attempt.watcher = asyncio.create_task(self._watch(attempt), name=f"job-{job.id}")
        self._events.transition(
            job,
            JobState.QUEUED,
            reason=f"attempt {job.attempts}, pid {handle.pid}",
            duration=waited,
        )
        await self._store.record_process(job.id, handle.pid, process_start_time(handle.pid))

    async def _watch(self, attempt: _Attempt) -> None:
        outcome = await attempt.handle.wait()
        try:
            await self._record(attempt, outcome)
        except Exception:
            log.exception("job %s: could not record its outcome", attempt.job.id)
        finally:
            self._running.pop(attempt.job.id, None)
            self.wake()

    async def _record(self, attempt: _Attempt, outcome: Outcome) -> None:
        """Store how the attempt ended: a terminal state, or back to the queue for a retry
        or after a shutdown.  One log line per transition."""
        job, now = attempt.job, self._clock()
        duration = time.monotonic() - attempt.started

        def finish(state: JobState, **fields: Any) -> Finish:
            return Finish(
                state,
                exit_code=outcome.exit_code,
                peak_rss=attempt.peak_rss or None,
                cpu_seconds=attempt.cpu_seconds or None,
                **fields,
            )

        error = outcome.error
        if attempt.stop_reason == "timeout" and attempt.timeout is not None:
            error = JobError("Timeout", f"timed out after {attempt.timeout:g} s")
        updated: Job | None
        if error is None:
            reason = None
            updated = await self._store.finish(
                job.id, finish(JobState.SUCCEEDED, result=outcome.result), now
            )
        elif attempt.stop_reason == "shutdown":
            reason = "requeued: the server shut down while it ran"
            updated = await self._store.requeue(job.id, reason=reason)
        elif attempt.stop_reason == "cancel":
            reason = "cancelled by request while running"
            updated = await self._store.finish(
                job.id, finish(JobState.CANCELLED, reason=reason), now
            )
        elif job.failures < job.max_retries:
            delay = retry_delay(job.failures + 1, random.random())
            reason = (
                f"attempt {job.attempts} failed ({error.message}); "
                f"retry {job.failures + 1} of {job.max_retries} after {delay:.1f} s"
            )
            updated = await self._store.requeue(
                job.id,
                reason=reason,
                run_after=now + timedelta(seconds=delay),
                error=error,
                failed=True,
            )
        else:
            reason = error.message
            updated = await self._store.finish(
                job.id, finish(JobState.FAILED, error=error, reason=error.type), now
            )
        if updated is not None:
            self._events.transition(updated, JobState.RUNNING, reason=reason, duration=duration)

    def _record_holds(self, waiting: Mapping[str, str]) -> None:
        """Count each queued job once per new hold kind (not once per tick)."""
        for job_id, reason in waiting.items():
            kind = hold_kind(reason)
            previous = self._waiting.get(job_id)
            if previous is None or hold_kind(previous) != kind:
                self._events.recorder.hold(kind)

    def _record_pressure(self, snapshot: Snapshot) -> None:
        """Count each time memory or CPU pressure rises to ``PRESSURE_THRESHOLD``."""
        readings = (("memory", snapshot.memory_pressure), ("cpu", snapshot.cpu_pressure))
        for resource, value in readings:
            if value is None or value < PRESSURE_THRESHOLD:
                self._under_pressure.discard(resource)
            elif resource not in self._under_pressure:
                self._under_pressure.add(resource)
                self._events.recorder.pressure_event(resource)

    # -- what the API shows ------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self._jobs_dir / job_id

    def waiting_reason(self, job: Job, now: datetime) -> str | None:
        """Why a queued job is not running yet, in plain words (None unless queued)."""
        if job.state is not JobState.QUEUED:
            return None
        if job.run_after is not None and job.run_after > now:
            return f"scheduled for {format_timestamp(job.run_after)}: {job.reason or 'retry'}"
        reason = self._waiting.get(job.id)
        if reason is not None:
            return reason
        if self._stopping:
            return "the server is shutting down"
        if job.id in self._head or self._last_plan is None or len(self._head) < QUEUE_HEAD_SIZE:
            return "waiting for the scheduler's next tick"  # submitted since the last tick
        return f"in the queue behind the first {QUEUE_HEAD_SIZE} jobs"

    def view(self) -> dict[str, Any]:
        """The scheduler's view for ``GET /api/v1/system``."""
        snapshot, decision = self._last_snapshot, self._last_plan
        if snapshot is None or decision is None:
            snapshot = self._probe.snapshot()
            decision = plan([], self._running_jobs(), snapshot, self._limits)
        return {
            "capacity": {"cpus": decision.capacity.cpus, "memory": decision.capacity.memory},
            "reserved": {"cpus": self._limits.reserve_cpus, "memory": self._limits.reserve_memory},
            "free": {"cpus": decision.headroom.cpus, "memory": decision.headroom.memory},
            "machine": {
                "cpu_capacity": snapshot.cpu_capacity,
                "cpu_idle": snapshot.cpu_idle,
                "memory_capacity": snapshot.memory_capacity,
                "memory_available": snapshot.memory_available,
                "memory_pressure": snapshot.memory_pressure,
                "cpu_pressure": snapshot.cpu_pressure,
                "sources": dict(snapshot.sources),
            },
            "max_jobs": self._limits.max_jobs,
            "running": [
                {
                    "id": a.job.id,
                    "task": a.job.task,
                    "pid": a.handle.pid,
                    "memory_used": a.memory_used,
                    "cpus_used": round(a.cpus_used, 3),
                }
                for a in self._running.values()
            ],
            "queue_head": [
                {"id": job_id, "waiting_reason": self._waiting.get(job_id)}
                for job_id in self._head[:VIEW_HEAD_SIZE]
            ],
        }

    def _running_jobs(self) -> list[RunningJob]:
        return [
            RunningJob(a.job.id, a.job.task, a.request, a.memory_used, a.cpus_used)
            for a in self._running.values()
        ]


def hold_kind(reason: str) -> str:
    """A waiting reason's kind, for metric labels: never_fits, max_jobs, memory or cpu
    (the first that applies, in that order)."""
    if "can never start" in reason:
        return "never_fits"
    if reason.startswith("max_jobs limit"):
        return "max_jobs"
    if reason.startswith("waiting for memory"):
        return "memory"
    if reason.startswith("waiting for CPU"):
        return "cpu"
    return "other"


def _request(task: Task) -> Request:
    return Request(cpus=task.settings.cpus, memory=task.settings.memory)
