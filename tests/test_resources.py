"""resources: the machine probe against fake cgroup/proc trees, and real process trees."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from jobserver.resources import (
    MachineProbe,
    OutsideCpu,
    Snapshot,
    Usage,
    children_map,
    find_tagged_processes,
    is_same_process,
    process_start_time,
    tree_usage,
)
from tests.conftest import skip_for_want_of

GiB = 1024**3
MiB = 1024**2
V1_UNLIMITED = "9223372036854771712"
PSI_CPU = "some avg10=1.63 avg60=0.36 avg300=0.31 total=2203477\n"
PSI_MEMORY = (
    "some avg10=0.25 avg60=0.01 avg300=0.04 total=535545\n"
    "full avg10=0.10 avg60=0.01 avg300=0.04 total=482236\n"
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    (root / "self").mkdir(parents=True)
    return root


@pytest.fixture
def cgroup(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    return root


def host_cpus() -> float:
    return float(psutil.cpu_count())


def needs_host_memory(size: int) -> None:
    if psutil.virtual_memory().available < size:
        skip_for_want_of("memory", "the fake limits assume a host with more memory available")


# -- fake trees --------------------------------------------------------------------------


def test_cgroup_v1_tightest_limit_up_the_tree_wins(proc: Path, cgroup: Path) -> None:
    needs_host_memory(2 * GiB)
    write(proc / "self" / "cgroup", "12:memory:/app/job\n4:cpu,cpuacct:/app\n0::/\n")
    write(proc / "pressure" / "cpu", PSI_CPU)
    write(proc / "pressure" / "memory", PSI_MEMORY)
    memory = cgroup / "memory"
    write(memory / "memory.limit_in_bytes", V1_UNLIMITED)
    write(memory / "app" / "memory.limit_in_bytes", str(GiB))
    write(memory / "app" / "memory.usage_in_bytes", str(600 * MiB))
    write(memory / "app" / "memory.stat", f"cache 1\ntotal_inactive_file {100 * MiB}\n")
    write(memory / "app" / "job" / "memory.limit_in_bytes", str(GiB + 512 * MiB))
    write(memory / "app" / "job" / "memory.usage_in_bytes", str(300 * MiB))
    cpu = cgroup / "cpu,cpuacct"
    write(cpu / "cpu.cfs_quota_us", "-1")
    write(cpu / "cpu.cfs_period_us", "100000")
    write(cpu / "app" / "cpu.cfs_quota_us", "50000")
    write(cpu / "app" / "cpu.cfs_period_us", "100000")
    write(cpu / "app" / "cpuacct.usage", "0")

    snap = MachineProbe(proc, cgroup).snapshot()

    assert snap.memory_capacity == GiB
    assert snap.memory_available == GiB - 500 * MiB  # usage less inactive page cache
    assert snap.cpu_capacity == 0.5
    assert 0.0 <= snap.cpu_idle <= 0.5
    assert snap.cpu_pressure == 1.63
    assert snap.memory_pressure == 0.25
    assert snap.sources["memory_capacity"] == "cgroup v1"
    assert snap.sources["memory_available"] == "cgroup v1"
    assert snap.sources["cpu_capacity"] == "cgroup v1"
    assert snap.sources["cpu_pressure"] == snap.sources["memory_pressure"] == "psi"


def test_cgroup_v1_cpu_usage_narrows_idle_with_cpu_and_cpuacct_mounted_apart(
    proc: Path, cgroup: Path
) -> None:
    # This machine's layout: "cpu" and "cpuacct" are separate hierarchies.
    write(proc / "self" / "cgroup", "4:memory:/\n2:cpuacct:/jobs\n1:cpu:/jobs\n0::/\n")
    write(cgroup / "cpu" / "jobs" / "cpu.cfs_quota_us", "50000")
    write(cgroup / "cpu" / "jobs" / "cpu.cfs_period_us", "100000")
    usage = cgroup / "cpuacct" / "jobs" / "cpuacct.usage"
    write(usage, "5000000000")
    clock = FakeClock()
    probe = MachineProbe(proc, cgroup, clock=clock)

    clock.now += 1.0
    write(usage, str(5_000_000_000 + 300_000_000))  # 0.3 CPU over the last second
    snap = probe.snapshot()

    assert snap.cpu_capacity == 0.5
    assert snap.cpu_idle <= 0.2 + 1e-9
    if snap.sources["cpu_idle"] == "cgroup v1":  # unless the host itself was busier
        assert snap.cpu_idle == pytest.approx(0.2)

    # A second snapshot within 50 ms reuses the window instead of shrinking it.
    clock.now += 0.01
    write(usage, str(5_000_000_000 + 900_000_000))
    assert probe.snapshot().cpu_idle == snap.cpu_idle


def test_cgroup_v2_limits(proc: Path, cgroup: Path) -> None:
    needs_host_memory(2 * GiB)
    write(proc / "self" / "cgroup", "0::/user.slice/job.scope\n")
    write(cgroup / "cgroup.controllers", "cpu memory pids\n")
    slice_ = cgroup / "user.slice"
    write(slice_ / "memory.max", str(GiB))
    write(slice_ / "memory.current", str(400 * MiB))
    write(slice_ / "memory.stat", f"anon 1\ninactive_file {50 * MiB}\n")
    write(slice_ / "cpu.max", "150000 100000\n")
    write(slice_ / "cpu.stat", "usage_usec 100\nuser_usec 50\n")
    scope = slice_ / "job.scope"
    write(scope / "memory.max", "max\n")
    write(scope / "memory.current", str(100 * MiB))
    write(scope / "cpu.max", "max 100000\n")
    write(scope / "cpu.stat", "usage_usec 50\n")

    snap = MachineProbe(proc, cgroup).snapshot()

    assert snap.memory_capacity == GiB
    assert snap.memory_available == GiB - 350 * MiB
    assert snap.sources["memory_capacity"] == snap.sources["memory_available"] == "cgroup v2"
    assert snap.cpu_capacity == min(host_cpus(), 1.5)
    if host_cpus() > 1.5:
        assert snap.sources["cpu_capacity"] == "cgroup v2"
    assert 0.0 <= snap.cpu_idle <= snap.cpu_capacity
    assert snap.memory_pressure is None
    assert snap.cpu_pressure is None
    assert snap.sources["memory_pressure"] == snap.sources["cpu_pressure"] == "absent"


def test_container_without_cgroup_namespace_reads_the_mount_itself(
    proc: Path, cgroup: Path
) -> None:
    needs_host_memory(2 * GiB)
    # The host path is not mounted here; the container's cgroup is the mount's root.
    write(proc / "self" / "cgroup", "0::/docker/0123abcd\n")
    write(cgroup / "memory.max", str(GiB))
    write(cgroup / "memory.current", str(GiB - 100 * MiB))

    snap = MachineProbe(proc, cgroup).snapshot()

    assert snap.memory_capacity == GiB
    assert snap.memory_available == 100 * MiB


def test_hybrid_host_with_unlimited_v1_memory_uses_psutil(proc: Path, cgroup: Path) -> None:
    write(proc / "self" / "cgroup", "4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n")
    write(cgroup / "memory" / "memory.limit_in_bytes", V1_UNLIMITED)
    write(cgroup / "memory" / "process_api" / "abc" / "memory.limit_in_bytes", V1_UNLIMITED)
    write(cgroup / "memory" / "process_api" / "abc" / "memory.usage_in_bytes", str(GiB))
    write(cgroup / "cpu" / "cpu.cfs_quota_us", "-1")
    write(cgroup / "cpu" / "cpu.cfs_period_us", "100000")
    write(cgroup / "unified" / "cgroup.controllers", "hugetlb\n")

    snap = MachineProbe(proc, cgroup).snapshot()

    assert snap.memory_capacity == psutil.virtual_memory().total
    assert snap.cpu_capacity == host_cpus()
    assert snap.sources["memory_capacity"] == "psutil"
    assert snap.sources["memory_available"] == "psutil"
    assert snap.sources["cpu_capacity"] == "psutil"


def test_no_cgroup_no_psi(proc: Path, cgroup: Path) -> None:
    snap = MachineProbe(proc, cgroup).snapshot()  # no /proc/self/cgroup, no pressure

    assert snap.memory_capacity == psutil.virtual_memory().total
    assert snap.cpu_capacity == host_cpus()
    assert 0 < snap.memory_available <= snap.memory_capacity
    assert snap.memory_pressure is None and snap.cpu_pressure is None
    assert set(snap.sources) == {
        "cpu_capacity",
        "memory_capacity",
        "cpu_idle",
        "memory_available",
        "memory_pressure",
        "cpu_pressure",
    }


# -- this machine ------------------------------------------------------------------------


def test_real_snapshot_is_sane() -> None:
    probe = MachineProbe()
    for snap in (probe.snapshot(), probe.snapshot()):
        assert isinstance(snap, Snapshot)
        assert isinstance(snap.cpu_capacity, float) and snap.cpu_capacity >= 1.0
        assert isinstance(snap.memory_capacity, int) and snap.memory_capacity > 0
        assert isinstance(snap.cpu_idle, float)
        assert 0.0 <= snap.cpu_idle <= snap.cpu_capacity
        assert isinstance(snap.memory_available, int)
        assert 0 < snap.memory_available <= snap.memory_capacity
        for pressure in (snap.memory_pressure, snap.cpu_pressure):
            assert pressure is None or (isinstance(pressure, float) and 0.0 <= pressure <= 100.0)
        assert set(snap.sources.values()) <= {
            "psutil",
            "cgroup v1",
            "cgroup v2",
            "psi",
            "loadavg",
            "absent",
        }


# -- process trees -----------------------------------------------------------------------

HOLD_MEMORY = """
import subprocess, sys, time
data = b"x" * (50 * 1024 * 1024)
subprocess.Popen([sys.executable, "-c",
                  "import time; d = b'y' * (30 * 1024 * 1024); time.sleep(60)"])
