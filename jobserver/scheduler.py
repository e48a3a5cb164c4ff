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

from jobserver.config import JobsSettings, SchedulerSettings, format_size
from jobserver.jobs import Job, JobError, JobState, Outcome, format_timestamp, utcnow
from jobserver.resources import (
    Probe,
    Snapshot,
    children_map,
    process_start_time,
    tree_usage,
)
from jobserver.runner import LaunchSpec, ProcessHandle, Runner, list_artifacts
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
    - CPU is compressible, memory is not: while this server runs none of its jobs, the
      live CPU reading does not hold back the first job (declared accounting alone
      decides), so programs outside jobserver that keep the CPUs busy slow jobs down
      but never stall the queue.
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

    declared_cpus = capacity_cpus - claimed_cpus - limits.reserve_cpus
    free_cpus = min(declared_cpus, snapshot.cpu_idle - unused_cpus - limits.reserve_cpus)
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
            # CPU is compressible: with none of our jobs running, busy CPUs (other
            # programs) slow a job down but must not stall the queue for ever.
            cpus = declared_cpus if not running and not admit else free_cpus
            reason = _shortfall(job.request, cpus, free_memory)
        if reason is None:
            admit.append(job.id)
            slots -= 1
            declared_cpus -= job.request.cpus
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
            f"needs {format_size(request.memory)} memory but capacity after reserve is "
            f"{format_size(usable_memory)}: it can never start; {' or '.join(fixes)}"
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
            f"waiting for memory: needs {format_size(request.memory)}, "
            f"{format_size(max(0, free_memory))} free after reserve"
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


# -- The Scheduler service: applies plan() through the store and the runner ------------

QUEUE_HEAD_SIZE = 200
VIEW_HEAD_SIZE = 10
RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0


