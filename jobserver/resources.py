"""What the machine has and what each job's processes use: measured here, decided elsewhere.

The only module that reads ``psutil``, cgroup files and PSI (``/proc/pressure``).  It
answers two questions and takes no decisions:

``MachineProbe.snapshot()``
    How much CPU and memory this process may use (its capacity: the host, narrowed by
    cgroup limits) and how much of it is free now.  cgroup v2, v1 (and the hybrid layout
    where the v1 controllers do the work) and no cgroup at all are handled.
``tree_usage(pid)`` and friends
    RSS and CPU time of one job's process tree; whether a recorded pid is still the same
    process; which processes carry a job's environment tag.

CPU idle comes from a private sampler (the difference of ``psutil.cpu_times()`` between
two snapshots), never ``psutil.cpu_percent``: that keeps its state per thread, so two
callers steal each other's interval.  Snapshots closer together than 50 ms reuse the
previous reading instead of shrinking the window.  ``MachineProbe.__init__`` takes the
first sample, so the first snapshot has a real window when it comes 50 ms or more later;
before any window exists, idle is estimated from the 1-minute load average
(``capacity - loadavg``, clipped to ``[0, capacity]``; its source is ``"loadavg"``).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import psutil

# A CPU window shorter than this is mostly rounding (the kernel counts in 10 ms ticks).
_MIN_WINDOW_S = 0.05

_PSUTIL = "psutil"
_V1 = "cgroup v1"
_V2 = "cgroup v2"
_PSI = "psi"
_LOADAVG = "loadavg"
_ABSENT = "absent"


@dataclass(frozen=True)
class Snapshot:
    """The machine as this process sees it at one moment.

    ``sources`` names, for each other field, where its value came from: ``"psutil"``,
    ``"cgroup v1"``, ``"cgroup v2"``, ``"psi"``, ``"loadavg"`` (CPU idle before the first
    sampling window) or ``"absent"`` (a pressure file that does not exist here).
    """

    cpu_capacity: float
    memory_capacity: int
    cpu_idle: float
    memory_available: int
    memory_pressure: float | None
    cpu_pressure: float | None
    sources: Mapping[str, str]
    # CPUs busy with work other than our jobs, as a moving average (``OutsideCpu``); None:
    # not measured (the probe alone does not know which CPU time is our jobs').
    cpu_outside: float | None = None


class Probe(Protocol):
    def snapshot(self) -> Snapshot: ...


@dataclass(frozen=True)
class _CpuLevel:
    """One cgroup directory on the way from ours up to its hierarchy's root."""

    directory: Path
    usage_file: Path | None  # cpuacct.usage (v1, ns) or cpu.stat (v2, usage_usec)


