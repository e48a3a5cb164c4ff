"""plan(): which queued jobs start now, checked by examples and by hypothesis properties."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from jobserver.resources import Gpu, Snapshot
from jobserver.scheduler import (
    CPU,
    CPU_PSI,
    FLOOR,
    MEMORY,
    MEMORY_PSI,
    Limits,
    Plan,
    PlanState,
    QueuedJob,
    Request,
    RunningJob,
    TaskLimits,
    effective_memory,
    learned_memory,
    memory_request,
    plan,
    pressure_victim,
    run_time,
)

GiB = 1024**3
MiB = 1024**2
TOLERANCE = 1e-6


def snapshot(
    cpus: float = 4.0,
    memory: int = 16 * GiB,
    cpu_idle: float | None = None,
    memory_available: int | None = None,
    cpu_outside: float | None = None,
) -> Snapshot:
    return Snapshot(
        cpu_capacity=cpus,
        memory_capacity=memory,
        cpu_idle=cpus if cpu_idle is None else cpu_idle,
        memory_available=memory if memory_available is None else memory_available,
        memory_pressure=None,
        cpu_pressure=None,
        sources={},
        cpu_outside=cpu_outside,
    )


def limits(
    max_jobs: int = 100,
    max_cpus: float | None = None,
    max_memory: int | None = None,
    reserve_cpus: float = 0.0,
    reserve_memory: int = 0,
) -> Limits:
    return Limits(
        max_jobs=max_jobs,
        max_cpus=max_cpus,
        max_memory=max_memory,
        reserve_cpus=reserve_cpus,
        reserve_memory=reserve_memory,
    )


def queued(n: int, cpus: float = 1.0, memory: int = GiB, priority: int = 0) -> QueuedJob:
    return QueuedJob(id=f"q{n:04d}", task="t", priority=priority, request=Request(cpus, memory))


def started(job: QueuedJob, memory_used: int = 0, cpus_used: float = 0.0) -> RunningJob:
    return RunningJob(
        id=job.id, task=job.task, request=job.request, memory_used=memory_used, cpus_used=cpus_used
    )


# -- examples ----------------------------------------------------------------------------


def test_empty_queue_admits_nothing_and_reports_capacity() -> None:
    result = plan([], [], snapshot(cpus=2.0, memory=8 * GiB), limits(max_memory=4 * GiB))
    assert result.admit == ()
    assert result.waiting == {}
    assert result.capacity.cpus == 2.0
    assert result.capacity.memory == 4 * GiB
    assert result.headroom.memory == 4 * GiB


def test_burst_admits_exactly_what_fits_and_nothing_more_while_usage_lags() -> None:
    machine = snapshot(cpus=16.0, memory=8 * GiB)
    queue = [queued(i, cpus=0.5, memory=2 * GiB) for i in range(100)]

    first = plan(queue, [], machine, limits())
    assert first.admit == tuple(job.id for job in queue[:4])
    assert set(first.waiting) == {job.id for job in queue[4:]}

    # The four just started: no measured use yet, and free memory has not dropped.
    running = [started(job) for job in queue[:4]]
    second = plan(queue[4:], running, machine, limits())
    assert second.admit == ()
    assert all(reason.startswith("waiting for memory") for reason in second.waiting.values())


def test_live_reading_holds_back_when_other_processes_use_the_machine() -> None:
    # Declared accounting says 8 GiB free, but something else uses 7 GiB of the box.
    machine = snapshot(cpus=4.0, memory=8 * GiB, memory_available=1 * GiB)
    result = plan([queued(1, memory=2 * GiB)], [], machine, limits())
    assert result.admit == ()
    assert (
        result.waiting["q0001"] == "waiting for memory: needs 2.0 GiB, 1.0 GiB free after reserve"
    )


def test_running_job_over_its_request_claims_its_measured_use() -> None:
    machine = snapshot(cpus=4.0, memory=8 * GiB, memory_available=4 * GiB)
    hog = started(queued(0, memory=1 * GiB), memory_used=4 * GiB)
    result = plan([queued(1, memory=3 * GiB), queued(2, memory=4 * GiB)], [hog], machine, limits())
    assert result.admit == ("q0001",)
    assert "q0002" in result.waiting


def test_just_started_job_holds_its_request_against_other_processes_use() -> None:
    # 16 GiB box, other processes use 6 GiB; a job just started with 4 GiB requested.
    machine = snapshot(cpus=8.0, memory=16 * GiB, memory_available=10 * GiB)
    running = [started(queued(0, memory=4 * GiB))]
    result = plan(
        [queued(1, memory=8 * GiB), queued(2, memory=6 * GiB)], running, machine, limits()
    )
    assert result.admit == ("q0002",)
    assert result.waiting["q0001"] == (
        "waiting for memory: needs 8.0 GiB, 6.0 GiB free after reserve"
    )


def test_declared_accounting_holds_when_the_live_reading_looks_roomy() -> None:
    # The job's measured RSS (6 GiB) is over its 1 GiB request; free memory still shows
    # 7 GiB (shared pages, a stale reading): the claim is the measured use.
    machine = snapshot(cpus=8.0, memory=8 * GiB, memory_available=7 * GiB)
    running = [started(queued(0, memory=1 * GiB), memory_used=6 * GiB)]
    result = plan([queued(1, memory=3 * GiB)], running, machine, limits())
    assert result.admit == ()
    assert result.waiting["q0001"] == (
        "waiting for memory: needs 3.0 GiB, 2.0 GiB free after reserve"
    )


def test_partly_used_request_holds_only_its_unused_part_in_the_live_reading() -> None:
    # Job uses 3 of its 4 GiB: the live reading already shows those 3 GiB gone.
    machine = snapshot(cpus=8.0, memory=16 * GiB, memory_available=13 * GiB)
    job = started(queued(0, memory=4 * GiB), memory_used=3 * GiB)
    result = plan([queued(1, memory=12 * GiB)], [job], machine, limits())
    assert result.admit == ("q0001",)
    assert result.headroom.memory == 0


def test_skip_ahead_big_head_waits_small_job_behind_it_starts() -> None:
    machine = snapshot(cpus=4.0, memory=8 * GiB)
    big = queued(1, cpus=1.0, memory=6 * GiB, priority=5)
    small = queued(2, cpus=1.0, memory=1 * GiB, priority=1)
    running = [started(queued(0, memory=4 * GiB), memory_used=4 * GiB)]
    result = plan([big, small], running, machine, limits())
    assert result.admit == ("q0002",)
    assert result.waiting["q0001"].startswith("waiting for memory: needs 6.0 GiB, 4.0 GiB free")


def test_priority_order_is_respected_when_slots_run_out() -> None:
    queue = [queued(3, priority=9), queued(1, priority=5), queued(2, priority=1)]
    result = plan(queue, [], snapshot(), limits(max_jobs=2))
    assert result.admit == ("q0003", "q0001")
    assert result.waiting == {"q0002": "max_jobs limit 2 reached"}


def test_max_jobs_counts_running_jobs() -> None:
    running = [started(queued(i, cpus=0.1, memory=MiB), cpus_used=0.1) for i in range(4)]
    result = plan([queued(9, cpus=0.1, memory=MiB)], running, snapshot(), limits(max_jobs=4))
    assert result.admit == ()
    assert result.waiting["q0009"] == "max_jobs limit 4 reached"


def test_quarter_cpus_fill_one_cpu_exactly() -> None:
    queue = [queued(i, cpus=0.25, memory=0) for i in range(5)]
    result = plan(queue, [], snapshot(cpus=1.0), limits())
    assert len(result.admit) == 4
    assert result.waiting["q0004"] == "waiting for CPU: needs 0.25 CPU, 0.00 free after reserve"


def test_tenths_of_cpus_fill_with_running_jobs() -> None:
    running = [started(queued(i, cpus=0.1, memory=0)) for i in range(7)]
    queue = [queued(10 + i, cpus=0.1, memory=0) for i in range(4)]
    result = plan(queue, running, snapshot(cpus=1.0), limits())
    assert len(result.admit) == 3


def test_reserve_is_kept_back() -> None:
    machine = snapshot(cpus=2.0, memory=4 * GiB)
    result = plan(
        [queued(1, cpus=1.0, memory=3 * GiB)],
        [],
        machine,
        limits(reserve_cpus=0.5, reserve_memory=GiB + 512 * MiB),
    )
    assert result.admit == ()
    assert result.waiting["q0001"] == (
        "needs 3.0 GiB memory but capacity after reserve is 2.5 GiB: it can never start; "
        "lower the task's memory request or lower reserve_memory"
    )


def test_request_above_capacity_can_never_start_and_says_what_to_do() -> None:
    machine = snapshot(cpus=8.0, memory=32 * GiB)
    result = plan(
        [queued(1, memory=30 * GiB)], [], machine, limits(max_memory=24 * GiB, reserve_memory=GiB)
    )
    assert result.waiting["q0001"] == (
        "needs 30.0 GiB memory but capacity after reserve is 23.0 GiB: it can never start; "
        "lower the task's memory request or raise max_memory"
    )


def test_cpu_request_above_capacity_can_never_start() -> None:
    result = plan([queued(1, cpus=4.0, memory=0)], [], snapshot(cpus=2.0), limits())
    reason = result.waiting["q0001"]
    assert reason.startswith("needs 4.00 CPU but capacity after reserve is 2.00 CPU")
    assert "it can never start" in reason


def test_waiting_for_cpu_reason_has_numbers() -> None:
    # One of our jobs runs (0.5 CPU declared); 2.1 CPUs busy outside, on average.
    machine = snapshot(cpus=4.0, cpu_idle=1.4, cpu_outside=2.1)
    busy = started(queued(9, cpus=0.5, memory=0), cpus_used=0.5)
    result = plan([queued(1, cpus=1.0, memory=0)], [busy], machine, limits(reserve_cpus=1.0))
    assert result.waiting["q0001"] == (
        "waiting for CPU: needs 1.00 CPU, 0.40 free after reserve "
        "(2.10 busy outside jobserver's jobs, on average)"
    )


def test_busy_cpus_never_stall_an_idle_server() -> None:
    # Other programs keep every CPU busy and none of our jobs runs: CPU is compressible,
    # so the first job whose declared request fits starts anyway; the second waits.
    machine = snapshot(cpus=4.0, cpu_idle=0.0, cpu_outside=4.0)
    result = plan(
        [queued(1, cpus=1.0, memory=0), queued(2, cpus=1.0, memory=0)], [], machine, limits()
    )
    assert result.admit == ("q0001",)
    assert result.waiting["q0002"].startswith("waiting for CPU")


def test_a_running_jobs_cpu_burst_does_not_hold_back_small_requests() -> None:
    """The issue's packing run: jobs declaring 0.01 CPU waited on the live idle reading
    while other jobs faulted their pages in.  CPU follows declared requests."""
    machine = snapshot(cpus=2.0, cpu_idle=0.0)
    faulting = [started(queued(8 + i, cpus=0.01, memory=GiB), cpus_used=1.0) for i in range(2)]
    queue = [queued(i, cpus=0.01, memory=GiB) for i in range(1, 4)]
    result = plan(queue, faulting, machine, limits())
    assert result.admit == ("q0001", "q0002", "q0003")


def test_outside_load_shrinks_cpu_capacity_as_averaged() -> None:
    machine = snapshot(cpus=2.0, cpu_idle=0.0, cpu_outside=1.5)
    running = [started(queued(9, cpus=0.25, memory=0), cpus_used=0.25)]
    result = plan(
        [queued(1, cpus=0.5, memory=0), queued(2, cpus=0.25, memory=0)], running, machine, limits()
    )
    assert result.admit == ("q0002",)
    assert result.waiting["q0001"].startswith("waiting for CPU: needs 0.50 CPU, 0.25 free")


def test_busy_memory_still_stalls_an_idle_server() -> None:
    machine = snapshot(memory=16 * GiB, memory_available=GiB)
    result = plan([queued(1, cpus=0.1, memory=2 * GiB)], [], machine, limits())
    assert result.admit == ()
    assert result.waiting["q0001"].startswith("waiting for memory: needs 2.0 GiB")


def test_small_sizes_are_formatted_in_mib() -> None:
    machine = snapshot(memory=GiB)
    result = plan(
        [queued(1, cpus=0.0, memory=768 * MiB)], [], machine, limits(reserve_memory=512 * MiB)
    )
    assert result.waiting["q0001"].startswith(
        "needs 768.0 MiB memory but capacity after reserve is 512.0 MiB"
    )


# -- properties --------------------------------------------------------------------------

cpu_amounts = st.one_of(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 2.0]),
    st.floats(min_value=0.0, max_value=8.0, allow_nan=False),
)
memory_amounts = st.one_of(
    st.sampled_from([0, 256 * MiB, 512 * MiB, GiB, 2 * GiB, 4 * GiB]),
    st.integers(min_value=0, max_value=16 * GiB),
)
plain_requests = st.builds(Request, cpus=cpu_amounts, memory=memory_amounts)
# Most jobs ask for no GPU; some for one or more devices, some with free memory on each.
requests = st.builds(
    Request,
    cpus=cpu_amounts,
    memory=memory_amounts,
    gpus=st.sampled_from([0, 0, 0, 0, 1, 1, 2, 3]),
    gpu_memory=st.sampled_from([0, 0, 0, 8 * GiB, 20 * GiB, 40 * GiB]),
)
Scenario = tuple[list[QueuedJob], list[RunningJob], Snapshot, Limits, list[Gpu] | None]

# Parts of the machine that other processes use.
fractions = st.sampled_from([0.0, 0.0, 0.1, 0.3, 0.6, 1.0])
any_fractions = fractions | st.floats(min_value=0.0, max_value=1.0)
# Measured use as a multiple of the request: just started (0), catching up, on target, over.
use_factors = st.sampled_from([0.0, 0.0, 0.5, 1.0, 1.5, 3.0]) | st.floats(0.0, 4.0)


@st.composite
def running_job(draw: st.DrawFn, index: int) -> RunningJob:
    request = draw(requests)
    memory_used = int(request.memory * draw(use_factors))
    cpus_used = request.cpus * draw(use_factors)
    return RunningJob(
        id=f"r{index:04d}",
        task="t",
        request=request,
        memory_used=memory_used,
        cpus_used=cpus_used,
    )


@st.composite
def machine_gpus(draw: st.DrawFn) -> list[Gpu] | None:
    """None (NVML does not answer) or up to four devices, each partly in use."""
    if draw(st.integers(0, 5)) == 0:
        return None
    devices = []
    for index in range(draw(st.integers(0, 4))):
        total = draw(st.sampled_from([16 * GiB, 40 * GiB, 80 * GiB]))
        free = draw(st.sampled_from([0, 8 * GiB, 20 * GiB, total]) | st.integers(0, total))
        devices.append(Gpu(index, "gpu", total, min(free, total)))
    return devices


def give_devices(
    running: list[RunningJob], gpus: list[Gpu] | None, order: list[int]
) -> list[RunningJob]:
    """Running jobs holding the devices their requests asked for, none shared (``order``
    says which devices go first); a job that could not have got its devices asks for none."""
    free = [index for index in order if gpus is not None and index < len(gpus)]
    given = []
    for job in running:
        count = job.request.gpu_count
        if count and len(free) >= count:
            devices, free = tuple(sorted(free[:count])), free[count:]
            given.append(replace(job, gpu_devices=devices))
        else:
            given.append(replace(job, request=replace(job.request, gpus=0, gpu_memory=0)))
    return given


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    queue_requests = draw(st.lists(requests, max_size=30))
    size = len(queue_requests)
    priorities = sorted(draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size)))
    queue = [
        QueuedJob(id=f"q{i:04d}", task="t", priority=p, request=r)
        for i, (p, r) in enumerate(zip(reversed(priorities), queue_requests, strict=True))
    ]
    gpus = draw(machine_gpus())
    running = give_devices(
        [draw(running_job(i)) for i in range(draw(st.integers(0, 6)))],
        gpus,
        draw(st.permutations(range(4))),
    )

    cpu_capacity = draw(
        st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 64.0])
        | st.floats(min_value=0.5, max_value=64.0, allow_nan=False)
    )
    memory_capacity = draw(
        st.sampled_from([8 * GiB, 16 * GiB, 64 * GiB, 256 * GiB])
        | st.integers(min_value=GiB, max_value=256 * GiB)
    )
    reading = draw(st.sampled_from(["consistent", "disagrees", "all free"]))
    cpu_outside = None
    if reading == "consistent":
        # The running jobs' measured use and other processes take from free.
        other_cpus = cpu_capacity * draw(fractions)
        other_memory = int(memory_capacity * draw(fractions))
        cpu_idle = cpu_capacity - other_cpus - sum(job.cpus_used for job in running)
        memory_available = memory_capacity - other_memory - sum(job.memory_used for job in running)
        cpu_idle, memory_available = max(0.0, cpu_idle), max(0, memory_available)
        cpu_outside = other_cpus
    elif reading == "disagrees":  # Measurements lag and disagree.
        cpu_idle = cpu_capacity * draw(any_fractions)
        memory_available = int(memory_capacity * draw(any_fractions))
        cpu_outside = cpu_capacity * draw(any_fractions)
    else:  # Stale, or RSS counted shared pages: only the declared accounting holds back.
        cpu_idle, memory_available = cpu_capacity, memory_capacity
    machine = Snapshot(
        cpu_capacity=cpu_capacity,
        memory_capacity=memory_capacity,
        cpu_idle=cpu_idle,
        memory_available=memory_available,
        memory_pressure=None,
        cpu_pressure=None,
        sources={},
        cpu_outside=cpu_outside,
    )
    configured = Limits(
        max_jobs=draw(st.sampled_from([4, 20, 100]) | st.integers(min_value=0, max_value=20)),
        max_cpus=draw(st.sampled_from([None, None, None, 0.5, 2.0, 8.0])),
        max_memory=draw(st.sampled_from([None, None, None, 512 * MiB, 4 * GiB, 32 * GiB])),
        reserve_cpus=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        reserve_memory=draw(st.sampled_from([0, 256 * MiB, GiB])),
    )
    return queue, running, machine, configured, gpus


def _admitted(queue: list[QueuedJob], result: Plan) -> list[QueuedJob]:
    by_id = {job.id: job for job in queue}
    return [by_id[job_id] for job_id in result.admit]


@dataclass(frozen=True)
class Accounting:
    """What is free before this plan's admissions, worked out here from the snapshot, the
    running jobs and the limits, without ``plan()``'s own figures (its docstring's rule)."""

    capacity_cpus: float
    capacity_memory: int
    declared_cpus: float  # capacity - running jobs' claims - reserve
    declared_memory: int
    live_cpus: float  # the snapshot's free - running jobs' not-yet-used parts - reserve
    live_memory: int


def accounting(running: list[RunningJob], machine: Snapshot, configured: Limits) -> Accounting:
    capacity_cpus = machine.cpu_capacity
    if configured.max_cpus is not None:
        capacity_cpus = min(capacity_cpus, configured.max_cpus)
    capacity_memory = machine.memory_capacity
    if configured.max_memory is not None:
        capacity_memory = min(capacity_memory, configured.max_memory)
    claimed_cpus = sum(job.request.cpus for job in running)  # compressible: requests only
    claimed_memory = sum(max(job.request.memory, job.memory_used) for job in running)
    unused_memory = sum(max(0, job.request.memory - job.memory_used) for job in running)
    return Accounting(
        capacity_cpus=capacity_cpus,
        capacity_memory=capacity_memory,
        declared_cpus=capacity_cpus - claimed_cpus - configured.reserve_cpus,
        declared_memory=capacity_memory - claimed_memory - configured.reserve_memory,
        # CPU has no live reading: the outside load, averaged, shrinks the declared room.
        live_cpus=capacity_cpus
        - claimed_cpus
        - configured.reserve_cpus
        - (machine.cpu_outside or 0.0),
        live_memory=machine.memory_available - unused_memory - configured.reserve_memory,
    )


def free_gpus(
    gpus: list[Gpu] | None, running: list[RunningJob], result: Plan, gpu_memory: int
) -> int:
    """Devices no running or admitted job holds, with ``gpu_memory`` free."""
    if gpus is None:
        return 0
    taken = {index for job in running for index in job.gpu_devices}
    taken |= {index for devices in result.devices.values() for index in devices}
    return sum(1 for gpu in gpus if gpu.index not in taken and gpu.memory_free >= gpu_memory)


def fits_what_is_left(
    job: QueuedJob,
    running: list[RunningJob],
    admitted: list[QueuedJob],
    machine: Snapshot,
    configured: Limits,
    gpus: list[Gpu] | None,
    result: Plan,
) -> bool:
    """Whether ``job`` fits what the admissions left: CPUs, memory and GPUs."""
    free = accounting(running, machine, configured)
    if running or admitted:
        left_cpus = min(free.declared_cpus, free.live_cpus)
    else:  # CPU is compressible: an idle server's first job needs declared room only.
        left_cpus = free.declared_cpus
    left_cpus -= sum(queued.request.cpus for queued in admitted)
    left_memory = min(free.declared_memory, free.live_memory)
    left_memory -= sum(queued.request.memory for queued in admitted)
    return (
        job.request.cpus <= left_cpus + 1e-9
        and job.request.memory <= left_memory
        and free_gpus(gpus, running, result, job.request.gpu_memory) >= job.request.gpu_count
    )


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_every_job_is_admitted_or_waits_with_a_reason(scenario: Scenario) -> None:
    queue, running, machine, configured, gpus = scenario
    result = plan(queue, running, machine, configured, gpus=gpus)
    assert len(set(result.admit)) == len(result.admit)
    assert set(result.admit).isdisjoint(result.waiting)
    assert set(result.admit) | set(result.waiting) == {job.id for job in queue}
    assert all(reason.strip() for reason in result.waiting.values())
    assert all(re.search(r"\d", reason) for reason in result.waiting.values())
    # Admitted in queue order (priority first, then age).
    positions = [queue.index(job) for job in _admitted(queue, result)]
    assert positions == sorted(positions)


@settings(max_examples=1000, deadline=None)
@given(scenarios())
def test_never_admits_beyond_capacity_or_live_free(scenario: Scenario) -> None:
    """Memory: within declared accounting and the live reading.  CPU (compressible):
    declared requests within capacity less the averaged outside load, except that a
    server running none of its jobs may start its first one on CPUs others keep busy."""
    queue, running, machine, configured, gpus = scenario
    result = plan(queue, running, machine, configured, gpus=gpus)
    admitted = _admitted(queue, result)
    if not admitted:
        return
    free = accounting(running, machine, configured)
    admitted_cpus = sum(job.request.cpus for job in admitted)
    admitted_memory = sum(job.request.memory for job in admitted)
    assert admitted_cpus <= free.declared_cpus + TOLERANCE
    assert admitted_memory <= free.declared_memory
    if running:
        assert admitted_cpus <= free.live_cpus + TOLERANCE
        assert result.headroom.cpus >= -TOLERANCE
    else:
        first = admitted[0].request.cpus
        assert admitted_cpus <= max(first, free.live_cpus) + TOLERANCE
        assert result.headroom.cpus >= min(0.0, free.live_cpus - first) - TOLERANCE
    assert admitted_memory <= free.live_memory
    assert result.headroom.memory >= 0


@settings(max_examples=1000, deadline=None)
@given(scenarios())
def test_gpus_are_never_shared_or_short_of_memory(scenario: Scenario) -> None:
    queue, running, machine, configured, gpus = scenario
    result = plan(queue, running, machine, configured, gpus=gpus)
    admitted = _admitted(queue, result)
    assert set(result.devices) == {job.id for job in admitted if job.request.gpu_count}
    held = [index for job in running for index in job.gpu_devices]
    handed = [index for devices in result.devices.values() for index in devices]
    assert len(set(held + handed)) == len(held) + len(handed), (held, result.devices)
    by_index = {gpu.index: gpu for gpu in gpus or []}
    for job in admitted:
        devices = result.devices.get(job.id, ())
        assert len(devices) == job.request.gpu_count
        for index in devices:
            assert by_index[index].memory_free >= job.request.gpu_memory, (job, by_index[index])


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_never_more_than_max_jobs(scenario: Scenario) -> None:
    queue, running, machine, configured, gpus = scenario
    result = plan(queue, running, machine, configured, gpus=gpus)
    assert len(result.admit) <= max(0, configured.max_jobs - len(running))


@settings(max_examples=1000, deadline=None)
@given(scenarios())
def test_never_an_idle_machine_while_a_fitting_job_waits(scenario: Scenario) -> None:
    """A waiting job must not fit what is left after the admissions, with a job slot and
    its GPUs free.  What is left is worked out here, not read from plan()'s headroom, so
    a plan() that starts too little and reports too little left fails too."""
    queue, running, machine, configured, gpus = scenario
    result = plan(queue, running, machine, configured, gpus=gpus)
    admitted = _admitted(queue, result)
    slot_free = len(running) + len(admitted) < configured.max_jobs
    for job in queue:
        if job.id in result.waiting:
            fits = fits_what_is_left(job, running, admitted, machine, configured, gpus, result)
            assert not (slot_free and fits), (job, result.waiting[job.id])


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=100),
    fits=st.integers(min_value=1, max_value=8),
    request=plain_requests.filter(lambda r: r.memory >= MiB and r.cpus >= 0.1),
)
def test_a_burst_admits_what_fits_then_nothing_until_usage_is_measured(
    count: int, fits: int, request: Request
) -> None:
    machine = snapshot(cpus=request.cpus * fits, memory=request.memory * fits)
    queue = [QueuedJob(id=f"q{i:04d}", task="t", priority=0, request=request) for i in range(count)]
    first = plan(queue, [], machine, limits())
    assert len(first.admit) == min(count, fits)
    running = [started(job) for job in queue[: len(first.admit)]]
    second = plan(queue[len(first.admit) :], running, machine, limits())
    assert second.admit == ()


# -- resource-aware rules: overload, hysteresis, starvation, task limits -----------------


def pressured(
    memory_available: int = 16 * GiB,
    memory_pressure: float | None = None,
    cpu_pressure: float | None = None,
) -> Snapshot:
    return Snapshot(
        cpu_capacity=4.0,
        memory_capacity=16 * GiB,
        cpu_idle=4.0,
        memory_available=memory_available,
        memory_pressure=memory_pressure,
        cpu_pressure=cpu_pressure,
        sources={},
    )


def rules(**tasks: TaskLimits) -> dict[str, TaskLimits]:
    return dict(tasks)


def job(n: int, task: str = "t", memory: int = GiB, cpus: float = 0.5, **kw: Any) -> QueuedJob:
    return QueuedJob(id=f"q{n:04d}", task=task, priority=0, request=Request(cpus, memory), **kw)


def test_memory_floor_stops_admission_and_holds_with_hysteresis() -> None:
    configured = replace(limits(), memory_floor=2 * GiB, hysteresis=0.25)
    queue = [job(1, memory=MiB)]

    low = plan(queue, [], pressured(memory_available=GiB), configured)
    assert low.admit == ()
    assert low.overload == "memory floor: 1.0 GiB available < memory_floor 2.0 GiB"
    assert low.waiting["q0001"] == low.overload

    # Back above the floor, but inside the hysteresis band: still held.
    band = plan(queue, [], pressured(memory_available=2 * GiB + 100 * MiB), configured, low.state)
    assert band.admit == ()
    assert band.waiting["q0001"].startswith("memory floor: 2.1 GiB available, held until above 2.5")

    # Clear of the band: admitted again; and the same reading without history admits.
    clear = plan(queue, [], pressured(memory_available=3 * GiB), configured, band.state)
    assert clear.admit == ("q0001",)
    assert plan(queue, [], pressured(memory_available=2 * GiB + 100 * MiB), configured).admit


def test_the_floor_resume_threshold_can_be_reached_on_the_machine() -> None:
    """The issue's case: memory_floor just under what is available, and floor x (1 + h) =
    24.7 GiB above the machine's 23.5 GiB: admission, once stopped, never resumed."""
    total = int(23.5 * GiB)
    configured = replace(limits(), memory_floor=int(22.5 * GiB), hysteresis=0.1)
    queue = [job(1, memory=MiB)]
    low = plan(queue, [], snapshot(memory=total, memory_available=22 * GiB), configured)
    assert low.admit == () and FLOOR in low.state.held
    # Held: resumes at the floor + h x the room above it (22.6 GiB), below the total.
    band = plan(
        queue, [], snapshot(memory=total, memory_available=int(22.55 * GiB)), configured, low.state
    )
    assert band.admit == ()
    assert "held until above 22.6 GiB" in band.waiting["q0001"]
    back = plan(queue, [], snapshot(memory=total, memory_available=23 * GiB), configured, low.state)
    assert back.admit == ("q0001",)