def retry_delay(
    failures: int,
    jitter: float,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
) -> float:
    """Exponential backoff for the n-th failure (1-based): base, 2 x base, 4 x base …
    capped at ``cap`` (by default 1 s, 2 s, 4 s … 5 min); ``jitter`` in [0, 1) spreads
    retries of jobs that failed together by up to 20%."""
    delay = min(cap, base * 2.0 ** min(failures - 1, 64))
    return delay * (1 + 0.2 * jitter)


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
    progress_stored: int = 0  # the handle's progress_seq last written to the store
    progress_stored_at: float = float("-inf")  # monotonic


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
        jobs_settings: JobsSettings | None = None,
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
        self._jobs_settings = jobs_settings or JobsSettings()

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
            self.wake()  # the loop sees _stopping and ends after any tick in progress
            await self._loop_task
            self._loop_task = None
        attempts = list(self._running.values())
        for attempt in attempts:
            # A job already being stopped for a cancel or a timeout ends as such.
            if attempt.stop_reason is None:
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
        while not self._stopping:
            # asyncio.timeout rather than wait_for: 3.11's wait_for can swallow a cancel.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.poll_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            if self._stopping:
                break
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
            await self._store_progress(monotonic)
            await self._enforce(monotonic)
            if not self._stopping:
                await self._admit(now, monotonic)

    def _sample_usage(self, monotonic: float) -> None:
        children: dict[int, list[int]] | None = None
        for attempt in self._running.values():
            if monotonic - attempt.sampled < self._settings.poll_interval / 2:
                continue
            if children is None:  # one scan of all processes serves every job (issue 6)
                children = children_map()
            usage = tree_usage(attempt.handle.pid, children)
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
                await self._store.fail_unstarted(
                    job.id,
                    JobError("UnknownTask", f"task {job.task!r} is no longer in the config"),
                    now,
                )
                continue
            request = _request(self._registry.get(job.task))
            queued.append(QueuedJob(job.id, job.task, job.priority, request))
        snapshot = self._probe.snapshot()
        decision = plan(queued, self._running_jobs(), snapshot, self._limits)
        self._last_snapshot, self._last_plan = snapshot, decision
        self._waiting = dict(decision.waiting)
        self._head = [job.id for job in queued]
        for job_id in decision.admit:
            await self._launch(job_id, now, monotonic)

    async def _launch(self, job_id: str, now: datetime, monotonic: float) -> None:
        job = await self._store.claim(job_id, now)
        if job is None:  # cancelled between the read and the claim
            return
        task = self._registry.get(job.task)
        spec = LaunchSpec(
            job.id,
            job.attempts,
            task.settings.function,
            job.args,
            self.job_dir(job.id),
            command=None if task.settings.command is None else task.argv(job.args),
            log_limit=self._jobs_settings.max_log_size,
            python=task.settings.python,
        )
        try:
            handle = self._runner.start(spec)
        except (OSError, ValueError) as exc:
            await self._store.finish(
                job.id,
                Finish(JobState.FAILED, error=JobError("SpawnFailed", f"could not start: {exc}")),
                self._clock(),
            )
            return
        timeout = job.timeout if job.timeout is not None else task.settings.timeout
        attempt = _Attempt(job, handle, _request(task), timeout, monotonic)
        self._running[job.id] = attempt
        self._waiting.pop(job.id, None)
        attempt.watcher = asyncio.create_task(self._watch(attempt), name=f"job-{job.id}")
        log.info(
            "job %s (%s): queued -> running, attempt %d, pid %d",
            job.id,
            job.task,
            job.attempts,
            handle.pid,
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
        await self._store_progress(time.monotonic(), attempt)
        artifacts = await asyncio.to_thread(list_artifacts, self.job_dir(attempt.job.id))
        job, now = attempt.job, self._clock()
        duration = time.monotonic() - attempt.started
        task = self._registry.get(job.task) if job.task in self._registry else None
        timed_out = attempt.stop_reason == "timeout"
        retry_allowed = not timed_out or (task is not None and task.settings.retry_on_timeout)

        def finish(state: JobState, **fields: Any) -> Finish:
            return Finish(
                state,
                exit_code=outcome.exit_code,
                peak_rss=attempt.peak_rss or None,
                cpu_seconds=attempt.cpu_seconds or None,
                artifacts=artifacts,
                **fields,
            )

        error = outcome.error
        if attempt.stop_reason == "timeout" and attempt.timeout is not None:
            error = JobError("Timeout", f"timed out after {attempt.timeout:g} s")
        if error is None:
            target, reason = JobState.SUCCEEDED, None
            await self._store.finish(job.id, finish(target, result=outcome.result), now)
        elif attempt.stop_reason == "shutdown":
            target, reason = JobState.QUEUED, "requeued: the server shut down while it ran"
            await self._store.requeue(job.id, reason=reason, now=now, exit_code=outcome.exit_code)
        elif attempt.stop_reason == "cancel":
            target, reason = JobState.CANCELLED, "cancelled by request while running"
            await self._store.finish(job.id, finish(target, reason=reason), now)
        elif job.failures < job.max_retries and retry_allowed:
            base = self._jobs_settings.retry_base
            cap = self._jobs_settings.retry_cap
            if task is not None:
                base = task.settings.retry_base or base
                cap = task.settings.retry_cap or cap
            delay = retry_delay(job.failures + 1, random.random(), base, cap)
            target = JobState.QUEUED
            reason = (
                f"attempt {job.attempts} failed ({error.message}); "
                f"retry {job.failures + 1} of {job.max_retries} after {delay:.1f} s"
            )
            await self._store.requeue(
                job.id,
                reason=reason,
                run_after=now + timedelta(seconds=delay),
                error=error,
                failed=True,
                now=now,
                exit_code=outcome.exit_code,
            )
        else:
            target, reason = JobState.FAILED, error.message
            await self._store.finish(job.id, finish(target, error=error, reason=error.type), now)
        log.info(
            "job %s (%s): running -> %s after %.3f s%s",
            job.id,
            job.task,
            target.value,
            duration,
            f": {reason}" if reason else "",
        )

    async def _store_progress(self, monotonic: float, only: _Attempt | None = None) -> None:
        """Write each running job's newest progress report, at most once per
        ``progress_interval`` per job (``only``: that job's, now, before it finishes)."""
        interval = self._jobs_settings.progress_interval
        for attempt in [only] if only is not None else list(self._running.values()):
            handle = attempt.handle
            if handle.progress is None or handle.progress_seq == attempt.progress_stored:
                continue
            if only is None and monotonic - attempt.progress_stored_at < interval:
                continue
            fraction, message = handle.progress
            attempt.progress_stored, attempt.progress_stored_at = handle.progress_seq, monotonic
            await self._store.set_progress(attempt.job.id, fraction, message, self._clock())

    # -- what the API shows ------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        return self._jobs_dir / job_id

    def waiting_reason(self, job: Job, now: datetime) -> str | None:
        """Why a queued job is not running yet, in plain words (None unless queued)."""
        if job.state is not JobState.QUEUED:
            return None
        if job.run_after is not None and job.run_after > now:
            because = f": {job.reason}" if job.reason else ""
            return f"scheduled for {format_timestamp(job.run_after)}{because}"
        if job.waiting_on:
            return ", ".join(f"waiting for {dep} ({state})" for dep, state in job.waiting_on)
        reason = self._waiting.get(job.id)
        if reason is not None:
            return reason
        if self._stopping:
            return "the server is shutting down"
        if job.id in self._head or len(self._head) < QUEUE_HEAD_SIZE:
            return "waiting for the scheduler's next tick"
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


def _request(task: Task) -> Request:
    return Request(cpus=task.settings.cpus, memory=task.settings.memory)