class MachineProbe:
    """Reads the host through psutil and our own cgroup's limits and usage from files.

    ``proc_root`` and ``cgroup_root`` are injectable so tests can build fake trees; only
    ``<proc_root>/self/cgroup`` and ``<proc_root>/pressure/*`` are read from
    ``proc_root`` (psutil always reads the real ``/proc``).  Our cgroup's location is read
    once, here; limits and usage are read on every snapshot, at every level from our
    cgroup up to the root (the tightest limit wins).  Safe to share between threads.
    """

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc_root = proc_root
        self._clock = clock
        self._lock = threading.Lock()

        v1, v2_path = _parse_proc_cgroup(_read_text(proc_root / "self" / "cgroup") or "")
        self._memory_version, self._memory_levels = _memory_levels(cgroup_root, v1, v2_path)
        self._cpu_version, self._cpu_levels = _cpu_levels(cgroup_root, v1, v2_path)

        # The CPU sampler: the previous sample and the readings of the last full window.
        self._prev_clock = clock()
        self._prev_times = psutil.cpu_times()
        self._prev_usage = self._read_cpu_usages()
        self._host_idle: float | None = None
        self._cgroup_rates: dict[Path, float] = {}

    def snapshot(self) -> Snapshot:
        sources: dict[str, str] = {}
        host_cpus = float(psutil.cpu_count() or os.cpu_count() or 1)

        # CPU capacity: the host, narrowed by the tightest cgroup quota.
        cpu_capacity = host_cpus
        sources["cpu_capacity"] = _PSUTIL
        quota_level: _CpuLevel | None = None
        for level, quota in self._cpu_quotas():
            if quota < cpu_capacity:
                cpu_capacity, quota_level = quota, level
                sources["cpu_capacity"] = self._cpu_version

        # Memory: the host, narrowed by the tightest cgroup limit (and its usage).
        memory = psutil.virtual_memory()
        memory_capacity = int(memory.total)
        memory_available = int(memory.available)
        sources["memory_capacity"] = sources["memory_available"] = _PSUTIL
        for limit, available in self._cgroup_memory(int(memory.total)):
            if limit < memory_capacity:
                memory_capacity = limit
                sources["memory_capacity"] = self._memory_version
            if available is not None and available < memory_available:
                memory_available = max(0, available)
                sources["memory_available"] = self._memory_version

        cpu_idle, sources["cpu_idle"] = self._cpu_idle(
            host_cpus, cpu_capacity, sources["cpu_capacity"], quota_level
        )

        memory_pressure = _read_psi(self._proc_root / "pressure" / "memory")
        cpu_pressure = _read_psi(self._proc_root / "pressure" / "cpu")
        sources["memory_pressure"] = _ABSENT if memory_pressure is None else _PSI
        sources["cpu_pressure"] = _ABSENT if cpu_pressure is None else _PSI

        return Snapshot(
            cpu_capacity=cpu_capacity,
            memory_capacity=memory_capacity,
            cpu_idle=cpu_idle,
            memory_available=memory_available,
            memory_pressure=memory_pressure,
            cpu_pressure=cpu_pressure,
            sources=sources,
        )

    # -- CPU ---------------------------------------------------------------------------

    def _cpu_quotas(self) -> list[tuple[_CpuLevel, float]]:
        quotas = []
        for level in self._cpu_levels:
            if self._cpu_version == _V1:
                quota = _read_int(level.directory / "cpu.cfs_quota_us")
                period = _read_int(level.directory / "cpu.cfs_period_us")
            else:
                fields = (_read_text(level.directory / "cpu.max") or "").split()
                quota = _parse_int(fields[0]) if len(fields) == 2 else None
                period = _parse_int(fields[1]) if len(fields) == 2 else None
            if quota is not None and period is not None and quota > 0 and period > 0:
                quotas.append((level, quota / period))
        return quotas

    def _read_cpu_usages(self) -> dict[Path, float]:
        """CPU seconds used by each cgroup level whose usage we can read."""
        usages: dict[Path, float] = {}
        for level in self._cpu_levels:
            if level.usage_file is None:
                continue
            if self._cpu_version == _V1:
                nanoseconds = _read_int(level.usage_file)
                if nanoseconds is not None:
                    usages[level.directory] = nanoseconds / 1e9
            else:
                microseconds = _read_keyed(level.usage_file, ("usage_usec",))
                if microseconds is not None:
                    usages[level.directory] = microseconds / 1e6
        return usages

    def _cpu_idle(
        self,
        host_cpus: float,
        capacity: float,
        capacity_source: str,
        quota_level: _CpuLevel | None,
    ) -> tuple[float, str]:
        """Idle CPUs: the host's idle over the last window, within the cgroup's quota."""
        with self._lock:
            now = self._clock()
            window = now - self._prev_clock
            if window >= _MIN_WINDOW_S:
                times = psutil.cpu_times()
                usages = self._read_cpu_usages()
                host_idle = _idle_cpus(self._prev_times, times, host_cpus)
                if host_idle is not None:
                    self._host_idle = host_idle
                self._cgroup_rates = {
                    directory: max(0.0, (used - self._prev_usage[directory]) / window)
                    for directory, used in usages.items()
                    if directory in self._prev_usage
                }
                self._prev_clock, self._prev_times, self._prev_usage = now, times, usages
            host_reading = self._host_idle
            cgroup_rate = (
                None if quota_level is None else self._cgroup_rates.get(quota_level.directory)
            )

        if host_reading is None:
            load = os.getloadavg()[0]
            idle, source = max(0.0, host_cpus - load), _LOADAVG
        else:
            idle, source = host_reading, _PSUTIL
        if capacity < idle:
            idle, source = capacity, capacity_source
        if cgroup_rate is not None and capacity - cgroup_rate < idle:
            idle, source = capacity - cgroup_rate, self._cpu_version
        return max(0.0, idle), source

    # -- memory ------------------------------------------------------------------------

    def _cgroup_memory(self, host_total: int) -> list[tuple[int, int | None]]:
        """(limit, limit minus non-reclaimable usage) for each level with a real limit."""
        if self._memory_version == _V1:
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
            cache_keys: tuple[str, ...] = ("total_inactive_file", "inactive_file")
        else:
            limit_name, usage_name = "memory.max", "memory.current"
            cache_keys = ("inactive_file",)
        found: list[tuple[int, int | None]] = []
        for directory in self._memory_levels:
            limit = _read_int(directory / limit_name)
            # v1 writes "no limit" as a huge page-rounded number; v2 writes "max".
            if limit is None or limit <= 0 or limit >= host_total:
                continue
            usage = _read_int(directory / usage_name)
            if usage is None:
                found.append((limit, None))
                continue
            # Inactive page cache is reclaimed before the limit bites, as in psutil's
            # "available"; Kubernetes' working set makes the same subtraction.
            cache = _read_keyed(directory / "memory.stat", cache_keys) or 0
            found.append((limit, limit - max(0, usage - cache)))
        return found