time.sleep(60)
"""


def spawn(
    code: str, env: dict[str, str] | None = None, stdout: int | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, env=env, stdout=stdout
    )


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for child in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=10)
            if child.stdout is not None:
                child.stdout.close()


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def _holds(pid: int, rss: int) -> bool:
    """Whether ``pid``'s process tree holds at least ``rss`` bytes."""
    usage = tree_usage(pid)
    return usage is not None and usage.rss >= rss


def test_tree_usage_sums_a_real_process_tree(children: list[subprocess.Popen[bytes]]) -> None:
    child = spawn(HOLD_MEMORY)
    children.append(child)

    wait_for(lambda: _holds(child.pid, 80 * MiB))
    usage = tree_usage(child.pid)
    assert isinstance(usage, Usage)
    assert usage.cpu_seconds >= 0.0
    assert len(psutil.Process(child.pid).children(recursive=True)) == 1


def test_tree_usage_of_a_dead_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    started = process_start_time(child.pid)
    assert started is None
    assert tree_usage(child.pid) is None
    assert not is_same_process(child.pid, time.time())


def test_is_same_process_checks_the_start_time() -> None:
    started = process_start_time(os.getpid())
    assert started is not None
    assert is_same_process(os.getpid(), started)
    assert not is_same_process(os.getpid(), started - 1.0)
    assert not is_same_process(os.getpid(), started + 0.5)