@given(
    total=st.integers(GiB, 64 * GiB),
    floor_fraction=st.floats(0.01, 0.99),
    hysteresis=st.floats(0.0, 1.0),
)
def test_every_held_floor_resumes_once_all_memory_is_available(
    total: int, floor_fraction: float, hysteresis: float
) -> None:
    configured = replace(limits(), memory_floor=int(total * floor_fraction), hysteresis=hysteresis)
    held = PlanState(frozenset({FLOOR}))
    found = plan([job(1, memory=MiB)], [], snapshot(memory=total), configured, held)
    assert found.admit == ("q0001",)


def test_psi_limits_stop_admission_with_hysteresis() -> None:
    configured = replace(
        limits(), memory_pressure_limit=20.0, cpu_pressure_limit=50.0, hysteresis=0.25
    )
    queue = [job(1)]
    high = plan(queue, [], pressured(memory_pressure=34.0), configured)
    assert high.admit == ()
    assert high.waiting["q0001"] == "PSI memory pressure 34% > 20%"
    assert FLOOR not in high.state.held and MEMORY_PSI in high.state.held
    held = plan(queue, [], pressured(memory_pressure=18.0), configured, high.state)
    assert held.admit == ()
    assert "held until below 15%" in held.waiting["q0001"]
    assert plan(queue, [], pressured(memory_pressure=14.0), configured, held.state).admit
    cpu = plan(queue, [], pressured(cpu_pressure=80.0), configured)
    assert cpu.waiting["q0001"] == "PSI cpu pressure 80% > 50%"
    # No PSI on this machine (None): nothing to hold on.
    assert plan(queue, [], pressured(), configured).admit == ("q0001",)


