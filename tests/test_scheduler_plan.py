"""plan(): which queued jobs start now, checked by examples and by hypothesis properties."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from jobserver.resources import Snapshot
from jobserver.scheduler import Limits, Plan, QueuedJob, Request, RunningJob, plan

GiB = 1024**3
MiB = 1024**2
TOLERANCE = 1e-6


def snapshot(
    cpus: float = 4.0,
    memory: int = 16 * GiB,
    cpu_idle: float | None = None,
    memory_available: int | None = None,
) -> Snapshot:
    return Snapshot(
        cpu_capacity=cpus,
        memory_capacity=memory,
        cpu_idle=cpus if cpu_idle is None else cpu_idle,
        memory_available=memory if memory_available is None else memory_available,
        memory_pressure=None,
        cpu_pressure=None,
        sources={},
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
    # One of our jobs runs (using its full 0.5 CPU), so the live reading applies.
    machine = snapshot(cpus=4.0, cpu_idle=1.4)
    busy = started(queued(9, cpus=0.5, memory=0), cpus_used=0.5)
    result = plan([queued(1, cpus=1.0, memory=0)], [busy], machine, limits(reserve_cpus=1.0))
    assert result.waiting["q0001"] == "waiting for CPU: needs 1.00 CPU, 0.40 free after reserve"


def test_busy_cpus_never_stall_an_idle_server() -> None:
    # Other programs keep every CPU busy and none of our jobs runs: CPU is compressible,
    # so the first job whose declared request fits starts anyway; the second waits.
    machine = snapshot(cpus=4.0, cpu_idle=0.0)
    result = plan(
        [queued(1, cpus=1.0, memory=0), queued(2, cpus=1.0, memory=0)], [], machine, limits()
    )
    assert result.admit == ("q0001",)
    assert result.waiting["q0002"].startswith("waiting for CPU")


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
requests = st.builds(Request, cpus=cpu_amounts, memory=memory_amounts)
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
def scenarios(draw: st.DrawFn) -> tuple[list[QueuedJob], list[RunningJob], Snapshot, Limits]:
    queue_requests = draw(st.lists(requests, max_size=30))
    size = len(queue_requests)
    priorities = sorted(draw(st.lists(st.integers(-3, 3), min_size=size, max_size=size)))
    queue = [
        QueuedJob(id=f"q{i:04d}", task="t", priority=p, request=r)
        for i, (p, r) in enumerate(zip(reversed(priorities), queue_requests, strict=True))
    ]
    running = [draw(running_job(i)) for i in range(draw(st.integers(0, 6)))]

    cpu_capacity = draw(
        st.sampled_from([1.0, 2.0, 4.0, 8.0, 16.0, 64.0])
        | st.floats(min_value=0.5, max_value=64.0, allow_nan=False)
    )
    memory_capacity = draw(
        st.sampled_from([8 * GiB, 16 * GiB, 64 * GiB, 256 * GiB])
        | st.integers(min_value=GiB, max_value=256 * GiB)
    )
    reading = draw(st.sampled_from(["consistent", "disagrees", "all free"]))
    if reading == "consistent":
        # The running jobs' measured use and other processes take from free.
        other_cpus = cpu_capacity * draw(fractions)
        other_memory = int(memory_capacity * draw(fractions))
        cpu_idle = cpu_capacity - other_cpus - sum(job.cpus_used for job in running)
        memory_available = memory_capacity - other_memory - sum(job.memory_used for job in running)
        cpu_idle, memory_available = max(0.0, cpu_idle), max(0, memory_available)
    elif reading == "disagrees":  # Measurements lag and disagree.
        cpu_idle = cpu_capacity * draw(any_fractions)
        memory_available = int(memory_capacity * draw(any_fractions))
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
    )
    configured = Limits(
        max_jobs=draw(st.sampled_from([4, 20, 100]) | st.integers(min_value=0, max_value=20)),
        max_cpus=draw(st.sampled_from([None, None, None, 0.5, 2.0, 8.0])),
        max_memory=draw(st.sampled_from([None, None, None, 512 * MiB, 4 * GiB, 32 * GiB])),
        reserve_cpus=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        reserve_memory=draw(st.sampled_from([0, 256 * MiB, GiB])),
    )
    return queue, running, machine, configured


Scenario = tuple[list[QueuedJob], list[RunningJob], Snapshot, Limits]


def _admitted(queue: list[QueuedJob], result: Plan) -> list[QueuedJob]:
    by_id = {job.id: job for job in queue}
    return [by_id[job_id] for job_id in result.admit]


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_every_job_is_admitted_or_waits_with_a_reason(scenario: Scenario) -> None:
    queue, running, machine, configured = scenario
    result = plan(queue, running, machine, configured)
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
    queue, running, machine, configured = scenario
    result = plan(queue, running, machine, configured)
    admitted = _admitted(queue, result)
    if not admitted:
        return
    capacity_cpus = machine.cpu_capacity
    if configured.max_cpus is not None:
        capacity_cpus = min(capacity_cpus, configured.max_cpus)
    capacity_memory = machine.memory_capacity
    if configured.max_memory is not None:
        capacity_memory = min(capacity_memory, configured.max_memory)
    admitted_cpus = sum(job.request.cpus for job in admitted)
    admitted_memory = sum(job.request.memory for job in admitted)

    claimed_cpus = sum(max(job.request.cpus, job.cpus_used) for job in running)
    claimed_memory = sum(max(job.request.memory, job.memory_used) for job in running)
    assert admitted_cpus + claimed_cpus <= capacity_cpus - configured.reserve_cpus + TOLERANCE
    assert admitted_memory + claimed_memory <= capacity_memory - configured.reserve_memory

    unused_cpus = sum(max(0.0, job.request.cpus - job.cpus_used) for job in running)
    unused_memory = sum(max(0, job.request.memory - job.memory_used) for job in running)
    live_cpus = machine.cpu_idle - unused_cpus - configured.reserve_cpus
    if running:
        assert admitted_cpus <= live_cpus + TOLERANCE
        assert result.headroom.cpus >= -TOLERANCE
    else:
        # CPU is compressible: a server running none of its jobs may start its first job on
        # CPUs that other programs keep busy, but no more than that one beyond live free.
        first = admitted[0].request.cpus
        assert admitted_cpus <= max(first, live_cpus) + TOLERANCE
        assert result.headroom.cpus >= min(0.0, live_cpus - first) - TOLERANCE
    assert admitted_memory <= (machine.memory_available - unused_memory - configured.reserve_memory)
    assert result.headroom.memory >= 0


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_never_more_than_max_jobs(scenario: Scenario) -> None:
    queue, running, machine, configured = scenario
    result = plan(queue, running, machine, configured)
    assert len(result.admit) <= max(0, configured.max_jobs - len(running))


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_never_an_idle_machine_while_a_fitting_job_waits(scenario: Scenario) -> None:
    queue, running, machine, configured = scenario
    result = plan(queue, running, machine, configured)
    slot_free = len(running) + len(result.admit) < configured.max_jobs
    for job in queue:
        if job.id in result.waiting:
            fits = (
                job.request.cpus <= result.headroom.cpus + 1e-9
                and job.request.memory <= result.headroom.memory
            )
            assert not (slot_free and fits), (job, result.waiting[job.id], result.headroom)


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=100),
    fits=st.integers(min_value=1, max_value=8),
    request=requests.filter(lambda r: r.memory >= MiB and r.cpus >= 0.1),
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