# -- outside CPU load ---------------------------------------------------------------------


class OutsideCpu:
    """The CPUs used by everything but our jobs, averaged over the last ``window`` seconds.

    Each reading is the busy CPUs (capacity - idle) less what our jobs used; readings are
    weighted by the time since the previous one, so a burst of ticks (every submit and
    exit wakes the scheduler) counts no more than the seconds it covers.  A job's start-up
    (its interpreter, faulting its memory in) shows here before its first usage sample
    does; over a window much longer than that burst it hardly moves the average.
    """

    def __init__(self, window: float) -> None:
        self.window = window
        self._readings: deque[tuple[float, float, float]] = deque()  # (time, weight, CPUs)
        self._last: float | None = None

    def update(self, now: float, busy: float, ours: float) -> float:
        """Add a reading at monotonic ``now``; the average over the window."""
        weight = 1.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        self._readings.append((now, weight, max(0.0, busy - ours)))
        while self._readings and now - self._readings[0][0] > self.window:
            self._readings.popleft()
        total = sum(weight for _, weight, _ in self._readings)
        if total <= 0:
            return self._readings[-1][2]
        return sum(weight * cpus for _, weight, cpus in self._readings) / total


# -- cgroup location --------------------------------------------------------------------


def _parse_proc_cgroup(text: str) -> tuple[dict[str, tuple[str, str]], str | None]:
    """``/proc/self/cgroup`` → ({v1 controller: (its hierarchy's name, path)}, v2 path)."""
    v1: dict[str, tuple[str, str]] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
            continue
        for controller in controllers.split(","):
            if controller:
                v1[controller] = (controllers, path)
    return v1, v2


def _chain(mount: Path, path: str) -> list[Path]:
    """Existing directories from our cgroup up to the hierarchy's root, leaf first.

    Inside a container without a cgroup namespace the path names a host directory
    that is not mounted here; then only the mount itself (the container's cgroup) exists.
    """
    parts = [part for part in PurePosixPath(path).parts if part != "/"]
    if ".." in parts:
        parts = []
    directories = []
    for depth in range(len(parts), -1, -1):
        directory = mount.joinpath(*parts[:depth])
        if directory.is_dir():
            directories.append(directory)
    return directories


def _v1_mount(cgroup_root: Path, controller: str, hierarchy: str) -> Path | None:
    # "cpu,cpuacct" is mounted under that name, usually with "cpu" and "cpuacct" links.
    for name in (hierarchy, controller):
        if (cgroup_root / name).is_dir():
            return cgroup_root / name
    return None


def _memory_levels(
    cgroup_root: Path, v1: dict[str, tuple[str, str]], v2_path: str | None
) -> tuple[str, list[Path]]:
    if "memory" in v1:
        hierarchy, path = v1["memory"]
        mount = _v1_mount(cgroup_root, "memory", hierarchy)
        if mount is not None:
            return _V1, _chain(mount, path)
    if v2_path is not None:
        # On a hybrid host the v2 tree (/sys/fs/cgroup/unified) has no memory files, and
        # the v2 path resolved against cgroup_root finds none either: no limit, as it is.
        return _V2, _chain(cgroup_root, v2_path)
    return _V2, []