def test_a_resource_once_short_needs_a_margin() -> None:
    configured = replace(limits(), hysteresis=0.1)
    machine = snapshot(cpus=4.0, memory=4 * GiB)
    busy = [started(job(0, memory=2 * GiB), memory_used=2 * GiB)]
    short = plan([job(1, memory=3 * GiB)], busy, machine, configured)
    assert short.admit == () and MEMORY in short.state.held
    # 4 GiB free; a 3.8 GiB job fits exactly but not with the 10% margin.
    edge = plan([job(2, memory=3800 * MiB)], [], machine, configured, short.state)
    assert edge.admit == ()
    assert "hysteresis margin" in edge.waiting["q0002"]
    # Without the held state (no recent shortage) it would start.
    assert plan([job(2, memory=3800 * MiB)], [], machine, configured).admit == ("q0002",)


def test_starving_job_reserves_what_it_needs() -> None:
    machine = snapshot(cpus=8.0, memory=8 * GiB)
    running = [started(job(0, memory=6 * GiB), memory_used=6 * GiB)]
    big = job(1, memory=4 * GiB, waited=600.0)
    small = job(2, memory=GiB)
    configured = replace(limits(), starvation_after=300.0)

    guarded = plan([big, small], running, machine, configured)
    assert guarded.admit == ()
    assert guarded.waiting["q0001"].startswith("waiting for memory: needs 4.0 GiB, 2.0 GiB free")
    assert "past starvation_after 5m" in guarded.waiting["q0001"]
    assert guarded.waiting["q0002"].startswith("held for job q0001 (waiting 10m)")

    # Not yet starving: the small job passes the big one (skip ahead).
    young = plan([replace(big, waited=60.0), small], running, machine, configured)
    assert young.admit == ("q0002",)
    # Higher-priority jobs ahead of it are not held back by it.
    urgent = QueuedJob("q0000", "t", 5, Request(0.5, GiB))
    assert plan([urgent, big, small], running, machine, configured).admit == ("q0000",)


