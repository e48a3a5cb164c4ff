"""Packing benchmark: jobserver's scheduler against a fixed concurrency (celery -c N).

Two workloads of 40 jobs each, under a cap of 6 GiB for the jobs:

- ``memory``: jobs that really allocate and hold 0.5-3 GiB for 1-3 s each;
- ``mixed``: the same kind of memory-bound jobs (60%) and CPU-bound jobs (40%) that burn
  1.5-3 CPU seconds each in 64 MiB, where what each job declares it needs in CPUs matters
  (a memory-bound job declares 0.01 CPU, a CPU-bound one 1 CPU).

Each is run (a) by jobserver's scheduler, each task declaring its memory and CPUs, with
``max_memory`` = the cap, and (b) with the resource checks off and a fixed
``max_jobs = N`` (what ``celery --concurrency=N`` does), for several seeds, every mode
once per seed.  For each run: makespan; the jobs' peak memory and cap violations (episodes
of it above the cap, and the time above), read every 20 ms from the usage of the "box"
cgroup that holds the whole run (the kernel's count: a sum of RSS counts the pages that
forked jobs share twice), less what the box held before the first job (the server); kills
(the kernel OOM-killer's count in the box); failed jobs.  Then, per mode, the median over
the seeds (and the spread), and the workload's own lower bound: the larger of the memory
its jobs hold (GiB x s) over the cap and the CPU time they need (faulting their pages in,
measured here per GiB, plus the CPU-bound jobs' work) over the cores.

The box is a memory cgroup of --box (7 GiB): a fixed N that overshoots is OOM-killed
inside it instead of taking the shared machine down (the OOM killer picks the biggest
process: a job, not the server of a few dozen MiB).  Needs root and a writable cgroup v1
memory controller (or cgroup v2 with a delegated subtree).

    python bench/packing.py                      # both workloads, 3 seeds, all modes
    python bench/packing.py --workloads memory --seeds 1 --modes jobserver,3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

from jobserver.cgroups import JobCgroups
from jobserver.config import format_size, parse_size

BENCH_DIR = Path(__file__).resolve().parent
SIZES_MIB = (512, 1024, 1536, 2048, 2560, 3072)
SPIN_MIB = 64  # what a CPU-bound job holds
OVERHEAD_MIB = 32  # the interpreter and the job runner around the allocation
WORKLOADS = ("memory", "mixed")


@dataclass(frozen=True)
class Job:
    kind: str  # "hold" (memory-bound) or "spin" (CPU-bound)
    mib: int  # what it allocates
    seconds: float  # how long it holds it (hold), or CPU seconds it burns (spin)

    @property
    def task(self) -> str:
        return f"hold_{self.mib}" if self.kind == "hold" else "spin"

    @property
    def args(self) -> dict[str, float]:
        if self.kind == "hold":
            return {"mib": self.mib, "seconds": self.seconds}
        return {"cpu_seconds": self.seconds, "mib": self.mib}


@dataclass
class Result:
    workload: str
    seed: int
    mode: str
    started: str  # UTC time of day
    load: float  # 1-minute load average at the start
    makespan: float
    peak_memory: int  # the jobs' peak, from the box cgroup's usage
    violations: int
    over_seconds: float
    kills: int
    failed: int
    succeeded: int


def fault_seconds_per_gib(mib: int = 256) -> float:
    """CPU seconds this machine spends faulting in one GiB (measured in a child process,
    as the jobs do it)."""
    report = "import resource\nr = resource.getrusage(resource.RUSAGE_SELF)\n"
    report += "print(r.ru_utime + r.ru_stime)\n"
    touch = f"b = bytearray({mib} * 2**20)\nmemoryview(b)[::4096] = b'\\x01' * (len(b) // 4096)\n"

    def cpu_of(code: str) -> float:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        return float(done.stdout)

    used = statistics.median(cpu_of(touch + report) for _ in range(3))
    base = statistics.median(cpu_of(report) for _ in range(3))
    return max(0.0, used - base) * 1024 / mib


def lower_bounds(jobs: list[Job], cap: int, cpus: int, per_gib: float) -> tuple[float, float]:
    """No schedule can finish sooner than either figure (seconds): the memory the jobs hold,
    GiB x s, over the cap (a CPU-bound job holds its memory at least its CPU seconds); the
    CPU time they need, faulting their pages in and burning CPU, over the cores."""
    memory = sum((job.mib + OVERHEAD_MIB) * 2**20 * job.seconds for job in jobs) / cap
    faulting = sum(job.mib for job in jobs) / 1024 * per_gib
    burning = sum(job.seconds for job in jobs if job.kind == "spin")
    return memory, (faulting + burning) / cpus


def workload(name: str, jobs: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    found = []
    for _ in range(jobs):
        if name == "mixed" and rng.random() < 0.4:
            found.append(Job("spin", SPIN_MIB, round(rng.uniform(1.5, 3.0), 2)))
        else:
            found.append(Job("hold", rng.choice(SIZES_MIB), round(rng.uniform(1.0, 3.0), 2)))
    return found


def write_config(directory: Path, mode: str, cap: int, port: int) -> Path:
    lines = [
        f'task_paths = ["{BENCH_DIR}"]',
        "",
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'log_level = "warning"',
        "access_log = false",
        "",
        "[scheduler]",
        'poll_interval = "100ms"',
        "reserve_cpus = 0",
        "reserve_memory = 0",
        "job_cgroups = false",
    ]
    if mode == "jobserver":
        lines += [f"max_memory = {cap}", "max_jobs = 64"]
    else:  # resource checks off: only max_jobs limits
        lines += [
            f"max_jobs = {int(mode)}",
            "memory_floor = 0",
            'memory_pressure_limit = "off"',
            "hysteresis = 0",
        ]
    tasks = [(f"hold_{size}", "hold", size, 0.01) for size in SIZES_MIB]
    tasks.append(("spin", "spin", SPIN_MIB, 1.0))
    for name, function, mib, cpus in tasks:
        declared = mode == "jobserver"
        lines += [
            "",
            f"[tasks.{name}]",
            f'function = "packing_task:{function}"',
            f'memory = "{mib + OVERHEAD_MIB if declared else 1}MiB"',
            # Memory-bound jobs mostly sleep; a CPU-bound one needs a whole CPU.
            f"cpus = {cpus if declared else 0.01}",
        ]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Sampler(threading.Thread):
    """Reads the box's usage every 20 ms: the jobs' memory is what it holds beyond
    ``baseline`` (the server, before the first job)."""

    def __init__(self, box: Box, baseline: int, cap: int) -> None:
        super().__init__(daemon=True)
        self.box = box
        self.baseline = baseline
        self.cap = cap
        self.peak = 0
        self.violations = 0
        self.over_seconds = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        over = False
        last = time.monotonic()
        while not self.stop_event.is_set():
            total = max(0, (self.box.group.usage() or 0) - self.baseline)
            now = time.monotonic()
            self.peak = max(self.peak, total)
            if total > self.cap:
                if not over:
                    self.violations += 1
                self.over_seconds += now - last
            over = total > self.cap
            last = now
            time.sleep(0.02)


class Box:
    """A memory cgroup holding one run (the server and its jobs), limited to ``limit``."""

    def __init__(self, name: str, limit: int) -> None:
        cgroups = JobCgroups.detect()
        if cgroups is None:
            raise SystemExit("no writable memory cgroup: run as root on a host with one")
        group = cgroups.create(name, limit)
        if group is None:
            raise SystemExit("could not create the box cgroup")
        self.group = group

    def add(self, pid: int) -> None:
        self.group.procs.write_text(str(pid))

    def close(self) -> None:
        for _ in range(50):
            if self.group.remove():
                return
            time.sleep(0.1)


def run_mode(name: str, seed: int, mode: str, jobs: list[Job], cap: int, limit: int) -> Result:
    box = Box(f"packing-box-{os.getpid()}-{name}-{seed}-{mode}", limit)
    try:
        return _run_in(box, name, seed, mode, jobs, cap)
    finally:
        box.close()


def _run_in(box: Box, name: str, seed: int, mode: str, jobs: list[Job], cap: int) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"packing-{mode}-") as tmp:
        directory = Path(tmp)
        port = free_port()
        config = write_config(directory, mode, cap, port)
        subprocess.run(
            [sys.executable, "-m", "jobserver", "migrate", "--config", str(config)],
            check=True,
            capture_output=True,
        )
        log = (directory / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "jobserver", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            box.add(server.pid)
            # Keep the kernel's OOM killer off the server where allowed; without it, the
            # jobs (gigabytes each) are still chosen before the server (tens of MiB).
            with contextlib.suppress(OSError):
                Path(f"/proc/{server.pid}/oom_score_adj").write_text("-1000")
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError((directory / "server.log").read_text())
                time.sleep(0.05)
            kills_before = box.group.oom_kills()
            sampler = Sampler(box, box.group.usage() or 0, cap)
            sampler.start()
            load = os.getloadavg()[0]
            clock = datetime.now(UTC).strftime("%H:%M:%S")
            started = time.monotonic()
            ids = []
            with httpx.Client(base_url=url, timeout=30) as client:
                for job in jobs:
                    response = client.post(
                        "/api/v1/jobs", json={"task": job.task, "args": job.args}
                    )
                    response.raise_for_status()
                    ids.append(response.json()["id"])
                states: dict[str, dict[str, object]] = {}
                while len(states) < len(ids):
                    for job_id in ids:
                        if job_id in states:
                            continue
                        document = client.get(f"/api/v1/jobs/{job_id}").json()
                        if document["state"] in ("succeeded", "failed", "cancelled"):
                            states[job_id] = document
                    time.sleep(0.05)
            makespan = time.monotonic() - started
            sampler.stop_event.set()
            sampler.join()
            kills = box.group.oom_kills() - kills_before
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
    return Result(
        workload=name,
        seed=seed,
        mode=mode,
        started=clock,
        load=load,
        makespan=makespan,
        peak_memory=sampler.peak,
        violations=sampler.violations,
        over_seconds=sampler.over_seconds,
        kills=kills,
        failed=sum(1 for d in states.values() if d["state"] == "failed"),
        succeeded=sum(1 for d in states.values() if d["state"] == "succeeded"),
    )


def _spread(values: list[float], unit: str = " s") -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.1f}{unit}"
    return f"{middle:.1f}{unit} ({min(values):.1f}-{max(values):.1f})"


def report(name: str, results: list[Result], cap: int, bounds: list[tuple[float, float]]) -> str:
    """The Markdown table of one workload: medians over the seeds, spread in brackets."""
    modes = sorted({r.mode for r in results}, key=lambda m: -1 if m == "jobserver" else int(m))
    seeds = sorted({r.seed for r in results})
    lines = [
        f"Workload `{name}`, seeds {', '.join(map(str, seeds))}: lower bound "
        + "; ".join(
            f"seed {seed}: {max(m, c):.1f} s (memory held {m:.1f} s, CPU {c:.1f} s)"
            for seed, (m, c) in zip(seeds, bounds, strict=True)
        ),
        "",
        "| run | makespan, median (min-max) | jobs' peak memory (box) | cap violations "
        "(time over cap) | kills | failed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, float] = {}
    clean: dict[str, bool] = {}
    complete: dict[str, bool] = {}
    for mode in modes:
        runs = [r for r in results if r.mode == mode]
        medians[mode] = statistics.median(r.makespan for r in runs)
        clean[mode] = all(r.violations == 0 and r.kills == 0 for r in runs)
        complete[mode] = all(r.failed == 0 and r.succeeded == len_jobs(r) for r in runs)
        label = (
            f"jobserver (max_memory {format_size(cap)})"
            if mode == "jobserver"
            else (f"fixed max_jobs = {mode}")
        )
        lines.append(
            f"| {label} | {_spread([r.makespan for r in runs])} | "
            f"{format_size(int(statistics.median(r.peak_memory for r in runs)))} | "
            f"{' / '.join(str(r.violations) for r in runs)} "
            f"({' / '.join(f'{r.over_seconds:.1f}' for r in runs)} s) | "
            f"{' / '.join(str(r.kills) for r in runs)} | "
            f"{' / '.join(str(r.failed) for r in runs)} |"
        )
    if "jobserver" in medians:
        ours = medians["jobserver"]
        fixed = [m for m in modes if m != "jobserver"]
        done = [m for m in fixed if complete[m]]
        safe = [m for m in fixed if clean[m]]
        lines += ["", *_per_seed(results, seeds)]
        bound = statistics.median(max(m, c) for m, c in bounds)
        lines += ["", f"- jobserver vs the lower bound (median {bound:.1f} s): {ours / bound:.2f}x"]
        if done:
            best = min(done, key=medians.__getitem__)
            lines.append(
                f"- vs the fastest fixed N that completed every job (N = {best}, "
                f"{medians[best]:.1f} s): {ours / medians[best]:.2f}x (target <= 1.0x)"
            )
        if safe:
            best = min(safe, key=medians.__getitem__)
            lines.append(
                f"- vs the best fixed N without violations or kills (N = {best}, "
                f"{medians[best]:.1f} s): {ours / medians[best]:.2f}x (target <= 0.7x)"
            )
    return "\n".join(lines)


def _per_seed(results: list[Result], seeds: list[int]) -> list[str]:
    """The targets judged seed by seed: against the fastest fixed N that completed every
    job in that seed's run, and the fastest one without violations or kills."""
    lines = []

    def complete(run: Result) -> bool:
        return run.failed == 0

    def clean(run: Result) -> bool:
        return run.violations + run.kills == 0

    for what, good in (
        ("the fastest fixed N that completed every job", complete),
        ("the best fixed N without violations or kills", clean),
    ):
        ratios = []
        for seed in seeds:
            runs = [r for r in results if r.seed == seed]
            ours = next((r for r in runs if r.mode == "jobserver"), None)
            fixed = [r for r in runs if r.mode != "jobserver" and good(r)]
            if ours is None or not fixed:
                continue
            best = min(fixed, key=lambda r: r.makespan)
            ratios.append(f"seed {seed}: {ours.makespan / best.makespan:.2f}x (N = {best.mode})")
        lines.append(f"- seed by seed, vs {what}: {'; '.join(ratios)}")
    return lines