def _cpu_levels(
    cgroup_root: Path, v1: dict[str, tuple[str, str]], v2_path: str | None
) -> tuple[str, list[_CpuLevel]]:
    if "cpu" in v1:
        hierarchy, path = v1["cpu"]
        mount = _v1_mount(cgroup_root, "cpu", hierarchy)
        if mount is not None:
            acct_mount: Path | None = None
            acct_path = path
            if "cpuacct" in v1:
                acct_hierarchy, acct_path = v1["cpuacct"]
                acct_mount = _v1_mount(cgroup_root, "cpuacct", acct_hierarchy)
            acct_levels = [] if acct_mount is None else _chain(acct_mount, acct_path)
            levels = []
            for directory in _chain(mount, path):
                own = directory / "cpuacct.usage"  # co-mounted cpu,cpuacct
                usage = (
                    own
                    if own.is_file()
                    else _matching_usage(mount, directory, acct_mount, acct_levels)
                )
                levels.append(_CpuLevel(directory, usage))
            return _V1, levels
    if v2_path is not None:
        levels = []
        for directory in _chain(cgroup_root, v2_path):
            stat = directory / "cpu.stat"
            levels.append(_CpuLevel(directory, stat if stat.is_file() else None))
        return _V2, levels
    return _V2, []


def _matching_usage(
    cpu_mount: Path, directory: Path, acct_mount: Path | None, acct_levels: list[Path]
) -> Path | None:
    """The cpuacct.usage file of the same cgroup when cpu and cpuacct are mounted apart."""
    if acct_mount is None:
        return None
    candidate = acct_mount / directory.relative_to(cpu_mount)
    if candidate in acct_levels and (candidate / "cpuacct.usage").is_file():
        return candidate / "cpuacct.usage"
    return None


# -- file reading -----------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _parse_int(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None  # "max", empty, garbage


def _read_int(path: Path) -> int | None:
    text = _read_text(path)
    return None if text is None else _parse_int(text)


def _read_keyed(path: Path, keys: tuple[str, ...]) -> int | None:
    """The value of the first of ``keys`` found in a "key value" per line file."""
    text = _read_text(path)
    if text is None:
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            values[fields[0]] = fields[1]
    for key in keys:
        if key in values:
            return _parse_int(values[key])
    return None


def _read_psi(path: Path) -> float | None:
    """``some avg10`` (percent of the last 10 s some task stalled) from a PSI file."""
    text = _read_text(path)
    if text is None:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for field in fields[1:]:
                key, _, value = field.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def _idle_cpus(before: Any, after: Any, cpus: float) -> float | None:
    """Idle CPUs averaged between two ``psutil.cpu_times()`` samples; None if no time passed."""

    def split(sample: Any) -> tuple[float, float]:
        fields = sample._asdict()
        idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
        # guest time is already counted in user and nice on Linux.
        total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
        return float(idle), float(total)

    idle_before, total_before = split(before)
    idle_after, total_after = split(after)
    elapsed = total_after - total_before
    if elapsed <= 0:
        return None
    fraction = min(1.0, max(0.0, (idle_after - idle_before) / elapsed))
    return fraction * cpus


# -- process trees ----------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """What one process tree uses now.

    ``rss`` sums every member's resident set, so pages shared after ``fork`` count once
    per process: an overestimate, which is the safe side for admission and limits.
    """

    rss: int
    cpu_seconds: float


_GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


def tree_usage(pid: int, children: Mapping[int, list[int]] | None = None) -> Usage | None:
    """RSS and user+system CPU seconds of ``pid`` and its live descendants.

    None if ``pid`` itself is gone.  Members that vanish, turn zombie or deny access
    while being read are skipped (a descendant that called ``setsid`` is still found:
    ``children()`` follows parent pids, not process groups).  ``children`` is a
    ``children_map()`` shared by the trees sampled in one pass (one scan of all
    processes instead of one per tree).
    """
    try:
        root = psutil.Process(pid)
        if children is None:
            members = [root, *root.children(recursive=True)]
        else:
            members = [root, *_descendants(pid, children)]
    except psutil.NoSuchProcess:
        return None
    except (psutil.ZombieProcess, psutil.AccessDenied):
        members = []
    rss = 0
    cpu_seconds = 0.0
    for member in members:
        try:
            with member.oneshot():
                rss += int(member.memory_info().rss)
                times = member.cpu_times()
                cpu_seconds += float(times.user + times.system)
        except _GONE:
            continue
    return Usage(rss=rss, cpu_seconds=cpu_seconds)


# --- performance (issue 6) ---------------------------------------------------------
# psutil's children(recursive=True) reads the parent of every process on the machine
# (~6 ms here) each time it is called: once per running job and sampling pass, that was
# 20 % of a core for 100 running jobs.  One scan per pass serves every job.


def children_map() -> dict[int, list[int]]:
    """Every process's child pids, from one scan of all processes."""
    found: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        ppid = process.info["ppid"]
        if ppid is not None:
            found.setdefault(ppid, []).append(process.pid)
    return found