def test_starving_job_waiting_for_a_slot_reserves_it() -> None:
    running = [started(job(0, memory=MiB), memory_used=MiB)]
    configured = replace(limits(max_jobs=2), starvation_after=60.0)
    head = job(1, memory=20 * GiB, waited=120.0)  # never fits: reserves nothing
    waiting = job(2, task="limited", waited=120.0)
    later = job(3)
    limited = replace(configured, tasks={"limited": TaskLimits(max_concurrency=1)})
    blocked = [started(job(9, task="limited", memory=MiB), memory_used=MiB)]
    result = plan([head, waiting, later], blocked, snapshot(), limited)
    # A task-limit wait and a never-fits job reserve nothing: the later job starts.
    assert result.admit == ("q0003",)
    assert result.waiting["q0002"] == "task limit 1 reached: 1 limited jobs running"
    assert "it can never start" in result.waiting["q0001"]
    # A starving job waiting for the last slot keeps it.
    full = plan(
        [job(4, memory=20 * GiB), job(5, waited=100.0), job(6)], running, snapshot(), configured
    )
    assert full.admit == ("q0005",)


def test_max_concurrency_per_task() -> None:
    configured = replace(limits(), tasks={"render": TaskLimits(max_concurrency=2)})
    running = [started(job(0, task="render"))]
    queue = [job(1, task="render"), job(2, task="render"), job(3, task="other")]
    result = plan(queue, running, snapshot(), configured)
    assert result.admit == ("q0001", "q0003")
    assert result.waiting == {"q0002": "task limit 2 reached: 2 render jobs running"}