def test_process_start_time_is_what_psutil_reports() -> None:
    # Read from /proc directly (issue 6); the rescuer compares it with stored values.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = process_start_time(child.pid)
        assert started is not None
        assert abs(started - psutil.Process(child.pid).create_time()) < 0.01
    finally:
        child.kill()
        child.wait()


def test_find_tagged_processes_finds_children_that_escaped_the_group(
    children: list[subprocess.Popen[bytes]],
) -> None:
    tag = uuid.uuid4().hex
    escaper = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    child = spawn(escaper, env={**os.environ, "JOBSERVER_TEST_TAG": tag}, stdout=subprocess.PIPE)
    children.append(child)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    try:
        assert os.getsid(grandchild) != os.getsid(child.pid)
        wait_for(
            lambda: set(find_tagged_processes("JOBSERVER_TEST_TAG", tag)) == {child.pid, grandchild}
        )
        assert find_tagged_processes("JOBSERVER_TEST_TAG", "other-" + tag) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(grandchild, signal.SIGKILL)


def test_tree_usage_from_one_shared_scan_finds_the_same_tree(
    children: list[subprocess.Popen[bytes]],
) -> None:
    """The scheduler samples every job's tree from one ``children_map()`` per pass; it
    must find the same members as psutil's per-tree walk."""
    child = spawn(HOLD_MEMORY)
    children.append(child)

    wait_for(lambda: _holds(child.pid, 80 * MiB))
    shared = children_map()
    grandchild = psutil.Process(child.pid).children(recursive=True)[0].pid
    assert shared[child.pid] == [grandchild]
    by_scan = tree_usage(child.pid, shared)
    by_walk = tree_usage(child.pid)
    assert by_scan is not None and by_walk is not None
    assert by_scan.rss >= 80 * MiB and by_walk.rss >= 80 * MiB
    # The same two processes: RSS agrees to within what they allocate between two reads.
    assert abs(by_scan.rss - by_walk.rss) < 8 * MiB
    assert tree_usage(child.pid + 10**7, shared) is None


# -- the outside CPU load, averaged ------------------------------------------------------


def test_a_start_up_burst_hardly_moves_the_outside_cpu_average() -> None:
    """A job's first second (2 CPUs busy before its usage is sampled: counted as outside)
    in 20 s of an otherwise idle machine, with ticks every 0.1 s during the burst."""
    window = OutsideCpu(20.0)
    now = 0.0
    for _ in range(19):
        now += 1.0
        window.update(now, busy=0.0, ours=0.0)
    for _ in range(10):
        now += 0.1
        average = window.update(now, busy=2.0, ours=0.0)
    assert average == pytest.approx(2.0 * 1.0 / 20.0, abs=0.01)
    # Once sampled, the job's own use is not outside.
    now += 1.0
    assert window.update(now, busy=2.0, ours=2.0) < 0.11


def test_a_sustained_outside_load_shows_in_full_within_the_window() -> None:
    window = OutsideCpu(20.0)
    now = 0.0
    for _ in range(30):
        now += 1.0
        average = window.update(now, busy=1.5, ours=0.25)
    assert average == pytest.approx(1.25)