def _descendants(pid: int, children: Mapping[int, list[int]]) -> list[psutil.Process]:
    members: list[psutil.Process] = []
    seen = {pid}
    pending = list(children.get(pid, ()))
    while pending:
        child = pending.pop()
        if child in seen:  # a recycled pid cannot make a loop
            continue
        seen.add(child)
        try:
            members.append(psutil.Process(child))
        except _GONE:
            continue
        pending.extend(children.get(child, ()))
    return members


def process_start_time(pid: int) -> float | None:
    """``pid``'s creation time (seconds since the epoch), None if there is no such process.

    Read once per started job: on Linux straight from /proc (what psutil computes, at a
    fifth of the cost of building a ``psutil.Process``)."""
    if sys.platform != "linux":
        try:
            return float(psutil.Process(pid).create_time())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
    except OSError:
        return None
    # Field 22 (starttime, in clock ticks since boot); the name before it may hold spaces.
    ticks = int(data[data.rfind(b")") + 2 :].split()[19])
    return _boot_time() + ticks / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@functools.cache
def _boot_time() -> float:
    return float(psutil.boot_time())


def is_same_process(pid: int, start_time: float) -> bool:
    """True only if ``pid`` exists and started at ``start_time``: pids are recycled."""
    started = process_start_time(pid)
    return started is not None and abs(started - start_time) < 0.01


def find_tagged_processes(env_key: str, value: str) -> list[int]:
    """Pids (other than ours) whose environment holds ``env_key=value``.

    Finds a dead server's leftover job processes, including those that left the job's
    process group with ``setsid``.  Processes we may not read are skipped.
    """
    own = os.getpid()
    found = []
    for process in psutil.process_iter():
        if process.pid == own:
            continue
        try:
            if process.environ().get(env_key) == value:
                found.append(process.pid)
        except (*_GONE, OSError):
            continue
    return sorted(found)


# -- GPUs (optional: NVML through the nvidia-ml-py package) -------------------------------


@dataclass(frozen=True)
class Gpu:
    """One GPU as NVML reports it now."""

    index: int  # what CUDA_VISIBLE_DEVICES names
    name: str
    memory_total: int
    memory_free: int


class GpuProbe(Protocol):
    def gpus(self) -> tuple[Gpu, ...] | None:
        """The GPUs now, or None when NVML does not answer (no driver, no nvidia-ml-py)."""
        ...


_NVML_RETRY_S = 60.0


class NvmlProbe:
    """GPUs through NVML.  ``nvidia-ml-py`` is optional (``pip install jobserver[gpu]``);
    without it, or without a driver, ``gpus()`` is None.  A failed start is retried at
    most once a minute, so a driver that loads later is found (``gpu_may_appear``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._nvml: Any = None
        self._tried_at: float | None = None
        self.problem: str | None = None

    def _start(self) -> Any:
        now = self._clock()
        if self._nvml is not None:
            return self._nvml
        if self._tried_at is not None and now - self._tried_at < _NVML_RETRY_S:
            return None
        self._tried_at = now
        try:
            import pynvml  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            self.problem = "the optional nvidia-ml-py package is not installed"
            return None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # pynvml.NVMLError and friends: no driver, no device
            self.problem = f"NVML did not start: {exc}"
            return None
        self._nvml, self.problem = pynvml, None
        return pynvml

    def gpus(self) -> tuple[Gpu, ...] | None:
        nvml = self._start()
        if nvml is None:
            return None
        try:
            found = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                found.append(
                    Gpu(
                        index=index,
                        name=name.decode() if isinstance(name, bytes) else str(name),
                        memory_total=int(memory.total),
                        memory_free=int(memory.free),
                    )
                )
        except Exception as exc:
            self.problem = f"NVML failed: {exc}"
            return None
        return tuple(found)