def test_max_concurrency_counts_the_jobs_running_on_every_node_when_given() -> None:
    configured = replace(
        limits(),
        tasks={"render": TaskLimits(max_concurrency=3)},
        running_everywhere={"render": 2},  # one here (below), one on another node
    )
    running = [started(job(0, task="render"))]
    queue = [job(1, task="render"), job(2, task="render"), job(3, task="other")]
    result = plan(queue, running, snapshot(), configured)
    assert result.admit == ("q0001", "q0003")
    assert result.waiting == {"q0002": "task limit 3 reached: 3 render jobs running on all nodes"}
    # Another node runs them all: none here, whatever this node runs.
    full = plan(queue, [], snapshot(), replace(configured, running_everywhere={"render": 3}))
    assert full.admit == ("q0003",)


def test_exclusive_task_runs_alone() -> None:
    configured = replace(limits(), tasks={"migrate": TaskLimits(exclusive=True)})
    alone = job(1, task="migrate")
    others = [job(2), job(3)]
    # Nothing running: the exclusive job starts and nothing beside it.
    first = plan([alone, *others], [], snapshot(), configured)
    assert first.admit == ("q0001",)
    assert (
        first.waiting["q0002"]
        == "exclusive job q0001 (migrate) is running; nothing else starts beside it"
    )
    # Something runs: it waits; the others start.
    busy = [started(job(0))]
    second = plan([alone, *others], busy, snapshot(), configured)
    assert second.admit == ("q0002", "q0003")
    assert second.waiting["q0001"] == "exclusive: waits for the 1 running job(s) to finish"
    # It runs: nothing else starts.
    third = plan(others, [started(alone)], snapshot(), configured)
    assert third.admit == ()
    # Starving: it holds the whole machine so the running jobs drain.
    starving = plan(
        [replace(alone, waited=900.0), *others],
        busy,
        snapshot(),
        replace(configured, starvation_after=300.0),
    )
    assert starving.admit == ()
    assert starving.waiting["q0002"].startswith("held for job q0001 (waiting 15m)")


def test_pressure_victim_is_the_youngest_of_the_lowest_priority() -> None:
    def runner(n: int, priority: int, started_at: float) -> RunningJob:
        return replace(started(job(n)), priority=priority, started=started_at)

    assert pressure_victim([]) is None
    jobs = [runner(1, 0, 10.0), runner(2, 0, 20.0), runner(3, -1, 5.0), runner(4, 5, 30.0)]
    victim = pressure_victim(jobs)
    assert victim is not None and victim.id == "q0003"
    victim = pressure_victim([j for j in jobs if j.id != "q0003"])
    assert victim is not None and victim.id == "q0002"