def len_jobs(result: Result) -> int:
    return result.failed + result.succeeded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--cap", default="6GiB", help="max_memory for jobserver; the cap")
    parser.add_argument("--box", default="7GiB", help="hard memory limit around each run")
    parser.add_argument("--modes", default="jobserver,2,3,4,5,6,8")
    parser.add_argument("--out", help="append each run's figures here, one JSON per line")
    options = parser.parse_args()
    cap, limit = parse_size(options.cap), parse_size(options.box)
    seeds = [int(seed) for seed in options.seeds.split(",")]
    cores = psutil.cpu_count() or 1
    per_gib = fault_seconds_per_gib()
    print(f"{cores} CPUs; faulting in 1 GiB takes {per_gib:.2f} s of CPU", file=sys.stderr)
    tables = []
    for name in options.workloads.split(","):
        results: list[Result] = []
        bounds = []
        for seed in seeds:
            jobs = workload(name, options.jobs, seed)
            bounds.append(lower_bounds(jobs, cap, cores, per_gib))
            modes = options.modes.split(",")
            # A different order per seed, so that a quiet or a busy spell of the shared
            # machine does not always fall on the same mode.
            random.Random(seed).shuffle(modes)
            for mode in modes:
                result = run_mode(name, seed, mode, jobs, cap, limit)
                print(result, file=sys.stderr, flush=True)
                if options.out:
                    with open(options.out, "a") as out:
                        out.write(json.dumps(asdict(result)) + "\n")
                results.append(result)
        tables.append(report(name, results, cap, bounds))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
