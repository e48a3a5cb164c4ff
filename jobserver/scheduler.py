"""Deciding which queued jobs start now, and (below the pure part) the service that does it.

``plan()`` is pure: it reads a queue head, the jobs this server runs, a
``resources.Snapshot`` and the configured limits, and returns which jobs to start and
why each other one waits.  No I/O, no clock: tests drive it with fake snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import random
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from jobserver.cgroups import JobCgroup, JobCgroups
from jobserver.config import JobsSettings, SchedulerSettings, format_size
from jobserver.errors import StorageUnavailable
from jobserver.events import Events
from jobserver.jobs import (
    Artifact,
    Job,
    JobError,
    JobState,
    Outcome,
    format_timestamp,
    utcnow,
)
from jobserver.resources import (
    Gpu,
    GpuProbe,
    OutsideCpu,
    Probe,
    Snapshot,
    children_map,
    process_start_time,
    tree_usage,
)
from jobserver.runner import (
    ExitUsage,
    LaunchSpec,
    ProcessHandle,
    Runner,
    has_artifacts,
    list_artifacts,
)
from jobserver.store import (
    FAILURE,
    OUTCOME_FILE,
    PRESSURE,
    RESCUE,
    Changed,
    Finish,
    KeptOutcome,
    QueueEntry,
    Requeue,
    Store,
    TaskRun,
    forget_outcome,
    keep_outcome,
)
from jobserver.tasks import Registry, Task

log = logging.getLogger("jobserver.scheduler")

# Backoff of the retries of an outcome the store could not take (seconds).
RETRY_FIRST, RETRY_MAX = 0.05, 2.0

# Requests such as 4 x 0.25 CPU must fit in 1.0 despite binary floating point.
_CPU_EPSILON = 1e-9


@dataclass(frozen=True)
class Request:
    """What a job declares it needs: CPUs (may be fractional) and memory in bytes."""

    cpus: float
    memory: int
    gpus: int = 0  # devices it gets to itself
    gpu_memory: int = 0  # free memory each of those devices needs

    @property
    def gpu_count(self) -> int:
        return max(self.gpus, 1 if self.gpu_memory > 0 else 0)


@dataclass(frozen=True)
class QueuedJob:
    id: str
    task: str
    priority: int
    request: Request
    waited: float = 0.0  # seconds it has been ready to run (the caller's clock, not ours)
    # Seconds it is expected to run at most (its task's learned run time, or its timeout);
    # None: not known yet.  Backfill starts a job ahead of a reserved one only if it ends
    # in time.
    duration: float | None = None


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
    priority: int = 0
    started: float = 0.0  # start time on any monotonic scale: the youngest has the largest
    gpu_devices: tuple[int, ...] = ()  # the GPU indices it was given
    # Seconds until it is expected to have ended at the latest (0 once past that); None:
    # not known.  What a reservation's expected start is worked out from.
    remaining: float | None = None


@dataclass(frozen=True)
class TaskLimits:
    """Per-task rules: at most ``max_concurrency`` running, or ``exclusive`` (runs alone)."""

    max_concurrency: int | None = None
    exclusive: bool = False


_NO_TASK_LIMITS = TaskLimits()


@dataclass(frozen=True)
class Limits:
    max_jobs: int
    max_cpus: float | None
    max_memory: int | None
    reserve_cpus: float
    reserve_memory: int
    memory_floor: int = 0  # available memory below this stops admission
    memory_pressure_limit: float | None = None  # PSI percent; None: not watched
    cpu_pressure_limit: float | None = None
    hysteresis: float = 0.0  # fraction: the margin a held resource must clear again
    starvation_after: float | None = None  # seconds; None: no starvation guard
    tasks: Mapping[str, TaskLimits] = field(default_factory=dict)
    # Per task, its jobs running on every node (a shared database counts them under the
    # task's lock in the claim's transaction); a task absent counts ``running`` alone.
    running_everywhere: Mapping[str, int] = field(default_factory=dict)


# Names in PlanState.held.
MEMORY, CPU, FLOOR, MEMORY_PSI, CPU_PSI = "memory", "cpu", "memory_floor", "memory_psi", "cpu_psi"


@dataclass(frozen=True)
class PlanState:
    """What the previous plan held back, handed to the next one (hysteresis).

    ``held`` names the signals that stopped admission (``memory_floor``, ``memory_psi``,
    ``cpu_psi``) and the resources some job waited for (``memory``, ``cpu``).  A held
    signal is released only when it clears its threshold by the hysteresis margin; a
    held resource admits a job only when free exceeds its need by that margin.
    """

    held: frozenset[str] = frozenset()


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
    state: PlanState = PlanState()  # hand to the next plan()
    overload: str | None = None  # why nothing is admitted (memory floor, PSI), if so
    devices: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # job id -> GPUs


def plan(
    queue_head: Sequence[QueuedJob],
    running: Sequence[RunningJob],
    snapshot: Snapshot,
    limits: Limits,
    state: PlanState = PlanState(),
    gpus: Sequence[Gpu] | None = None,
) -> Plan:
    """Choose the queued jobs to start now.

    Preconditions: ``queue_head`` is sorted by priority (highest first), then age (id,
    oldest first); ids are unique; ``running`` are the jobs this server runs; requests,
    measured use, reserves and ``waited`` are non-negative; ``state`` is the previous
    plan's ``state`` (or the empty state).

    The rule, per resource (CPUs and memory):

    - capacity = the snapshot's capacity, capped by ``max_cpus`` / ``max_memory``.
    - Each running job *claims* max(request, measured use) for the declared accounting,
      and its not-yet-used part max(0, request - used) for the live reading: a
      just-started job holds its full request until its measured use catches up, so a
      burst is never all admitted in one tick.
    - declared free = capacity - sum of claims - reserve.
    - live free = the snapshot's free now (``memory_available``) - sum of not-yet-used
      parts - reserve.
    - free memory = min(declared free, live free).
    - CPU is compressible, so it follows declared requests against capacity: free CPUs =
      capacity - the running jobs' requests - reserve - ``cpu_outside`` (the CPUs busy
      outside our jobs, averaged over a window longer than a job's start-up).  No live
      idle reading: a starting job's own burst (imports, faulting its memory in) must not
      hold back the next; PSI cpu pressure (``cpu_pressure_limit``) is the overload
      signal.
    - Overload stops every admission: available memory below ``memory_floor``, or PSI
      memory / cpu pressure above its limit.  Once tripped, a signal holds until it
      clears the threshold by the ``hysteresis`` fraction (no flapping).
    - Walk the queue head in order.  Admit a job if running + admitted < ``max_jobs``,
      its task is under ``max_concurrency`` (its jobs in ``running``, or on every node
      when ``limits.running_everywhere`` counts them), no exclusive job runs (and, for an
      exclusive job, nothing runs at all), and its request fits free for both CPUs and
      memory (and the live memory reading holds 1 + ``hysteresis`` times it if the
      previous plan was short of memory);
      then subtract its request from free and go on.  A job that does not fit does
      not block later, smaller jobs (skip ahead) ...
    - ... unless it has waited ``starvation_after`` or longer: then it reserves its
      request (and a job slot, and as many GPUs as it asks for: a later job gets
      devices only while that many stay free; an exclusive job reserves the whole
      machine) against every later job, which waits "held for job ...".  A job that
      can never start (more than the capacity, or than the machine's GPUs) reserves
      nothing.
    - The first job that waits for resources reserves them too (a soft reservation)
      when its expected start is known: the time by which enough running and admitted
      jobs will have ended (``remaining``, ``duration``) for it to fit.
    - Backfill: a later job passes a reservation if its ``duration`` ends before the
      reservation's expected start, or it fits in what will be left beside the reserved
      job then (free at that start, less its request, less the jobs admitted beside it
      that still run then; with no expected start, free now less its request).  A job
      of unknown ``duration`` passes a soft reservation, never a starving job's.
    - A job that asks for GPUs also needs that many devices that no running or admitted
      job holds, each with ``gpu_memory`` free (``gpus`` None: NVML does not answer,
      so it waits); it gets the ones with the most free memory (``Plan.devices``).
    - While this server runs none of its jobs, the outside load does not hold back the
      first job (declared accounting alone decides), so programs outside jobserver that
      keep the CPUs busy slow jobs down but never stall the queue.
    - Every job not admitted gets a reason with numbers.

    Because free only shrinks during the walk, a waiting job never fits the final
    headroom while a job slot is free, unless a reason above (a task limit, an
    exclusive job, a starving job's reservation, a held resource's margin, overload)
    says otherwise: the machine is never left idle without a stated reason.
    """
    capacity_cpus = snapshot.cpu_capacity
    if limits.max_cpus is not None:
        capacity_cpus = min(capacity_cpus, limits.max_cpus)
    capacity_memory = snapshot.memory_capacity
    if limits.max_memory is not None:
        capacity_memory = min(capacity_memory, limits.max_memory)

    # CPU is compressible: declared requests against capacity, less the load outside our
    # jobs averaged over a window longer than a job's start-up (never the live idle
    # reading, which a starting job's own burst empties).  Memory is not: it keeps the
    # live reading too.
    outside_cpus = snapshot.cpu_outside or 0.0
    declared_cpus = capacity_cpus - sum(job.request.cpus for job in running) - limits.reserve_cpus
    free_cpus = declared_cpus - outside_cpus
    claimed_memory = sum(max(job.request.memory, job.memory_used) for job in running)
    unused_memory = sum(max(0, job.request.memory - job.memory_used) for job in running)

    # The live reading alone: what hysteresis margins apply to (it is what hovers).
    live_memory = snapshot.memory_available - unused_memory - limits.reserve_memory
    free_memory = min(capacity_memory - claimed_memory - limits.reserve_memory, live_memory)
    cpu_note = (
        f" ({outside_cpus:.2f} busy outside jobserver's jobs, on average)"
        if outside_cpus >= 0.005
        else ""
    )

    overloaded = _overload(snapshot, limits, state.held)
    overload = "; ".join(reason for _, reason in overloaded) or None
    held = {name for name, _ in overloaded}
    margin = 1.0 + limits.hysteresis

    slots = limits.max_jobs - len(running)
    per_task: dict[str, int] = {}
    for runner in running:
        per_task[runner.task] = per_task.get(runner.task, 0) + 1
    per_task.update(limits.running_everywhere)
    exclusive_name = next(
        (
            f"{j.id} ({j.task})"
            for j in running
            if limits.tasks.get(j.task, _NO_TASK_LIMITS).exclusive
        ),
        None,
    )
    busy = len(running)  # jobs running or admitted so far

    # Reservations for the jobs behind them: every starving job's (hard), and the first
    # waiting job's when its start can be foreseen (soft, Slurm's EASY backfill).
    reservations: list[_Reservation] = []
    # What running and admitted jobs free when they end: (seconds left, cpus, memory).
    releases = [
        (job.remaining, job.request.cpus, max(job.request.memory, job.memory_used))
        for job in running
    ]

    taken_gpus = {index for runner in running for index in runner.gpu_devices}
    devices: dict[str, tuple[int, ...]] = {}

    admit: list[str] = []
    waiting: dict[str, str] = {}
    for job in queue_head:
        rules = limits.tasks.get(job.task, _NO_TASK_LIMITS)
        reason = _never_fits(
            job.request, capacity_cpus, capacity_memory, snapshot, limits
        ) or _gpus_never_fit(job.request, gpus)
        blocked = reason is None  # waits for something that running jobs will free
        if reason is None and overload is not None:
            reason, blocked = overload, False
        if reason is None and exclusive_name is not None:
            reason = f"exclusive job {exclusive_name} is running; nothing else starts beside it"
        count = per_task.get(job.task, 0)
        if reason is None and rules.max_concurrency is not None and count >= rules.max_concurrency:
            where = " on all nodes" if job.task in limits.running_everywhere else ""
            reason = (
                f"task limit {rules.max_concurrency} reached: {count} {job.task} jobs "
                f"running{where}"
            )
            blocked = False
        if reason is None and rules.exclusive and busy > 0:
            reason = f"exclusive: waits for the {busy} running job(s) to finish"
        if reason is None and slots <= 0:
            reason = f"max_jobs limit {limits.max_jobs} reached"
        if reason is None:
            # CPU is compressible: with none of our jobs running, busy CPUs (other
            # programs) slow a job down but must not stall the queue for ever.
            idle_server = not running and not admit
            reason, short = _shortfall(
                job.request,
                declared_cpus if idle_server else free_cpus,
                free_memory,
                live_memory,
                state.held,
                margin,
                "" if idle_server else cpu_note,
            )
            held |= short
        picked: tuple[int, ...] = ()
        if reason is None and job.request.gpu_count:
            picked, reason = _pick_gpus(job.request, gpus, taken_gpus)
        if reason is None and reservations:
            # A reservation holds the jobs behind it unless they fit beside it or end
            # before its expected start.  A job whose run time is not known yet passes a
            # soft one (skip ahead, as without backfill); a hard one it cannot pass.
            binding = [r for r in reservations if r.hard or job.duration is not None]
            # Those it would still hold resources at the expected start of.
            outlasted = [
                r
                for r in binding
                if job.duration is None or r.start is None or job.duration > r.start
            ]
            beside = all(r.leaves(job.request) for r in outlasted) and (
                not picked
                or len(gpus or ()) - len(taken_gpus) - sum(r.gpus for r in binding) >= len(picked)
            )
            if not beside:
                reason = _held_reason(binding, job.duration)
            else:
                for r in outlasted:
                    r.take(job.request)
        if reason is None:
            admit.append(job.id)
            slots -= 1
            busy += 1
            free_cpus -= job.request.cpus
            free_memory -= job.request.memory
            live_memory -= job.request.memory
            releases.append((job.duration, job.request.cpus, job.request.memory))
            per_task[job.task] = count + 1
            if picked:
                devices[job.id] = picked
                taken_gpus.update(picked)
            if rules.exclusive:
                exclusive_name = f"{job.id} ({job.task})"
            continue
        starving = (
            blocked
            and limits.starvation_after is not None
            and job.waited >= limits.starvation_after
        )
        soft = blocked and not starving and not reservations
        if starving or soft:
            reservation = _reserve(
                f"job {job.id} (waiting {_format_duration(job.waited)})"
                if starving
                else f"job {job.id} (first in the queue)",
                starving,
                job.request,
                rules.exclusive,
                Headroom(
                    free_cpus - sum(r.cpus for r in reservations),
                    free_memory - sum(r.memory for r in reservations),
                ),
                slots - len(reservations),
                releases,
            )
            if starving or reservation.start is not None:
                reservations.append(reservation)
        if starving:
            reason += (
                f"; waiting {_format_duration(job.waited)}, past starvation_after "
                f"{_format_duration(limits.starvation_after or 0.0)}: later jobs may not "
                "take what it needs"
            )
        waiting[job.id] = reason

    return Plan(
        admit=tuple(admit),
        waiting=waiting,
        headroom=Headroom(cpus=free_cpus, memory=free_memory),
        capacity=Headroom(cpus=capacity_cpus, memory=capacity_memory),
        state=PlanState(frozenset(held)),
        overload=overload,
        devices=devices,
    )


@dataclass
class _Reservation:
    """What a waiting job sets aside against the jobs behind it.

    ``start`` is the latest time (seconds from now) by which it would fit, were nothing
    else started, judging by the running jobs' expected ends; None when that cannot be
    foreseen (an end not known, or it needs GPUs, whose memory NVML reads only now).
    ``extra_*`` is what will be left beside it then (with ``start`` None: now): a job
    that still runs at ``start`` may take only that (Slurm's "extra" nodes).
    """

    holder: str  # "job 01J… (waiting 5m)"
    hard: bool  # a starving job's: no job of unknown run time passes it
    cpus: float
    memory: int
    gpus: int
    start: float | None
    extra_cpus: float
    extra_memory: int
    extra_slots: int
    everything: bool  # an exclusive job: nothing may run beside it

    def leaves(self, request: Request) -> bool:
        """Whether a job of ``request`` still running at ``start`` leaves it room."""
        return (
            not self.everything
            and self.extra_slots > 0
            and request.cpus <= self.extra_cpus + _CPU_EPSILON
            and request.memory <= self.extra_memory
        )

    def take(self, request: Request) -> None:
        self.extra_cpus -= request.cpus
        self.extra_memory -= request.memory
        self.extra_slots -= 1


def _reserve(
    holder: str,
    hard: bool,
    request: Request,
    exclusive: bool,
    free: Headroom,
    slots: int,
    releases: Sequence[tuple[float | None, float, int]],
) -> _Reservation:
    """The reservation of ``request``: its expected start, as the running and admitted
    jobs ``releases`` (seconds left at most, cpus, memory) end, and what is left beside it
    then.  Ends not known could only make it earlier: leaving them out gives a start it
    will fit by.  With none foreseen, what is left beside it is what is free now less it."""
    cpus, memory, room = free.cpus, free.memory, slots

    def reservation(start: float | None) -> _Reservation:
        return _Reservation(
            holder,
            hard,
            request.cpus,
            request.memory,
            request.gpu_count,
            start,
            cpus - request.cpus,
            memory - request.memory,
            room - 1,
            exclusive,
        )

    def fits() -> bool:
        return room > 0 and request.cpus <= cpus + _CPU_EPSILON and request.memory <= memory

    if request.gpu_count:
        return reservation(None)
    if exclusive:
        ends = [left for left, _, _ in releases]
        return reservation(None if None in ends else max([0.0, *(e or 0.0 for e in ends)]))
    if fits():  # held by something else (a hysteresis margin): it fits now
        return reservation(0.0)
    for left, more_cpus, more_memory in sorted(
        (left, c, m) for left, c, m in releases if left is not None
    ):
        cpus, memory, room = cpus + more_cpus, memory + more_memory, room + 1
        if fits():
            return reservation(left)
    cpus, memory, room = free.cpus, free.memory, slots
    return reservation(None)


def _held_reason(binding: Sequence[_Reservation], duration: float | None) -> str:
    first = binding[0]
    more = f" and {len(binding) - 1} more" if len(binding) > 1 else ""
    why = "it waited past starvation_after; " if first.hard else ""
    starts = [r.start for r in binding]
    if None in starts:
        when = "when it can start is not known"
    else:
        when = f"it should start within {_format_seconds(min(s or 0.0 for s in starts))}"
    if duration is None:
        run = "this job's run time is not known yet"
    else:
        run = f"this job may run {_format_seconds(duration)}"
    return f"held for {first.holder}{more}: {why}{when} and {run}"


def _gpus_never_fit(request: Request, gpus: Sequence[Gpu] | None) -> str | None:
    """Why the machine's GPUs can never serve ``request``, or None (also when NVML does
    not answer: the GPUs may appear)."""
    count = request.gpu_count
    if not count or gpus is None:
        return None
    if count > len(gpus):
        return f"needs {count} GPU(s) but the machine has {len(gpus)}: it can never start"
    big_enough = [gpu for gpu in gpus if gpu.memory_total >= request.gpu_memory]
    if len(big_enough) < count:
        largest = max(gpu.memory_total for gpu in gpus)
        return (
            f"needs {count} GPU(s){_each(request)} but {len(big_enough)} of the machine's GPUs "
            f"have that much memory at all (largest {format_size(largest)}): it can never start"
        )
    return None


def _each(request: Request) -> str:
    return f" with {format_size(request.gpu_memory)} free each" if request.gpu_memory else ""


def _pick_gpus(
    request: Request, gpus: Sequence[Gpu] | None, taken: set[int]
) -> tuple[tuple[int, ...], str | None]:
    """The devices for a GPU job (most free memory first), or why it waits."""
    count = request.gpu_count
    if gpus is None:
        return (), f"waiting for {count} GPU(s): NVML does not answer (no GPU driver yet)"
    fitting = sorted(
        (gpu for gpu in gpus if gpu.index not in taken and gpu.memory_free >= request.gpu_memory),
        key=lambda gpu: (-gpu.memory_free, gpu.index),
    )
    if len(fitting) < count:
        return (), f"waiting for GPUs: needs {count}{_each(request)}, {len(fitting)} available"
    return tuple(sorted(gpu.index for gpu in fitting[:count])), None


def _overload(snapshot: Snapshot, limits: Limits, held: frozenset[str]) -> list[tuple[str, str]]:
    """The overload signals that stop admission now, each (name, reason).

    A signal that stopped the previous plan holds until it clears its threshold by the
    hysteresis fraction: available memory above floor + h x min(floor, memory capacity -
    floor) (floor x (1 + h), unless that is more than the machine could ever have
    available: then h of the room above the floor), pressure below limit x (1 - h).
    Every resume threshold can be reached.
    """
    found: list[tuple[str, str]] = []
    h = limits.hysteresis
    floor = limits.memory_floor
    if floor > 0:
        room = max(0, snapshot.memory_capacity - floor)
        threshold = floor + int(h * min(floor, room)) if FLOOR in held else floor
        available = snapshot.memory_available
        if available < threshold:
            text = (
                f"memory floor: {format_size(available)} available < memory_floor "
                f"{format_size(floor)}"
            )
            if available >= floor:
                text = (
                    f"memory floor: {format_size(available)} available, held until above "
                    f"{format_size(threshold)} (memory_floor {format_size(floor)} + hysteresis)"
                )
            found.append((FLOOR, text))
    for name, kind, reading, limit in (
        (MEMORY_PSI, "memory", snapshot.memory_pressure, limits.memory_pressure_limit),
        (CPU_PSI, "cpu", snapshot.cpu_pressure, limits.cpu_pressure_limit),
    ):
        if reading is None or limit is None:
            continue
        psi_threshold = limit * (1 - h) if name in held else limit
        if reading > psi_threshold:
            text = f"PSI {kind} pressure {reading:.0f}% > {limit:.0f}%"
            if reading <= limit:
                text = (
                    f"PSI {kind} pressure {reading:.0f}%, held until below {psi_threshold:.0f}% "
                    f"(limit {limit:.0f}% - hysteresis)"
                )
            found.append((name, text))
    return found


def admission_problems(settings: SchedulerSettings, snapshot: Snapshot) -> list[tuple[str, str]]:
    """The ``[scheduler]`` keys, each with why, that make it impossible for anything to be
    admitted on the machine of ``snapshot`` (refused at start, reload and PATCH)."""
    problems: list[tuple[str, str]] = []
    machine = snapshot.memory_capacity
    if settings.memory_floor > 0 and settings.memory_floor >= machine:
        problems.append(
            (
                "scheduler.memory_floor",
                f"memory_floor {format_size(settings.memory_floor)} is not below this "
                f"machine's memory {format_size(machine)}: available memory can never "
                "reach it, so no job would ever start; lower it (0 turns the floor off)",
            )
        )
    memory = machine if settings.max_memory is None else min(machine, settings.max_memory)
    if settings.reserve_memory >= memory:
        capped = settings.max_memory is not None and settings.max_memory < machine
        problems.append(
            (
                "scheduler.reserve_memory",
                f"reserve_memory {format_size(settings.reserve_memory)} leaves nothing of "
                f"the {format_size(memory)} jobs may use"
                + (" (max_memory)" if capped else "")
                + ": no job would ever start; lower reserve_memory"
                + (" or raise max_memory" if capped else ""),
            )
        )
    cpus = snapshot.cpu_capacity
    if settings.max_cpus is not None:
        cpus = min(cpus, settings.max_cpus)
    if settings.reserve_cpus >= cpus:
        capped = settings.max_cpus is not None and settings.max_cpus < snapshot.cpu_capacity
        problems.append(
            (
                "scheduler.reserve_cpus",
                f"reserve_cpus {settings.reserve_cpus:g} leaves nothing of the {cpus:g} "
                "CPUs jobs may use"
                + (" (max_cpus)" if capped else "")
                + ": no job would ever start; lower reserve_cpus"
                + (" or raise max_cpus" if capped else ""),
            )
        )
    return problems


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


def _shortfall(
    request: Request,
    free_cpus: float,
    free_memory: int,
    live_memory: int,
    held: frozenset[str] = frozenset(),
    margin: float = 1.0,
    cpu_note: str = "",
) -> tuple[str | None, set[str]]:
    """Why ``request`` does not fit what is free now (None if it fits), and the resources
    it is short of.  For memory in ``held`` the live reading must also hold ``margin``
    times the request (declared accounting is exact; the live reading is what hovers).
    CPU has no live reading here: its free figure is declared requests against capacity
    less a windowed average, which does not hover."""
    problems = []
    short: set[str] = set()
    memory_need = request.memory * margin if MEMORY in held else request.memory
    if request.memory > free_memory or memory_need > live_memory:
        short.add(MEMORY)
        extra = ""
        if request.memory <= free_memory:
            extra = f" (+{format_size(int(memory_need) - request.memory)} hysteresis margin)"
        problems.append(
            f"waiting for memory: needs {format_size(request.memory)}{extra}, "
            f"{format_size(max(0, free_memory))} free after reserve"
        )
    if request.cpus > free_cpus + _CPU_EPSILON:
        short.add(CPU)
        problems.append(
            f"waiting for CPU: needs {request.cpus:.2f} CPU, "
            f"{_format_cpus(free_cpus)} free after reserve{cpu_note}"
        )
    return "; ".join(problems) or None, short


def _format_duration(seconds: float) -> str:
    """ "45s", "5m", "5m30s", "2h05m"."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s" if secs else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _format_seconds(seconds: float) -> str:
    """ "0.4s", "12.0s", then as ``_format_duration``: run times are often short."""
    return f"{seconds:.1f}s" if seconds < 60 else _format_duration(seconds)


def _format_cpus(cpus: float) -> str:
    # Over-commitment makes free negative; "0.00 free" reads better than "-0.30 free".
    return f"{max(0.0, cpus):.2f}"


def pressure_victim(running: Sequence[RunningJob]) -> RunningJob | None:
    """The job to act on under memory pressure: the lowest priority, then the youngest
    (latest started: it has the least work to lose)."""
    if not running:
        return None
    return min(running, key=lambda job: (job.priority, -job.started, job.id))


def measured_use(
    sampled_peak: int,
    sampled_cpu: float,
    reaped: ExitUsage | None,
    cgroup_peak: int | None,
) -> tuple[int, float]:
    """An ended attempt's peak memory (bytes) and CPU seconds, from the kernel where it
    can tell, however short the job.

    - Peak: the job's cgroup's own high-water mark where it had one (exact for the whole
      tree; it misses only what a spawned interpreter used before it joined, which the
      reaped figure holds).  Otherwise the larger of the sampled tree RSS (which sums
      the processes alive at a sample, and misses a job shorter than the sampling
      period) and the reaped ``ru_maxrss`` (exact however short, but the largest single
      process of the tree, not their sum; a forked job's is counted less what it
      inherited from the fork server).
    - CPU: the larger of the sampled tree's and the reaped process's own account (which
      covers every descendant it waited for).
    """
    peak = max(sampled_peak, reaped.max_rss if reaped is not None else 0)
    if cgroup_peak is not None:
        peak = max(cgroup_peak, reaped.max_rss if reaped is not None else 0)
    cpu = max(sampled_cpu, reaped.cpu_seconds if reaped is not None else 0.0)
    return peak, cpu


def learned_memory(peaks: Sequence[int], percentile: float, margin: float) -> int | None:
    """``percentile`` (nearest rank) of the recent peak RSS values, times ``margin``; None
    without history."""
    if not peaks:
        return None
    ordered = sorted(peaks)
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return int(ordered[rank - 1] * margin)


@dataclass(frozen=True)
class MemoryRequest:
    """The memory request admission uses for a task, where it came from and why."""

    memory: int
    source: str  # "declared" | "learned" | "default_memory"
    why: str


def memory_request(
    declared: int | None,
    peaks: Sequence[int],
    percentile: float,
    margin: float,
    fallback: int,
    *,
    memory_limit: int | None = None,
    limit_in_kernel: bool = False,
    usable: int | None = None,
) -> MemoryRequest:
    """The memory request the scheduler uses for a task, and why.

    Its declared request, unless it declares none (then the ``percentile`` of its recent
    ``peaks`` times ``margin``, or ``fallback`` without history) or one of its recent runs
    used more than it declares (then the larger of the two).  A learned figure is capped:

    - at ``memory_limit`` where the kernel enforces it (a per-job cgroup): the job can
      never hold more;
    - at ``memory_limit`` plus the largest measured overshoot where the limit is enforced
      by sampling: a job can grow past it between two samples, and that much it really
      held before it was killed;
    - at ``usable`` (capacity after reserve): a run that used more than the machine has
      (a killed outlier, or a lowered ``max_memory``) must not leave the task's jobs
      waiting for ever; capped there, a job starts when the machine is otherwise free.

    A declared request is never changed (one above capacity is the config's to fix).
    """
    learned = learned_memory(peaks, percentile, margin)
    if learned is None or (declared is not None and max(peaks) <= declared):
        if declared is None:
            return MemoryRequest(
                fallback,
                "default_memory",
                f"no memory declared and no measured run: default_memory {format_size(fallback)}",
            )
        detail = "no measured run yet" if not peaks else "no recent run used more"
        return MemoryRequest(declared, "declared", f"declared {format_size(declared)}; {detail}")
    why = [
        f"p{percentile:g} of the last {len(peaks)} run(s)' peaks x learn_margin {margin:g} "
        f"= {format_size(learned)}"
    ]
    if declared is not None:
        why[0] = f"a recent run used more than declared {format_size(declared)}; " + why[0]
    memory = learned
    if memory_limit is not None:
        if limit_in_kernel:
            cap = memory_limit
            because = f"memory_limit {format_size(memory_limit)}, which the kernel enforces"
        else:
            overshoot = max(0, max(peaks) - memory_limit)
            cap = memory_limit + overshoot
            because = (
                f"memory_limit {format_size(memory_limit)} + the measured overshoot "
                f"{format_size(overshoot)} (the limit is enforced by sampling: a job can "
                "grow past it before it is caught)"
            )
        if memory > cap:
            memory = cap
            why.append(f"capped at {because}")
    if usable is not None and memory > max(usable, declared or 0):
        memory = max(usable, declared or 0)
        why.append(
            f"capped at the capacity after reserve {format_size(usable)}: a run used more "
            "than fits, so its jobs start only when the machine is otherwise free"
        )
    if declared is not None and memory <= declared:
        why.append(f"never below the declared {format_size(declared)}")
        return MemoryRequest(declared, "declared", "; ".join(why))
    return MemoryRequest(memory, "learned", "; ".join(why))


def effective_memory(
    declared: int | None,
    peaks: Sequence[int],
    percentile: float,
    margin: float,
    fallback: int,
) -> int:
    """``memory_request``'s figure, uncapped (no limit, no capacity)."""
    return memory_request(declared, peaks, percentile, margin, fallback).memory


@dataclass(frozen=True)
class RunTime:
    """How long a task's job may run at most, as backfill reckons it, and why."""

    seconds: float | None  # None: not known (the job is never backfilled ahead of others)
    why: str


def run_time(
    walls: Sequence[float], percentile: float, margin: float, bound: float | None
) -> RunTime:
    """The ``percentile`` (nearest rank) of the recent run times ``walls`` times
    ``margin``, capped at ``bound`` (its timeout plus kill_grace: it cannot run longer);
    ``bound`` alone without history."""
    if bound is not None and not math.isfinite(bound):
        bound = None  # a timeout of infinity bounds nothing
    limit = f"timeout + kill_grace {_format_seconds(bound)}" if bound is not None else ""
    if not walls:
        if bound is None:
            return RunTime(None, "no measured run and no timeout")
        return RunTime(bound, f"no measured run: {limit}")
    ordered = sorted(walls)
    learned = ordered[max(1, math.ceil(percentile / 100 * len(ordered))) - 1] * margin
    why = (
        f"p{percentile:g} of the last {len(walls)} run(s)' wall times x learn_margin "
        f"{margin:g} = {_format_seconds(learned)}"
    )
    if bound is not None and bound < learned:
        return RunTime(bound, f"{why}; capped at {limit}")
    return RunTime(learned, why)


# -- The Scheduler service: applies plan() through the store and the runner ------------

QUEUE_HEAD_SIZE = 200
# Seconds over which the CPU load outside our jobs is averaged before it shrinks the CPU
# capacity admission uses.  Longer than a job's start-up burst, measured on the
# development machine (2 vCPU): a forked job starts in milliseconds of CPU, a spawned
# Python job in 0.05 s, and faulting memory in costs ~0.6 s of CPU per GiB (1 GiB: 0.6
# s CPU, 0.6-0.9 s wall; a 2 GiB job under contention took 7 s to show its full RSS).
# Over 20 s such a burst moves the average by a few hundredths of a CPU per GiB, while
# a program that keeps a CPU busy shows in full within the window.
OUTSIDE_CPU_WINDOW = 20.0
_OVERLOAD = frozenset({FLOOR, MEMORY_PSI, CPU_PSI})
VIEW_HEAD_SIZE = 10
RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
# PSI "some avg10" (percent) at or above which the machine counts as under pressure.
PRESSURE_THRESHOLD = 10.0


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


@dataclass(frozen=True)
class AttemptEnd:
    """What the scheduler knows when an attempt's process has ended: the input of
    ``decide_ending``."""

    job: Job
    outcome: Outcome
    # "cancel" | "timeout" | "shutdown" | "fenced" | "pressure" | "memory_limit"
    stop_reason: str | None
    stop_note: str | None
    timeout: float | None
    oom_killed: bool  # the kernel killed it at its cgroup's memory limit
    memory_limit: int | None
    peak_rss: int
    cpu_seconds: float
    artifacts: tuple[Artifact, ...]
    retry_on_timeout: bool
    retry_base: float
    retry_cap: float
    max_pressure_requeues: int
    jitter: float  # in [0, 1): spreads the retries of jobs that failed together
    now: datetime


def decide_ending(end: AttemptEnd) -> tuple[Finish | Requeue, str | None]:
    """How an attempt's end is stored, and the reason its transition is logged with:
    a terminal state, or back to the queue (a retry, a shutdown, memory pressure).  Pure:
    the caller applies it in one store call."""
    job, outcome = end.job, end.outcome
    error = outcome.error
    if end.stop_reason == "timeout" and end.timeout is not None:
        error = JobError("Timeout", f"timed out after {end.timeout:g} s")
    if end.oom_killed and end.memory_limit is not None:
        error = JobError(
            "OOMKilled",
            f"the kernel killed it at its memory limit "
            f"{format_size(end.memory_limit)} (cgroup peak {format_size(end.peak_rss)})",
        )
    if end.stop_reason == "memory_limit" and end.stop_note is not None:
        error = JobError("MemoryLimitExceeded", end.stop_note)

    def finish(state: JobState, **fields: Any) -> Finish:
        return Finish(
            state,
            exit_code=outcome.exit_code,
            peak_rss=end.peak_rss or None,
            cpu_seconds=end.cpu_seconds or None,
            artifacts=end.artifacts,
            **fields,
        )

    requeues = job.pressure_requeues
    if error is None:
        return finish(JobState.SUCCEEDED, result=outcome.result), None
    if end.stop_reason == "shutdown":
        reason = "requeued: the server shut down while it ran"
        return Requeue(reason, exit_code=outcome.exit_code), reason
    if end.stop_reason == "fenced":
        # Counted as a rescue would be: a node that keeps losing its database must not
        # requeue a job forever.  Refused by the fence if the leader rescued it first.
        reason = f"requeued: its node fenced itself ({end.stop_note})"
        return Requeue(reason, counts=RESCUE, exit_code=outcome.exit_code), reason
    if end.stop_reason == "cancel":
        reason = "cancelled by request while running"
        return finish(JobState.CANCELLED, reason=reason), reason
    if end.stop_reason == "pressure" and requeues < end.max_pressure_requeues:
        reason = (
            f"requeued: {end.stop_note}; pressure requeue {requeues + 1} of "
            f"{end.max_pressure_requeues}, not counted against max_retries"
        )
        return Requeue(reason, counts=PRESSURE), reason
    if end.stop_reason == "pressure":
        reason = (
            f"{end.stop_note}; already requeued {requeues} times "
            f"(max_pressure_requeues = {end.max_pressure_requeues})"
        )
        return finish(
            JobState.FAILED, error=JobError("MemoryPressure", reason), reason=reason
        ), reason
    if end.oom_killed or end.stop_reason == "memory_limit":
        # Over its own limit again and again: retrying would end the same way.
        stored = "oom_killed" if end.oom_killed else end.stop_note
        logged = f"{stored}: {error.message}" if end.oom_killed else stored
        return finish(JobState.FAILED, error=error, reason=stored), logged
    retry_allowed = end.stop_reason != "timeout" or end.retry_on_timeout
    if job.failures < job.max_retries and retry_allowed:
        delay = retry_delay(job.failures + 1, end.jitter, end.retry_base, end.retry_cap)
        reason = (
            f"attempt {job.attempts} failed ({error.message}); "
            f"retry {job.failures + 1} of {job.max_retries} after {delay:.1f} s"
        )
        requeue = Requeue(
            reason,
            counts=FAILURE,
            run_after=end.now + timedelta(seconds=delay),
            error=error,
            exit_code=outcome.exit_code,
        )
        return requeue, reason
    return finish(JobState.FAILED, error=error, reason=error.type), error.message


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
    # "cancel" | "timeout" | "shutdown" | "fenced" | "pressure" | "memory_limit"
    stop_reason: str | None = None
    kill_at: float | None = None  # monotonic deadline for SIGKILL after SIGTERM
    escalated: bool = False  # SIGKILL sent after SIGTERM (and logged)
    progress_stored: int = 0  # the handle's progress_seq last written to the store
    progress_stored_at: float = float("-inf")  # monotonic
    memory_limit: int | None = None
    cgroup: JobCgroup | None = None  # the kernel enforces memory_limit; None: sampling
    paused: bool = False  # SIGSTOPped under pressure (pressure_action = "pause")
    stop_note: str | None = None  # why the scheduler stopped it, for the job's reason
    gpu_devices: tuple[int, ...] = ()
    expected: float | None = None  # seconds it may run at most, as backfill reckons it

    def as_running_job(self) -> RunningJob:
        """What plan() and the pressure rule see of this attempt."""
        return RunningJob(
            self.job.id,
            self.job.task,
            self.request,
            self.memory_used,
            self.cpus_used,
            priority=self.job.priority,
            started=self.started,
            gpu_devices=self.gpu_devices,
            remaining=(
                None
                if self.expected is None
                else max(0.0, self.expected - (time.monotonic() - self.started))
            ),
        )


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
        cgroups: JobCgroups | None = None,
        gpu_probe: GpuProbe | None = None,
        events: Events | None = None,
        may_claim: Callable[[], bool] | None = None,
    ) -> None:
        self._store = store
        # Several nodes: false while this node cannot heartbeat (it claims nothing).
        self._may_claim = may_claim
        self._runner = runner
        self._probe = probe
        self._registry = registry
        self._settings = settings
        self._jobs_dir = jobs_dir
        self._clock = clock
        self._cgroups = cgroups
        # Whether the caller looked for writable cgroups (it does not while they are off).
        self._cgroups_looked_for = cgroups is not None or settings.job_cgroups
        self._gpu_probe = gpu_probe
        self._gpus: tuple[Gpu, ...] | None = None  # the last reading, when some job wanted one
        self._limits = self._make_limits()
        self._running: dict[str, _Attempt] = {}
        self._waiting: dict[str, str] = {}
        self._head: list[str] = []
        self._last_plan: Plan | None = None
        self._last_snapshot: Snapshot | None = None
        self._plan_state = PlanState()
        self._runs: dict[str, list[TaskRun]] | None = None  # task -> recent runs, newest first
        self._pressure_ticks = 0  # consecutive ticks under memory pressure
        self._pressure_reading: Snapshot | None = None  # the previous one of those ticks
        self._leftover_cgroups: list[JobCgroup] = []
        self._outside = OutsideCpu(OUTSIDE_CPU_WINDOW)
        self._wakeup = asyncio.Event()
        # Claimed jobs whose process is being started (the runner awaits the fork server).
        self._starting = 0
        self._none_starting = asyncio.Event()
        self._none_starting.set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._admitting = True
        self._tick_lock = asyncio.Lock()
        self._jobs_settings = jobs_settings or JobsSettings()
        self._hurry = False
        self._events = events or Events()
        self._under_pressure: set[str] = set()
        # Cancel requests are read from the store on a cancel_requested() hint, else at
        # most twice per poll_interval (an admin may set the flag with sqlite3), not on
        # every tick: under load there is a tick per finishing job (issue 6).
        self._cancels_read_at = float("-inf")
        self._cancel_hint = False
        self._history = MachineHistory()

    def _make_limits(self) -> Limits:
        s = self._settings
        return Limits(
            max_jobs=s.max_jobs,
            max_cpus=s.max_cpus,
            max_memory=s.max_memory,
            reserve_cpus=s.reserve_cpus,
            reserve_memory=s.reserve_memory,
            memory_floor=s.memory_floor,
            memory_pressure_limit=s.memory_pressure_limit,
            cpu_pressure_limit=s.cpu_pressure_limit,
            hysteresis=s.hysteresis,
            starvation_after=s.starvation_after,
            tasks={
                task.name: TaskLimits(task.settings.max_concurrency, task.settings.exclusive)
                for task in self._registry
            },
        )

    def admission_problems(self, settings: SchedulerSettings) -> list[tuple[str, str]]:
        """``admission_problems`` of ``settings`` on this machine, as it is now."""
        return admission_problems(settings, self._probe.snapshot())

    def reconfigure(self, settings: SchedulerSettings) -> None:
        """Use new settings (and the registry's current task settings) from the next tick."""
        if settings.learn_window != self._settings.learn_window:
            self._runs = None  # reread with the new window
        if settings.job_cgroups and not self._cgroups_looked_for:
            # Turned on since the start (which did not look for them while off).
            self._cgroups, self._cgroups_looked_for = JobCgroups.detect(), True
        self._settings = settings
        self._limits = self._make_limits()
        self.wake()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is None:
            self._warn_without_gpus()
            self._stopping = False
            self._admitting = True
            self._loop_task = asyncio.create_task(self._loop(), name="jobserver-scheduler")

    async def stop(self) -> None:
        """Stop admitting, then terminate every running job's tree and put the job back in
        the queue (the interrupted attempt counts toward neither retries nor rescues)."""
        self._admitting = False
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
                if attempt.watcher in pending:
                    self._escalate(attempt)
                else:  # ended: anything it left in its group goes too
                    attempt.handle.signal_tree(signal.SIGKILL)
            if pending:
                await asyncio.wait(pending)
        self._remove_leftover_cgroups()

    async def drain(self, grace: float) -> None:
        """Graceful shutdown, first half: stop admitting, then wait up to ``grace`` seconds
        for the running jobs to finish by themselves (their outcomes are recorded as
        usual).  ``hurry()`` (a second signal) ends the wait early; ``stop()`` then
        terminates and requeues whatever still runs.  Ticks go on meanwhile: cancels,
        timeouts and usage sampling still apply to the jobs being waited for."""
        self._admitting = False
        deadline = time.monotonic() + grace
        if self._running:
            log.info(
                "shutting down: waiting up to %.0f s for %d running job(s)",
                grace,
                len(self._running),
            )
        # Polled, not awaited on an event: hurry() is called from a signal handler.
        while self._running and not self._hurry and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def stop_admitting(self) -> None:
        """Start no more jobs (the first shutdown signal; safe from a signal handler)."""
        self._admitting = False

    def hurry(self) -> None:
        self._hurry = True

    def fence(self, note: str) -> None:
        """Kill every running job's tree at once: this node may be declared dead and its
        jobs started elsewhere (self-fencing).  Their ends are written as requeues,
        which the store refuses if the leader rescued them first."""
        for attempt in list(self._running.values()):
            attempt.stop_note = note
            self._kill(attempt, "fenced")

    def wake(self) -> None:
        self._wakeup.set()

    def cancel_requested(self) -> None:
        """A client asked to cancel a running job: look at the cancel flags on the next tick."""
        self._cancel_hint = True
        self.wake()

    def changed_elsewhere(self, job_id: str) -> None:
        """Another node changed the job (``"*"``: perhaps any job).  If it runs here, that
        can only be a cancel request: read the flags on the next tick."""
        if job_id == "*" or job_id in self._running or self._starting:
            self.cancel_requested()

    async def starts_settled(self, timeout: float = 1.0) -> None:
        """Return once no claimed job's process is still being started (or after
        ``timeout``): every job the store shows as running is then in ``view()``, unless
        its start failed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._none_starting.wait()

    def owned_attempts(self) -> frozenset[str] | None:
        """The ids of the jobs whose attempt this server watches (their outcome being
        written included), or None while a claimed job's start is in flight."""
        return None if self._starting else frozenset(self._running)

    @contextlib.contextmanager
    def _start_in_flight(self) -> Iterator[None]:
        self._starting += 1
        self._none_starting.clear()
        try:
            yield
        finally:
            self._starting -= 1
            if not self._starting:
                self._none_starting.set()

    async def _loop(self) -> None:
        # Not `while True`: on Python 3.11 asyncio.wait_for swallows a cancel that arrives
        # as the wake-up event fires (CPython gh-86296), and stop() would wait forever.
        while not self._stopping:
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
            self._remove_leftover_cgroups()
            if self._admitting and (self._may_claim is None or self._may_claim()):
                snapshot = self._outside_cpu(self._probe.snapshot(), monotonic)
                await self._admit(now, monotonic, snapshot)
                self._relieve_pressure(snapshot)

    def _outside_cpu(self, snapshot: Snapshot, monotonic: float) -> Snapshot:
        """``snapshot`` with ``cpu_outside``: the CPUs busy with anything but our jobs,
        averaged over ``OUTSIDE_CPU_WINDOW`` (what plan() subtracts from capacity)."""
        ours = sum(attempt.cpus_used for attempt in self._running.values())
        busy = snapshot.cpu_capacity - snapshot.cpu_idle
        outside = self._outside.update(monotonic, busy, ours)
        sources = {
            **snapshot.sources,
            "cpu_outside": f"average over {self._outside.window:g} s of busy CPUs less our jobs'",
        }
        return dataclasses.replace(snapshot, cpu_outside=outside, sources=sources)

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
        """Cancel requests, timeouts, sampled memory limits, and SIGKILL for trees that
        ignored SIGTERM."""
        if not self._running:
            return
        if (
            self._cancel_hint
            or monotonic - self._cancels_read_at >= self._settings.poll_interval / 2
        ):
            self._cancel_hint, self._cancels_read_at = False, monotonic
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
            if (
                attempt.stop_reason is None
                and attempt.memory_limit is not None
                and attempt.cgroup is None
                and attempt.peak_rss > attempt.memory_limit
            ):
                # No cgroup: the sampled tree RSS is the limit's only guard.  Kill at
                # once: a job over its memory limit must not get a grace period to grow.
                attempt.stop_note = (
                    f"exceeded memory limit {format_size(attempt.memory_limit)} "
                    f"(peak {format_size(attempt.peak_rss)})"
                )
                self._kill(attempt, "memory_limit")
            if attempt.kill_at is not None and monotonic >= attempt.kill_at:
                self._escalate(attempt)

    def _terminate(self, attempt: _Attempt, reason: str) -> None:
        attempt.stop_reason = reason
        attempt.kill_at = time.monotonic() + self._settings.kill_grace
        attempt.handle.signal_tree(signal.SIGTERM)
        if attempt.paused:  # a stopped process acts on SIGTERM only once continued
            attempt.handle.signal_tree(signal.SIGCONT)
            attempt.paused = False
        log.info("job %s: sent SIGTERM to its process group (%s)", attempt.job.id, reason)

    def _escalate(self, attempt: _Attempt) -> None:
        """SIGKILL for a tree still there ``kill_grace`` after its SIGTERM; sent on every
        tick until the attempt ends, logged once."""
        attempt.handle.signal_tree(signal.SIGKILL)
        if not attempt.escalated:
            attempt.escalated = True
            log.warning(
                "job %s (%s): still running %g s after SIGTERM (%s); sent SIGKILL to its "
                "process group",
                attempt.job.id,
                attempt.job.task,
                self._settings.kill_grace,
                attempt.stop_reason,
            )

    def _kill(self, attempt: _Attempt, reason: str) -> None:
        attempt.stop_reason = reason
        attempt.handle.signal_tree(signal.SIGKILL)
        log.warning(
            "job %s (%s): killed its process group: %s",
            attempt.job.id,
            attempt.job.task,
            attempt.stop_note or reason,
        )

    async def _admit(self, now: datetime, monotonic: float, snapshot: Snapshot) -> None:
        await self._load_runs()
        # What planning reads, taken on the event loop: choose() runs in the database's
        # thread, inside the claim's transaction, while watchers change _running.
        running = self._running_jobs()
        requests = {task.name: self._request(task, snapshot) for task in self._registry}
        durations = {
            task.name: self._run_time(task, task.settings.timeout).seconds
            for task in self._registry
        }
        limits, state = self._limits, self._plan_state
        limited = {name for name, rules in limits.tasks.items() if rules.max_concurrency}
        chosen: list[tuple[Plan, list[QueuedJob], list[QueueEntry]]] = []

        def choose(head: list[QueueEntry], everywhere: Mapping[str, int]) -> Sequence[str]:
            queued = [
                QueuedJob(
                    job.id,
                    job.task,
                    job.priority,
                    requests[job.task],
                    max(0.0, (now - job.ready_since).total_seconds()),
                    durations[job.task],
                )
                for job in head
                if job.task in requests
            ]
            if self._gpu_probe is not None and any(job.request.gpu_count for job in queued):
                self._gpus = self._gpu_probe.gpus()
            gpus = self._gpus if self._gpu_probe is not None else None
            decision = plan(
                queued,
                running,
                snapshot,
                dataclasses.replace(limits, running_everywhere=everywhere),
                state,
                gpus,
            )
            chosen[:] = [(decision, queued, [job for job in head if job.task not in requests])]
            return decision.admit

        # From the claim until the attempts are in _running, view() waits for them.
        with self._start_in_flight():
            claimed = await self._store.claim_head(now, QUEUE_HEAD_SIZE, choose, limited=limited)
            ((decision, queued, unknown),) = chosen
            before = self._last_plan.state.held & _OVERLOAD if self._last_plan else frozenset()
            if decision.state.held & _OVERLOAD != before:
                if decision.overload:
                    log.warning("admission stopped: %s", decision.overload)
                else:
                    log.info("admission resumed: the overload signals cleared")
            self._record_pressure(snapshot)
            self._record_holds(decision.waiting)
            self._last_snapshot, self._last_plan = snapshot, decision
            self._plan_state = decision.state
            self._waiting = dict(decision.waiting)
            self._head = [job.id for job in queued]
            for entry in unknown:
                self._waiting[entry.id] = (
                    f"task {entry.task!r} is not configured on this node: "
                    "it waits for a node that knows it"
                )
            # Together, so that their recorded pids share transactions.
            launches = [
                self._launch(change.job, now, monotonic, decision.devices.get(change.job.id, ()))
                for change in claimed
            ]
            for change, failure in zip(
                claimed, await asyncio.gather(*launches, return_exceptions=True), strict=True
            ):
                if isinstance(failure, Exception):
                    log.error("job %s: could not be launched", change.job.id, exc_info=failure)
            if self._history.due(now, decision.overload):
                self._history.record(self._machine_sample(now, decision))
        for entry in unknown:
            if await self._skips_unknown(entry.task):
                continue
            error = JobError("UnknownTask", f"task {entry.task!r} is no longer in the config")
            self._publish(await self._store.fail_unstarted(entry.id, error, now), error.message)

    async def _skips_unknown(self, task: str) -> bool:
        """Whether a queued job of ``task``, which this node's config does not name, is
        left queued (skipped) rather than failed.  One server (SQLite) fails it: nobody
        else will ever run it.  A node sharing PostgreSQL skips it: during a rolling
        upgrade another node may know the task.  (The seam for "while a live node knows
        it", once nodes record their tasks.)"""
        return self._store.shared

    def _publish(
        self, change: Changed | None, reason: str | None, duration: float | None = None
    ) -> None:
        """One event per transition a store call caused, its cascade included."""
        if change is None:
            return
        self._events.transition(change.job, change.source, reason=reason, duration=duration)
        for dependent in change.cascaded:
            self._events.transition(dependent, JobState.QUEUED, reason=dependent.reason)

    async def _launch(
        self, job: Job, now: datetime, monotonic: float, gpu_devices: tuple[int, ...] = ()
    ) -> None:
        queued_since = max(job.created_at, job.run_after or job.created_at)
        waited = (now - queued_since).total_seconds()
        self._events.recorder.admission(job.task)
        attempt = await self._start(job, waited, monotonic, gpu_devices)
        if attempt is None:
            return
        handle, group = attempt.handle, attempt.cgroup
        self._events.transition(
            job,
            JobState.QUEUED,
            reason=f"attempt {job.attempts}, pid {handle.pid}"
            + (f", in cgroup {group.path}" if group is not None else ""),
            duration=waited,
        )
        await self._store.record_process(
            job.id, job.attempts, handle.pid, process_start_time(handle.pid)
        )

    async def _start(
        self, job: Job, waited: float, monotonic: float, gpu_devices: tuple[int, ...]
    ) -> _Attempt | None:
        """Start the claimed job's process: the attempt (in _running), or None if it could
        not start (the job then failed)."""
        task = self._registry.get(job.task)
        limit = task.settings.memory_limit
        group = None
        if self._cgroups is not None and self._settings.job_cgroups:
            # Every job, limited or not: its cgroup's peak is the exact figure its task
            # learns from (sampling misses short jobs and counts shared pages twice).
            group = self._cgroups.create(job.id, limit)
        spec = LaunchSpec(
            job.id,
            job.attempts,
            task.settings.function,
            job.args,
            self.job_dir(job.id),
            command=None if task.settings.command is None else task.argv(job.args),
            log_limit=self._jobs_settings.max_log_size,
            python=task.settings.python,
            cgroup_procs=None if group is None else group.procs,
            environment=(
                {"CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in gpu_devices)}
                if gpu_devices
                else {}
            ),
        )
        try:
            handle = await self._runner.start(spec)
        except (OSError, ValueError) as exc:
            if group is not None:
                group.remove()
            self._events.transition(
                job, JobState.QUEUED, reason=f"attempt {job.attempts}", duration=waited
            )
            error = JobError("SpawnFailed", f"could not start: {exc}")
            failed = await self._store.end_attempt(
                job.id,
                job.attempts,
                Finish(JobState.FAILED, error=error, reason=error.type),
                self._clock(),
            )
            self._publish(failed, error.message)
            return None
        attempt = _Attempt(
            job,
            handle,
            self._request(task, self._last_snapshot),
            job.timeout if job.timeout is not None else task.settings.timeout,
            monotonic,
            memory_limit=limit,
            cgroup=group,
            gpu_devices=gpu_devices,
            expected=self._run_time(
                task, job.timeout if job.timeout is not None else task.settings.timeout
            ).seconds,
            # First sample after poll_interval / 2, like every later one: a job that ends
            # sooner is not worth a scan of every process (issue 6).
            sampled=monotonic,
        )
        self._running[job.id] = attempt
        self._waiting.pop(job.id, None)
        attempt.watcher = asyncio.create_task(self._watch(attempt), name=f"job-{job.id}")
        return attempt

    # -- memory pressure ---------------------------------------------------------

    def _relieve_pressure(self, snapshot: Snapshot) -> None:
        """Under memory pressure (below memory_floor, or PSI memory over its limit) plan()
        has stopped admitting.  If it persists and keeps getting worse, act on the
        youngest lowest-priority running job, one at a time, per ``pressure_action``."""
        decision = self._last_plan
        held = decision.state.held if decision is not None else frozenset()
        under = bool(held & {FLOOR, MEMORY_PSI})
        if not under:
            self._pressure_ticks, self._pressure_reading = 0, None
            self._resume_paused()
            return
        previous = self._pressure_reading
        self._pressure_ticks += 1
        self._pressure_reading = snapshot
        action = self._settings.pressure_action
        if action == "none" or previous is None:
            return
        worse = snapshot.memory_available < previous.memory_available or (
            snapshot.memory_pressure is not None
            and previous.memory_pressure is not None
            and snapshot.memory_pressure > previous.memory_pressure
        )
        if not worse:
            return
        if any(a.stop_reason == "pressure" for a in self._running.values()):
            return  # the last one we acted on has not exited yet: let its memory go first
        candidates = [
            a.as_running_job()
            for a in self._running.values()
            if a.stop_reason is None and not a.paused
        ]
        victim = pressure_victim(candidates)
        if victim is None:
            return
        attempt = self._running[victim.id]
        why = decision.overload if decision is not None else None
        # Measure afresh after acting: the next action needs two more readings, the
        # second worse than the first, so the freed memory has time to show.
        self._pressure_reading = None
        if action == "pause":
            attempt.paused = True
            attempt.handle.signal_tree(signal.SIGSTOP)
            log.warning(
                "job %s (%s): paused (SIGSTOP) under memory pressure: %s; with no swap this "
                "frees no memory, only CPU",
                attempt.job.id,
                attempt.job.task,
                why,
            )
            return
        attempt.stop_note = f"killed under memory pressure ({why})"
        self._kill(attempt, "pressure")

    def _resume_paused(self) -> None:
        for attempt in self._running.values():
            if attempt.paused:
                attempt.paused = False
                attempt.handle.signal_tree(signal.SIGCONT)
                log.info("job %s: resumed (SIGCONT): memory pressure is over", attempt.job.id)

    def _remove_leftover_cgroups(self) -> None:
        self._leftover_cgroups = [g for g in self._leftover_cgroups if not g.remove()]

    # -- learned requests --------------------------------------------------------

    async def _load_runs(self) -> None:
        if self._runs is not None:
            return
        window = self._settings.learn_window
        self._runs = {
            task.name: await self._store.recent_runs(task.name, window) for task in self._registry
        }

    def _run_time(
        self, task: Task, timeout: float | None, runs: Sequence[TaskRun] | None = None
    ) -> RunTime:
        """How long a job of ``task`` may run, from the task's recent runs (``runs``, else
        those in memory) that ended by themselves (killed ones ended early) and
        ``timeout``."""
        s = self._settings
        if runs is None:
            runs = (self._runs or {}).get(task.name, [])
        walls = [
            run.wall_seconds
            for run in runs
            if run.outcome in (JobState.SUCCEEDED.value, JobState.FAILED.value)
        ]
        bound = None if timeout is None else timeout + s.kill_grace
        return run_time(walls, s.learn_percentile, s.learn_margin, bound)

    def _request(self, task: Task, snapshot: Snapshot | None) -> Request:
        peaks = [run.peak_rss for run in (self._runs or {}).get(task.name, [])]
        return Request(
            cpus=task.settings.cpus,
            memory=self._memory_request(task, peaks, snapshot).memory,
            gpus=task.settings.gpus,
            gpu_memory=task.settings.gpu_memory or 0,
        )

    def _memory_request(
        self, task: Task, peaks: Sequence[int], snapshot: Snapshot | None
    ) -> MemoryRequest:
        s, limits = self._settings, self._limits
        usable = None
        if snapshot is not None:
            capacity = snapshot.memory_capacity
            if limits.max_memory is not None:
                capacity = min(capacity, limits.max_memory)
            usable = capacity - limits.reserve_memory
        return memory_request(
            task.settings.memory,
            peaks,
            s.learn_percentile,
            s.learn_margin,
            s.default_memory,
            memory_limit=task.settings.memory_limit,
            limit_in_kernel=self._cgroups is not None and s.job_cgroups,
            usable=usable,
        )

    async def task_figures(self) -> dict[str, dict[str, Any]]:
        """Per task: declared requests and limits beside what its recent runs used, and
        the request admission uses, with why."""
        s = self._settings
        snapshot = self._last_snapshot or self._probe.snapshot()
        figures: dict[str, dict[str, Any]] = {}
        for task in self._registry:
            runs = await self._store.recent_runs(task.name, s.learn_window)
            peaks = [run.peak_rss for run in runs]
            used = self._memory_request(task, peaks, snapshot)
            figures[task.name] = {
                "declared": {
                    "cpus": task.settings.cpus,
                    "memory": task.settings.memory,
                    "memory_limit": task.settings.memory_limit,
                    "max_concurrency": task.settings.max_concurrency,
                    "exclusive": task.settings.exclusive,
                },
                "learned": {
                    "runs": len(runs),
                    "memory": learned_memory(peaks, s.learn_percentile, s.learn_margin),
                    "peak_rss_max": max(peaks) if peaks else None,
                    "peak_rss_percentile": _percentile(peaks, s.learn_percentile),
                    "cpu_seconds_median": _median([run.cpu_seconds for run in runs]),
                    "wall_seconds_median": _median([run.wall_seconds for run in runs]),
                },
                "run_time": dataclasses.asdict(self._run_time(task, task.settings.timeout, runs)),
                "scheduled_with": {
                    "cpus": task.settings.cpus,
                    "memory": used.memory,
                    "source": used.source,
                    "why": used.why,
                },
            }
        return figures

    async def _watch(self, attempt: _Attempt) -> None:
        outcome = await attempt.handle.wait()
        try:
            await self._record(attempt, outcome)
        except Exception:
            log.exception("job %s: could not record its outcome", attempt.job.id)
        finally:
            self._running.pop(attempt.job.id, None)
            if attempt.cgroup is not None and not attempt.cgroup.remove():
                self._leftover_cgroups.append(attempt.cgroup)
            self.wake()

    async def _record(self, attempt: _Attempt, outcome: Outcome) -> None:
        """Store how the attempt ended: ``decide_ending`` chooses, one store call writes
        it (with what the attempt used), and every transition it caused is published."""
        await self._store_progress(time.monotonic(), attempt)
        workdir = self.job_dir(attempt.job.id)
        # Most jobs leave no artifacts: hashing them needs a thread, looking does not.
        artifacts = (
            await asyncio.to_thread(list_artifacts, workdir) if has_artifacts(workdir) else ()
        )
        job, now = attempt.job, self._clock()
        duration = time.monotonic() - attempt.started
        task = self._registry.get(job.task) if job.task in self._registry else None
        oom_killed = (
            outcome.error is not None
            and attempt.cgroup is not None
            and attempt.memory_limit is not None
            and outcome.signal == signal.SIGKILL
            and attempt.cgroup.oom_kills() > 0
        )
        peak_rss, cpu_seconds = measured_use(
            attempt.peak_rss,
            attempt.cpu_seconds,
            attempt.handle.usage,
            None if attempt.cgroup is None else attempt.cgroup.peak(),
        )
        jobs_settings = self._jobs_settings
        ending = AttemptEnd(
            job=job,
            outcome=outcome,
            stop_reason=attempt.stop_reason,
            stop_note=attempt.stop_note,
            timeout=attempt.timeout,
            oom_killed=oom_killed,
            memory_limit=attempt.memory_limit,
            peak_rss=peak_rss,
            cpu_seconds=cpu_seconds,
            artifacts=artifacts,
            retry_on_timeout=task is not None and task.settings.retry_on_timeout,
            retry_base=(task and task.settings.retry_base) or jobs_settings.retry_base,
            retry_cap=(task and task.settings.retry_cap) or jobs_settings.retry_cap,
            max_pressure_requeues=self._settings.max_pressure_requeues,
            jitter=random.random(),
            now=now,
        )
        end, reason = decide_ending(ending)
        run = None
        if peak_rss > 0 and attempt.stop_reason != "shutdown":
            # Written in the transaction that ends the attempt: no write of its own.
            run = TaskRun(
                task=job.task,
                job_id=job.id,
                attempt=job.attempts,
                outcome="requeued" if isinstance(end, Requeue) else end.state.value,
                peak_rss=peak_rss,
                cpu_seconds=cpu_seconds,
                wall_seconds=duration,
                finished_at=now,
            )
        change = await self._end_attempt(KeptOutcome(job.attempts, end, now, run, reason), job)
        if (
            change is not None
            and change.job.state is JobState.CANCELLED
            and isinstance(end, Requeue)
        ):
            reason = change.job.reason  # an acknowledged cancel wins over the requeue
        self._publish(change, reason, duration)
        if change is not None and run is not None and self._runs is not None:
            runs = self._runs.setdefault(job.task, [])
            runs.insert(0, run)
            del runs[self._settings.learn_window :]

    async def _end_attempt(self, kept: KeptOutcome, job: Job) -> Changed | None:
        """Write the attempt's end; while the store cannot take it, keep it in the job's
        directory and retry with backoff (a stop gives up: the restart applies the file)."""
        write = functools.partial(
            self._store.end_attempt, job.id, kept.attempt, kept.end, kept.now, kept.run
        )
        try:
            return await write()
        except StorageUnavailable as exc:
            log.error(
                "job %s: could not store how attempt %d ended (%s); keeping it in %s and "
                "retrying until the store can be written",
                job.id,
                kept.attempt,
                exc,
                self.job_dir(job.id) / OUTCOME_FILE,
            )
        try:
            await asyncio.to_thread(keep_outcome, self.job_dir(job.id), kept)
        except OSError as exc:  # the same full disk, often: the retries still hold it
            log.error("job %s: could not keep its outcome in a file either: %s", job.id, exc)
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            try:
                change = await write()
            except StorageUnavailable:
                if self._stopping:
                    log.error(
                        "job %s: stopping with its outcome unwritten; the next start "
                        "applies it from its directory",
                        job.id,
                    )
                    raise
                continue
            await asyncio.to_thread(forget_outcome, self.job_dir(job.id))
            log.info("job %s: its outcome is stored now", job.id)
            return change

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
            if await self._store.set_progress(
                attempt.job.id, attempt.job.attempts, fraction, message, self._clock()
            ):
                self._events.changed(attempt.job.id)

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
            because = f": {job.reason}" if job.reason else ""
            return f"scheduled for {format_timestamp(job.run_after)}{because}"
        if job.waiting_on:
            return ", ".join(f"waiting for {dep} ({state})" for dep, state in job.waiting_on)
        reason = self._waiting.get(job.id)
        if reason is not None:
            return reason
        if not self._admitting:
            return "the server is shutting down"
        # Not in a head that had room: it was submitted after the last tick read the queue.
        if job.id in self._head or self._last_plan is None or len(self._head) < QUEUE_HEAD_SIZE:
            return "waiting for the scheduler's next tick"
        return f"in the queue behind the first {QUEUE_HEAD_SIZE} jobs"

    def view(self) -> SystemView:
        """The scheduler's view for ``GET /api/v1/system``."""
        snapshot, decision = self._last_snapshot, self._last_plan
        if snapshot is None or decision is None:
            snapshot = self._probe.snapshot()
            decision = plan([], self._running_jobs(), snapshot, self._limits, self._plan_state)
        s, limits = self._settings, self._limits
        sources = snapshot.sources
        # Capacity under the current caps (a runtime change shows before the next tick).
        cap_cpus = snapshot.cpu_capacity
        if limits.max_cpus is not None:
            cap_cpus = min(cap_cpus, limits.max_cpus)
        cap_memory = snapshot.memory_capacity
        if limits.max_memory is not None:
            cap_memory = min(cap_memory, limits.max_memory)

        def capped(value: float, machine: float, cap: float | None, source: str) -> Reading:
            if cap is not None and cap < machine:
                return Reading(value, "config cap")
            return Reading(value, sources.get(source, "unknown"))

        return SystemView(
            capacity=Headroom(cap_cpus, cap_memory),
            reserved=Headroom(limits.reserve_cpus, limits.reserve_memory),
            free=decision.headroom,
            machine=snapshot,
            signals=Readings(
                cpu_capacity=capped(
                    cap_cpus, snapshot.cpu_capacity, limits.max_cpus, "cpu_capacity"
                ),
                memory_capacity=capped(
                    cap_memory, snapshot.memory_capacity, limits.max_memory, "memory_capacity"
                ),
                cpu_idle=Reading(snapshot.cpu_idle, sources.get("cpu_idle")),
                cpu_outside=Reading(snapshot.cpu_outside, sources.get("cpu_outside")),
                memory_available=Reading(
                    snapshot.memory_available, sources.get("memory_available")
                ),
                memory_pressure=PressureReading(
                    snapshot.memory_pressure,
                    sources.get("memory_pressure"),
                    s.memory_pressure_limit,
                ),
                cpu_pressure=PressureReading(
                    snapshot.cpu_pressure, sources.get("cpu_pressure"), s.cpu_pressure_limit
                ),
                reserve_cpus=Reading(s.reserve_cpus, "config"),
                reserve_memory=Reading(s.reserve_memory, "config"),
                memory_floor=Reading(s.memory_floor, "config"),
            ),
            overload=decision.overload,
            held=tuple(sorted(decision.state.held)),
            settings=PolicyView(
                starvation_after=s.starvation_after,
                hysteresis=s.hysteresis,
                pressure_action=s.pressure_action,
                max_pressure_requeues=s.max_pressure_requeues,
                learn_percentile=s.learn_percentile,
                learn_margin=s.learn_margin,
                learn_window=s.learn_window,
                default_memory=s.default_memory,
            ),
            memory_limits=self._memory_limits(),
            gpus=self._gpus,
            max_jobs=limits.max_jobs,
            fork_server=self._runner.fork_server_state(),
            running=tuple(
                RunningView(
                    id=a.job.id,
                    task=a.job.task,
                    pid=a.handle.pid,
                    memory_used=a.memory_used,
                    peak_rss=a.peak_rss,
                    cpus_used=round(a.cpus_used, 3),
                    request=Headroom(a.request.cpus, a.request.memory),
                    memory_limit=a.memory_limit,
                    cgroup=None if a.cgroup is None else str(a.cgroup.path),
                    paused=a.paused,
                    gpu_devices=a.gpu_devices,
                )
                for a in self._running.values()
            ),
            queue_head=tuple(
                QueuedView(job_id, self._waiting.get(job_id))
                for job_id in self._head[:VIEW_HEAD_SIZE]
            ),
        )

    def _memory_limits(self) -> str:
        """How jobs are measured and memory limits enforced, for the system view."""
        if not self._settings.job_cgroups:
            return "sampling (per-job cgroups turned off in config: job_cgroups = false)"
        if self._cgroups is None:
            return "sampling (per-job cgroups are not writable here)"
        return self._cgroups.describe()

    def history(self) -> tuple[MachineSample, ...]:
        """The machine over the last ``HISTORY_WINDOW``, oldest first."""
        return self._history.samples(self._clock())

    def _machine_sample(self, now: datetime, decision: Plan) -> MachineSample:
        """The machine as the tick that made ``decision`` left it (its admitted jobs
        included: they claim their requests from their start)."""
        attempts = list(self._running.values())
        reserved = Headroom(self._limits.reserve_cpus, self._limits.reserve_memory)
        return MachineSample(
            at=now,
            cpu=Usage(
                capacity=decision.capacity.cpus,
                used=round(sum(a.cpus_used for a in attempts), 3),
                claimed=sum(a.request.cpus for a in attempts),
                reserved=reserved.cpus,
                free=decision.headroom.cpus,
            ),
            memory=Usage(
                capacity=decision.capacity.memory,
                used=sum(a.memory_used for a in attempts),
                claimed=sum(a.request.memory for a in attempts),
                reserved=reserved.memory,
                free=decision.headroom.memory,
            ),
            running=len(attempts),
            overload=decision.overload,
        )

    def _running_jobs(self) -> list[RunningJob]:
        return [a.as_running_job() for a in self._running.values()]

    def _no_gpus(self) -> str | None:
        """Why this server sees no GPUs at all (NVML absent or failing), or None."""
        if self._gpu_probe is None:
            return "GPU support is not set up"
        if self._gpu_probe.gpus() is not None:
            return None
        return getattr(self._gpu_probe, "problem", None) or "NVML does not answer"

    def _warn_without_gpus(self) -> None:
        """At start: tasks that ask for GPUs on a server that cannot see any are refused
        at submit (or wait, with ``gpu_may_appear``); say so before a client finds out."""
        names = [t.name for t in self._registry if t.settings.gpus or t.settings.gpu_memory]
        why = self._no_gpus() if names else None
        if why is None:
            return
        then = (
            "their jobs wait until a GPU appears (gpu_may_appear)"
            if self._settings.gpu_may_appear
            else "their submits are refused"
        )
        log.warning(
            "task(s) %s ask for GPUs but this server cannot see any (%s): %s; install an "
            "NVIDIA driver and jobserver[gpu]",
            ", ".join(names),
            why,
            then,
        )

    def gpu_problem(self, task: Task) -> str | None:
        """Why a job of ``task`` cannot be accepted now (it needs GPUs and there is no
        NVML, and the config does not say one may appear), or None."""
        if not (task.settings.gpus or task.settings.gpu_memory):
            return None
        if self._settings.gpu_may_appear:
            return None
        why = self._no_gpus()
        if why is None:
            return None
        return (
            f"task {task.name!r} needs GPUs but this server cannot see any ({why}); install "
            "an NVIDIA driver and jobserver[gpu], or set scheduler.gpu_may_appear = true to "
            "let such jobs wait"
        )


def _percentile(values: Sequence[int], percentile: float) -> int | None:
    return learned_memory(values, percentile, 1.0)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


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


# -- the system view ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """One reading admission uses, with where its value came from."""

    value: float | None
    source: str | None


@dataclass(frozen=True)
class PressureReading(Reading):
    limit: float | None  # the configured PSI limit; None: not watched


@dataclass(frozen=True)
class Readings:
    cpu_capacity: Reading
    memory_capacity: Reading
    cpu_idle: Reading
    cpu_outside: Reading  # busy outside our jobs, windowed: what CPU admission subtracts
    memory_available: Reading
    memory_pressure: PressureReading
    cpu_pressure: PressureReading
    reserve_cpus: Reading
    reserve_memory: Reading
    memory_floor: Reading


@dataclass(frozen=True)
class PolicyView:
    """The settings that shape admission and pressure handling."""

    starvation_after: float | None
    hysteresis: float
    pressure_action: str
    max_pressure_requeues: int
    learn_percentile: float
    learn_margin: float
    learn_window: int
    default_memory: int


@dataclass(frozen=True)
class RunningView:
    id: str
    task: str
    pid: int
    memory_used: int
    peak_rss: int
    cpus_used: float
    request: Headroom
    memory_limit: int | None
    cgroup: str | None  # its cgroup's directory; None: memory is sampled
    paused: bool
    gpu_devices: tuple[int, ...]


@dataclass(frozen=True)
class QueuedView:
    id: str
    waiting_reason: str | None


@dataclass(frozen=True)
class SystemView:
    """What ``Scheduler.view()`` shows at one moment: capacity under the caps, what is
    reserved and free, the machine, every reading admission uses, the jobs it runs and
    the head of the queue."""

    capacity: Headroom
    reserved: Headroom
    free: Headroom  # after the running jobs' claims and the reserve; may be negative
    machine: Snapshot
    signals: Readings
    overload: str | None  # why nothing is admitted (memory floor, PSI), if so
    held: tuple[str, ...]
    settings: PolicyView
    memory_limits: str  # how memory limits are enforced
    gpus: tuple[Gpu, ...] | None  # the last reading; None: no job has wanted one
    max_jobs: int
    fork_server: Mapping[str, Any] | None  # the runner's; None: jobs are always spawned
    running: tuple[RunningView, ...]
    queue_head: tuple[QueuedView, ...]


# -- the machine over time ---------------------------------------------------------------

HISTORY_INTERVAL = 10.0  # seconds between two kept samples of the machine
HISTORY_WINDOW = 3600.0  # seconds of samples kept
# One sample per interval over the window, and room for those taken when admission stops
# or resumes between two of them.
HISTORY_SIZE = 2 * int(HISTORY_WINDOW / HISTORY_INTERVAL)


@dataclass(frozen=True)
class Usage:
    """One resource at one moment, in CPUs or bytes: the capacity jobs may use, what the
    running jobs use (measured) and claim (their requests, what admission counts), the
    configured reserve, and what is free for a new job (may be negative)."""

    capacity: float
    used: float
    claimed: float
    reserved: float
    free: float


@dataclass(frozen=True)
class MachineSample:
    at: datetime
    cpu: Usage
    memory: Usage
    running: int  # jobs this server ran
    overload: str | None  # why admission was stopped (memory floor, PSI), if it was


class MachineHistory:
    """The machine's recent samples, bounded in time and count: the first tick of every
    ``interval`` is kept, and so is every tick where admission stops or resumes, so that
    the page can mark the moment.  Held in memory: a restart starts a new history."""

    def __init__(
        self,
        interval: float = HISTORY_INTERVAL,
        window: float = HISTORY_WINDOW,
        size: int = HISTORY_SIZE,
    ) -> None:
        self.interval = interval
        self.window = window
        self._samples: deque[MachineSample] = deque(maxlen=size)

    def due(self, now: datetime, overload: str | None) -> bool:
        """Whether a sample taken ``now`` is kept (asked first: most ticks keep none)."""
        if not self._samples:
            return True
        last = self._samples[-1]
        elapsed = (now - last.at).total_seconds()
        # A clock set back is due too: record() then starts over.
        return (
            elapsed >= self.interval or elapsed < 0 or (overload is None) != (last.overload is None)
        )

    def record(self, sample: MachineSample) -> None:
        if self._samples and sample.at < self._samples[-1].at:
            self._samples.clear()  # the clock went back: earlier samples would be "later"
        self._samples.append(sample)
        self._forget(sample.at)

    def samples(self, now: datetime) -> tuple[MachineSample, ...]:
        self._forget(now)
        return tuple(self._samples)

    def _forget(self, now: datetime) -> None:
        oldest = now - timedelta(seconds=self.window)
        while self._samples and self._samples[0].at < oldest:
            self._samples.popleft()