def test_learned_memory_and_effective_request() -> None:
    assert learned_memory([], 95, 1.2) is None
    peaks = [100 * MiB] * 19 + [1000 * MiB]
    assert learned_memory(peaks, 95, 1.0) == 100 * MiB  # the 19th of 20
    assert learned_memory(peaks, 100, 1.5) == 1500 * MiB
    # No declaration: learned, else the fallback.
    assert effective_memory(None, [], 95, 1.2, 256 * MiB) == 256 * MiB
    assert effective_memory(None, [100 * MiB], 95, 1.2, 256 * MiB) == 120 * MiB
    # Declared and never exceeded: the declaration stands.
    assert effective_memory(512 * MiB, [400 * MiB], 95, 1.5, 256 * MiB) == 512 * MiB
    # Runs used more than declared: the learned figure.
    assert effective_memory(512 * MiB, [600 * MiB], 95, 1.2, 256 * MiB) == 720 * MiB


def test_a_learned_request_is_capped_by_a_kernel_enforced_limit() -> None:
    # The cgroup's peak never passes the limit, but the margin would.
    found = memory_request(
        64 * MiB, [100 * MiB], 95, 1.2, 256 * MiB, memory_limit=100 * MiB, limit_in_kernel=True
    )
    assert found.memory == 100 * MiB and found.source == "learned"
    assert "capped at memory_limit 100.0 MiB, which the kernel enforces" in found.why


def test_a_sampled_limit_caps_at_the_limit_plus_the_measured_overshoot() -> None:
    """The issue's repro: a run killed at 212.9 MiB taught 255.4 MiB (x 1.2)."""
    peak = int(212.9 * MiB)
    found = memory_request(64 * MiB, [peak], 95, 1.2, 256 * MiB, memory_limit=100 * MiB)
    assert found.memory == peak
    assert "memory_limit 100.0 MiB + the measured overshoot 112.9 MiB" in found.why
    assert "enforced by sampling" in found.why
    # ... and after max_memory is lowered below it, capped at the capacity: never stuck.
    found = memory_request(
        64 * MiB, [peak], 95, 1.2, 256 * MiB, memory_limit=100 * MiB, usable=200 * MiB
    )
    assert found.memory == 200 * MiB
    assert "capped at the capacity after reserve 200.0 MiB" in found.why


@given(
    declared=st.none() | st.integers(1, 4 * GiB),
    peaks=st.lists(st.integers(1, 8 * GiB), max_size=20),
    margin=st.floats(1.0, 10.0),
    limit=st.none() | st.integers(1, 4 * GiB),
    in_kernel=st.booleans(),
    usable=st.integers(1, 8 * GiB),
)
def test_a_learned_request_never_leaves_a_task_stuck_above_capacity(
    declared: int | None,
    peaks: list[int],
    margin: float,
    limit: int | None,
    in_kernel: bool,
    usable: int,
) -> None:
    found = memory_request(
        declared,
        peaks,
        95,
        margin,
        256 * MiB,
        memory_limit=limit,
        limit_in_kernel=in_kernel,
        usable=usable,
    )
    if declared is not None:
        assert found.memory >= declared
    if found.source == "learned":
        assert found.memory <= max(usable, declared or 0)
        if limit is not None and in_kernel:
            assert found.memory <= max(limit, declared or 0)
        if limit is not None and not in_kernel:
            assert found.memory <= max(limit, *peaks, declared or 0)
    assert found.why


# -- properties of the full rule set -------------------------------------------------------

TASKS = ("a", "b", "c")


# Run times and expected ends, in seconds; None: not known.
run_times = st.sampled_from([None, 1.0, 5.0, 30.0, 120.0]) | st.floats(0.0, 600.0)


@st.composite
def rich_scenarios(draw: st.DrawFn, timed: bool = False) -> Rich:
    """Every rule at once; ``timed``: jobs with run times and expected ends (backfill)."""
    queue, running, machine, configured, gpus = draw(scenarios())
    queue = [
        replace(
            job,
            task=draw(st.sampled_from(TASKS)),
            waited=draw(st.sampled_from([0.0, 10.0, 400.0, 4000.0])),
            duration=draw(run_times) if timed else None,
        )
        for job in queue
    ]
    running = [
        replace(
            job,
            task=draw(st.sampled_from(TASKS)),
            remaining=draw(run_times) if timed else None,
        )
        for job in running
    ]
    task_rules = {
        name: TaskLimits(
            max_concurrency=draw(st.sampled_from([None, None, 1, 2])),
            exclusive=draw(st.sampled_from([False, False, False, True])),
        )
        for name in TASKS
    }
    configured = replace(
        configured,
        tasks=task_rules,
        starvation_after=draw(st.sampled_from([None, 300.0])),
        hysteresis=draw(st.sampled_from([0.0, 0.1, 0.5])),
        memory_floor=draw(st.sampled_from([0, 0, GiB])),
        memory_pressure_limit=draw(st.sampled_from([None, 20.0])),
    )
    machine = replace(machine, memory_pressure=draw(st.sampled_from([None, 0.0, 19.0, 35.0])))
    state = PlanState(
        frozenset(draw(st.sets(st.sampled_from([MEMORY, CPU, FLOOR, MEMORY_PSI, CPU_PSI]))))
    )
    return queue, running, machine, configured, state, gpus


Rich = tuple[list[QueuedJob], list[RunningJob], Snapshot, Limits, PlanState, list[Gpu] | None]


@settings(max_examples=600, deadline=None)
@given(rich_scenarios(timed=True))
def test_full_rules_never_overcommit_and_always_say_why(scenario: Rich) -> None:
    queue, running, machine, configured, state, gpus = scenario
    result = plan(queue, running, machine, configured, state, gpus)
    admitted = _admitted(queue, result)
    assert set(result.admit) | set(result.waiting) == {job.id for job in queue}
    assert all(re.search(r"\d", reason) for reason in result.waiting.values())
    assert len(running) + len(admitted) <= max(configured.max_jobs, len(running))
    if admitted:
        free = accounting(running, machine, configured)
        assert sum(j.request.memory for j in admitted) <= free.declared_memory
        assert result.overload is None
    # max_concurrency
    for name, task_rules in configured.tasks.items():
        if task_rules.max_concurrency is not None:
            before = sum(1 for job in running if job.task == name)
            added = sum(1 for job in admitted if job.task == name)
            assert added == 0 or before + added <= task_rules.max_concurrency
    # exclusive: alone, and nothing beside a running one
    exclusive = {name for name, r in configured.tasks.items() if r.exclusive}
    if any(job.task in exclusive for job in running):
        assert admitted == []
    if any(job.task in exclusive for job in admitted):
        assert running == [] and len(admitted) == 1
    # Nothing fitting waits unexplained: a waiting job that fits what is left (worked out
    # here) with a slot free names the rule that holds it.
    slot_free = len(running) + len(admitted) < configured.max_jobs
    for job in queue:
        reason = result.waiting.get(job.id)
        if reason is None or not slot_free:
            continue
        if fits_what_is_left(job, running, admitted, machine, configured, gpus, result):
            assert re.match(
                r"(task limit|exclusive|held for|memory floor|PSI|.*hysteresis margin)", reason
            ), (job, reason)


@settings(max_examples=600, deadline=None)
@given(rich_scenarios())
def test_starvation_guard_holds(scenario: Rich) -> None:
    queue, running, machine, configured, _, gpus = scenario
    configured = replace(configured, starvation_after=300.0)
    result = plan(queue, running, machine, configured, gpus=gpus)  # no held state: no margins
    starving = [
        i
        for i, job in enumerate(queue)
        if job.id in result.waiting and "past starvation_after" in result.waiting[job.id]
    ]
    if not starving:
        return
    # Nothing behind the first starving job took resources, devices or a slot from it: a
    # job behind it starts only when it waits for GPUs alone, and leaves it enough devices.
    holder = queue[starving[0]]
    # A job that can never start reserves nothing: it would hold the rest for ever.
    assert "can never start" not in result.waiting[holder.id], (holder, result)
    behind = set(result.admit) & {job.id for job in queue[starving[0] + 1 :]}
    if not behind:
        return
    assert not configured.tasks[holder.task].exclusive, (holder, result)
    admitted = _admitted(queue, result)
    assert len(running) + len(admitted) < configured.max_jobs, (holder, result)
    without_gpus = replace(holder, request=replace(holder.request, gpus=0, gpu_memory=0))
    assert fits_what_is_left(without_gpus, running, admitted, machine, configured, gpus, result)
    assert holder.request.gpu_count > 0, (holder, result)
    if behind & set(result.devices):
        held = {index for job in running for index in job.gpu_devices}
        handed = {index for devices in result.devices.values() for index in devices}
        assert len(gpus or []) - len(held | handed) >= holder.request.gpu_count, (holder, result)


@settings(max_examples=300, deadline=None)
@given(
    readings=st.lists(st.integers(min_value=2 * GiB, max_value=2 * GiB + 200 * MiB), max_size=20),
)
def test_no_flapping_inside_the_hysteresis_band(readings: list[int]) -> None:
    configured = replace(limits(), memory_floor=2 * GiB, hysteresis=0.1)
    queue = [job(1, memory=MiB)]
    state = plan(queue, [], pressured(memory_available=GiB), configured).state
    for reading in readings:
        result = plan(queue, [], pressured(memory_available=reading), configured, state)
        assert result.admit == ()
        state = result.state


def test_gpu_jobs_get_free_devices_with_enough_memory() -> None:
    gpus = [
        Gpu(0, "g", 80 * GiB, 10 * GiB),
        Gpu(1, "g", 80 * GiB, 70 * GiB),
        Gpu(2, "g", 80 * GiB, 40 * GiB),
    ]
    two = QueuedJob("q0001", "t", 0, Request(0.1, MiB, gpus=2, gpu_memory=20 * GiB))
    one = QueuedJob("q0002", "t", 0, Request(0.1, MiB, gpus=1))
    three = QueuedJob("q0003", "t", 0, Request(0.1, MiB, gpus=4))
    result = plan([two, one, three], [], snapshot(), limits(), gpus=gpus)
    assert result.admit == ("q0001", "q0002")
    assert result.devices == {"q0001": (1, 2), "q0002": (0,)}
    assert result.waiting["q0003"] == "needs 4 GPU(s) but the machine has 3: it can never start"
    # Devices held by running jobs are not handed out again.
    running = [replace(started(two), gpu_devices=(1, 2))]
    again = plan([one, replace(two, id="q0004")], running, snapshot(), limits(), gpus=gpus)
    assert again.devices == {"q0002": (0,)}
    assert again.waiting["q0004"] == (
        "waiting for GPUs: needs 2 with 20.0 GiB free each, 0 available"
    )
    # More memory per GPU than any of them has at all: a reason that says so, not "waiting".
    huge = QueuedJob("q0006", "t", 0, Request(0.1, MiB, gpus=1, gpu_memory=100 * GiB))
    assert plan([huge], [], snapshot(), limits(), gpus=gpus).waiting["q0006"] == (
        "needs 1 GPU(s) with 100.0 GiB free each but 0 of the machine's GPUs have that much "
        "memory at all (largest 80.0 GiB): it can never start"
    )
    # No NVML: GPU jobs wait, others do not.
    blind = plan([one, job(5)], [], snapshot(), limits(), gpus=None)
    assert blind.admit == ("q0005",)
    assert "NVML does not answer" in blind.waiting["q0002"]


def test_a_starving_gpu_job_keeps_the_devices_it_waits_for() -> None:
    gpus = [
        Gpu(0, "g", 80 * GiB, 80 * GiB),
        Gpu(1, "g", 80 * GiB, 80 * GiB),
        Gpu(2, "g", 80 * GiB, 80 * GiB),
    ]
    running = [replace(started(job(0)), request=Request(0.5, GiB, gpus=2), gpu_devices=(1, 2))]
    configured = replace(limits(), starvation_after=300.0)
    pair = QueuedJob("q0001", "t", 0, Request(0.5, GiB, gpus=2), waited=600.0)
    single = QueuedJob("q0002", "t", 0, Request(0.5, GiB, gpus=1))
    result = plan([pair, single, job(3)], running, snapshot(), configured, gpus=gpus)
    # The later one-GPU job would take device 0, which the starving pair needs; the
    # CPU-only job takes nothing it needs.
    assert result.admit == ("q0003",)
    assert result.waiting["q0002"].startswith("held for job q0001 (waiting 10m)")
    # Not yet starving: the single job passes it.
    young = plan([replace(pair, waited=60.0), single], running, snapshot(), configured, gpus=gpus)
    assert young.admit == ("q0002",)


def test_a_gpu_job_that_can_never_start_reserves_nothing() -> None:
    gpus = [Gpu(0, "g", 80 * GiB, 80 * GiB)]
    configured = replace(limits(max_jobs=1), starvation_after=300.0)
    too_many = QueuedJob("q0001", "t", 0, Request(0.5, GiB, gpus=2), waited=600.0)
    result = plan([too_many, job(2)], [], snapshot(), configured, gpus=gpus)
    assert result.admit == ("q0002",)
    assert result.waiting["q0001"] == "needs 2 GPU(s) but the machine has 1: it can never start"


# -- backfill ------------------------------------------------------------------------------


def running_for(n: int, memory: int, remaining: float | None, **kw: Any) -> RunningJob:
    return replace(started(job(n, memory=memory, **kw), memory_used=memory), remaining=remaining)


def test_backfill_starts_what_ends_before_the_starving_jobs_turn() -> None:
    machine = snapshot(cpus=8.0, memory=8 * GiB)
    configured = replace(limits(), starvation_after=300.0)
    # 2 GiB free; the starving job needs 7.5 GiB, which it has once the 6 GiB job ends,
    # within 60 s: 0.5 GiB will be left beside it then.
    running = [running_for(0, 6 * GiB, remaining=60.0)]
    big = job(1, memory=7 * GiB + 512 * MiB, waited=600.0)
    quick = job(2, memory=GiB, duration=30.0)  # ends before the big job's turn
    slow = job(3, memory=GiB, duration=120.0)  # would still hold 1 GiB then
    unknown = job(4, memory=GiB)  # no run time known
    small = job(5, memory=256 * MiB, duration=500.0)  # runs long, but fits beside it
    result = plan([big, quick, slow, unknown, small], running, machine, configured)
    assert result.admit == ("q0002", "q0005")
    assert "past starvation_after" in result.waiting["q0001"]
    assert result.waiting["q0003"] == (
        "held for job q0001 (waiting 10m): it waited past starvation_after; it should "
        "start within 1m and this job may run 2m"
    )
    assert result.waiting["q0004"] == (
        "held for job q0001 (waiting 10m): it waited past starvation_after; it should "
        "start within 1m and this job's run time is not known yet"
    )


def test_a_starving_jobs_reservation_still_holds_against_backfill() -> None:
    machine = snapshot(cpus=8.0, memory=8 * GiB)
    configured = replace(limits(), starvation_after=300.0)
    big = job(1, memory=7 * GiB, waited=600.0)
    # When the running job's end is not known, no start can be foreseen: nothing that
    # would take the reserved memory passes, however short.
    unknown_end = [running_for(0, 6 * GiB, remaining=None)]
    held = plan([big, job(2, memory=GiB, duration=1.0)], unknown_end, machine, configured)
    assert held.admit == ()
    assert "when it can start is not known" in held.waiting["q0002"]
    # A job past its expected end may end any moment: the reservation starts now, and
    # a job that would take more than is left beside it then waits.
    overdue = [running_for(0, 6 * GiB, remaining=0.0)]
    now = plan([big, job(2, memory=2 * GiB, duration=1.0)], overdue, machine, configured)
    assert now.admit == ()
    assert "it should start within 0.0s" in now.waiting["q0002"]
    # What fits in the 1 GiB left beside it then starts, however long it runs.
    beside = plan([big, job(3, memory=GiB, duration=1000.0)], overdue, machine, configured)
    assert beside.admit == ("q0003",)


def test_a_large_job_at_the_head_keeps_its_room_from_jobs_that_would_outlast_its_turn() -> None:
    # Not starving: the first waiting job still gets a reservation if its start can be
    # foreseen (Slurm's backfill), so small jobs do not keep it waiting until it starves.
    machine = snapshot(cpus=8.0, memory=8 * GiB)
    configured = replace(limits(), starvation_after=300.0)
    # 2 GiB free; the big job fits once the 4 GiB job ends (5 s), 1 GiB left beside it.
    running = [running_for(0, 4 * GiB, remaining=5.0), running_for(9, 2 * GiB, remaining=60.0)]
    big = job(1, memory=5 * GiB, duration=10.0)
    long = job(2, memory=2 * GiB, duration=20.0)  # fits now, but would outlast its turn
    tiny = job(3, memory=512 * MiB, duration=30.0)  # outlasts it, but fits beside it
    short = job(4, memory=GiB, duration=4.0)  # ends before its turn
    result = plan([big, long, tiny, short], running, machine, configured)
    assert result.admit == ("q0003", "q0004")
    assert result.waiting["q0002"] == (
        "held for job q0001 (first in the queue): it should start within 5.0s and this "
        "job may run 20.0s"
    )
    assert result.waiting["q0001"].startswith("waiting for memory: needs 5.0 GiB")
    # A task with no history yet passes it (skip ahead, as without backfill).
    fresh = plan([big, replace(long, duration=None)], running, machine, configured)
    assert fresh.admit == ("q0002",)
    # Without run times nothing is foreseen: plain skip ahead.
    blind = [replace(j, duration=None) for j in (big, long, tiny, short)]
    unknown = [replace(r, remaining=None) for r in running]
    assert plan(blind, unknown, machine, configured).admit == ("q0002",)


def test_backfill_ahead_of_a_starving_exclusive_job_ends_before_every_running_job() -> None:
    configured = replace(
        limits(), starvation_after=300.0, tasks={"solo": TaskLimits(exclusive=True)}
    )
    running = [running_for(0, GiB, remaining=30.0), running_for(5, GiB, remaining=90.0)]
    solo = job(1, task="solo", waited=600.0)
    result = plan(
        [solo, job(2, duration=80.0), job(3, duration=100.0)], running, snapshot(), configured
    )
    assert result.admit == ("q0002",)
    assert "should start within 1m30s" in result.waiting["q0003"]


def _earliest_fit(
    holder: QueuedJob,
    free_cpus: float,
    free_memory: int,
    slots: int,
    releases: list[tuple[float | None, float, int]],
    exclusive: bool,
) -> float:
    """When ``holder`` first fits as the jobs of ``releases`` (seconds left, cpus, memory)
    end, worked out step by step here; infinity when that waits for an unknown end."""
    if exclusive:
        ends = [left for left, _, _ in releases]
        return math.inf if None in ends else max([0.0, *(e or 0.0 for e in ends)])
    times = sorted({0.0, *(left for left, _, _ in releases if left is not None)})
    for at in times:
        ended = [(c, m) for left, c, m in releases if left is not None and left <= at]
        if (
            slots + len(ended) > 0
            and holder.request.cpus <= free_cpus + sum(c for c, _ in ended) + 1e-9
            and holder.request.memory <= free_memory + sum(m for _, m in ended)
        ):
            return at
    return math.inf


@settings(max_examples=1000, deadline=None)
@given(rich_scenarios(timed=True))
def test_backfill_never_delays_a_starving_job(scenario: Rich) -> None:
    """The first starving job, with nothing waiting for resources ahead of it, fits no
    later (by the expected ends) with the jobs admitted behind it than without them."""
    queue, running, machine, configured, _, _ = scenario
    # No GPUs (a GPU job's start is never foreseen: it gets no backfill).
    queue = [replace(j, request=replace(j.request, gpus=0, gpu_memory=0)) for j in queue]
    running = [
        replace(j, request=replace(j.request, gpus=0, gpu_memory=0), gpu_devices=())
        for j in running
    ]
    # The declared accounting alone: the live reading agrees with it.
    machine = replace(
        machine,
        memory_available=machine.memory_capacity,
        cpu_idle=machine.cpu_capacity,
        cpu_outside=None,
    )
    configured = replace(configured, starvation_after=300.0)
    result = plan(queue, running, machine, configured)
    index = next(
        (i for i, j in enumerate(queue) if "past starvation_after" in result.waiting.get(j.id, "")),
        None,
    )
    if index is None:
        return
    holder = queue[index]
    for ahead in queue[:index]:
        reason = result.waiting.get(ahead.id)
        if reason is not None and not (
            "can never start" in reason or reason.startswith("task limit")
        ):
            return  # a job ahead waits for resources too: it comes first
    admitted = _admitted(queue, result)
    before = [j for j in admitted if queue.index(j) < index]
    behind = [j for j in admitted if queue.index(j) > index]
    if not behind:
        return
    free = accounting(running, machine, configured)
    exclusive = configured.tasks[holder.task].exclusive

    def fit(jobs: list[QueuedJob]) -> float:
        releases = [
            (r.remaining, r.request.cpus, max(r.request.memory, r.memory_used)) for r in running
        ] + [(j.duration, j.request.cpus, j.request.memory) for j in jobs]
        return _earliest_fit(
            holder,
            free.declared_cpus - sum(j.request.cpus for j in jobs),
            free.declared_memory - sum(j.request.memory for j in jobs),
            configured.max_jobs - len(running) - len(jobs),
            releases,
            exclusive,
        )

    assert fit(before + behind) <= fit(before), (holder, behind, result.waiting[holder.id])


def test_run_time_is_the_learned_percentile_capped_by_the_timeout() -> None:
    assert run_time([], 95, 1.2, None).seconds is None
    assert run_time([], 95, 1.2, 62.0).seconds == 62.0
    learned = run_time([1.0, 2.0, 10.0], 50, 1.5, None)
    assert learned.seconds == 3.0
    assert learned.why == "p50 of the last 3 run(s)' wall times x learn_margin 1.5 = 3.0s"
    capped = run_time([100.0], 95, 1.2, 62.0)
    assert capped.seconds == 62.0 and capped.why.endswith("capped at timeout + kill_grace 1m02s")
    # A timeout of infinity (as a client may send it) bounds nothing.
    assert run_time([], 95, 1.2, math.inf).seconds is None
    assert run_time([2.0], 95, 1.0, math.inf).seconds == 2.0
