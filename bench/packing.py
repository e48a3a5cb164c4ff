"""Packing benchmark: jobserver's scheduler against a fixed concurrency (celery -c N).

40 jobs that really allocate and hold 0.5-3 GiB for 1-3 s each, under max_memory = 6GiB,
run (a) by jobserver's scheduler, with each task declaring its memory, and (b) with the
resource checks off and a fixed max_jobs = N for N = 1..8 (what ``celery --concurrency=N``
does).  For each: makespan, peak total RSS of the jobs, cap violations (episodes of the
jobs' total RSS above the cap, sampled every 20 ms), and kills; and the workload's own
lower bound: the larger of the memory it holds (GiB x s) over the cap and the CPU time of
faulting its pages in (measured here per GiB) over the cores.

The whole run (server and jobs) happens inside a memory cgroup "box" of --box (7 GiB)
so that a fixed N that overshoots cannot take the shared machine down: past the box
the kernel OOM-kills jobs in it, which is what the "kills" column counts (the OOM killer
picks the biggest process: a job, not the server of a few dozen MiB).  Needs root and a
writable cgroup v1 memory controller (or cgroup v2 with a delegated subtree); --no-box
runs without one (do not, with N > 2, on a machine with less than 24 GiB free).

    python bench/packing.py                # all modes, prints a Markdown table
    python bench/packing.py --modes jobserver,1,3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from jobserver.cgroups import JobCgroups
from jobserver.config import format_size, parse_size

BENCH_DIR = Path(__file__).resolve().parent
SIZES_MIB = (512, 1024, 1536, 2048, 2560, 3072)
OVERHEAD_MIB = 32  # the interpreter and the job runner around the allocation


@dataclass
class Result:
    mode: str
    makespan: float
    peak_rss: int
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

    used, base = cpu_of(touch + report), cpu_of(report)
    return max(0.0, used - base) * 1024 / mib


def lower_bounds(
    jobs: list[tuple[int, float]], cap: int, cpus: int, per_gib: float
) -> tuple[float, float]:
    """No schedule can finish sooner than either figure (seconds): the memory the jobs hold,
    GiB x s, over the cap; the CPU time of faulting their pages in, over the cores."""
    memory = sum((size + OVERHEAD_MIB) * 2**20 * seconds for size, seconds in jobs) / cap
    faulting = sum(size for size, _ in jobs) / 1024 * per_gib / cpus
    return memory, faulting


def workload(jobs: int, seed: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(rng.choice(SIZES_MIB), round(rng.uniform(1.0, 3.0), 2)) for _ in range(jobs)]


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
    for size in SIZES_MIB:
        memory = f'"{size + OVERHEAD_MIB}MiB"' if mode == "jobserver" else '"1MiB"'
        cpus = 0.01  # the jobs mostly sleep: this benchmark is about memory
        lines += [
            "",
            f"[tasks.hold_{size}]",
            'function = "packing_task:hold"',
            f"memory = {memory}",
            f"cpus = {cpus}",
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
    """Sums the RSS of the server's descendants (the jobs) every 20 ms."""

    def __init__(self, server_pid: int, cap: int) -> None:
        super().__init__(daemon=True)
        self.server = psutil.Process(server_pid)
        self.cap = cap
        self.peak = 0
        self.violations = 0
        self.over_seconds = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        over = False
        last = time.monotonic()
        while not self.stop_event.is_set():
            total = 0
            try:
                children = self.server.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    total += int(child.memory_info().rss)
                except psutil.Error:
                    continue
            now = time.monotonic()
            self.peak = max(self.peak, total)
            if total > self.cap:
                if not over:
                    self.violations += 1
                self.over_seconds += now - last
            over = total > self.cap
            last = now
            time.sleep(0.02)


def run_mode(
    mode: str, jobs: list[tuple[int, float]], cap: int, box: JobCgroupBox | None
) -> Result:
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
            if box is not None:
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
            sampler = Sampler(server.pid, cap)
            sampler.start()
            started = time.monotonic()
            ids = []
            with httpx.Client(base_url=url, timeout=30) as client:
                for size, seconds in jobs:
                    response = client.post(
                        "/api/v1/jobs",
                        json={"task": f"hold_{size}", "args": {"mib": size, "seconds": seconds}},
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
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            log.close()
    failed = [d for d in states.values() if d["state"] == "failed"]
    kills = [d for d in failed if "signal 9" in str(d.get("error") or {})]
    return Result(
        mode=mode,
        makespan=makespan,
        peak_rss=sampler.peak,
        violations=sampler.violations,
        over_seconds=sampler.over_seconds,
        kills=len(kills),
        failed=len(failed),
        succeeded=sum(1 for d in states.values() if d["state"] == "succeeded"),
    )


class JobCgroupBox:
    """A memory cgroup holding the server and its jobs, limited to ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        cgroups = JobCgroups.detect()
        if cgroups is None:
            raise SystemExit(
                "no writable memory cgroup: run as root on a host with one, or pass --no-box"
            )
        group = cgroups.create(f"packing-box-{os.getpid()}", limit)
        if group is None:
            raise SystemExit("could not create the box cgroup; pass --no-box to run without")
        self.group = group

    def add(self, pid: int) -> None:
        self.group.procs.write_text(str(pid))

    def close(self) -> None:
        for _ in range(50):
            if self.group.remove():
                return
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cap", default="6GiB", help="max_memory for jobserver; the cap")
    parser.add_argument("--box", default="7GiB", help="hard memory limit around each run")
    parser.add_argument("--no-box", action="store_true")
    parser.add_argument("--modes", default="jobserver,1,2,3,4,5,6,7,8")
    options = parser.parse_args()
    cap = parse_size(options.cap)
    jobs = workload(options.jobs, options.seed)
    box = None if options.no_box else JobCgroupBox(parse_size(options.box))
    total = sum(size for size, _ in jobs)
    print(
        f"{len(jobs)} jobs, {format_size(total * 2**20)} in all, cap {format_size(cap)}, "
        f"box {'none' if box is None else options.box}, {psutil.cpu_count()} CPUs",
        file=sys.stderr,
    )
    results = []
    try:
        for mode in options.modes.split(","):
            result = run_mode(mode, jobs, cap, box)
            print(result, file=sys.stderr)
            results.append(result)
    finally:
        if box is not None:
            box.close()
    memory_bound, cpu_bound = lower_bounds(
        jobs, cap, psutil.cpu_count() or 1, fault_seconds_per_gib()
    )
    print(
        f"Lower bound: {max(memory_bound, cpu_bound):.1f} s (memory held {memory_bound:.1f} s = "
        f"GiB x s / cap; page faults {cpu_bound:.1f} s = fault CPU time / cores)\n"
    )
    print("| run | makespan | peak total RSS | cap violations (time over cap) | kills | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        name = (
            "jobserver (max_memory 6GiB)" if r.mode == "jobserver" else f"fixed max_jobs = {r.mode}"
        )
        print(
            f"| {name} | {r.makespan:.1f} s | {format_size(r.peak_rss)} | "
            f"{r.violations} ({r.over_seconds:.1f} s) | {r.kills} | {r.failed} |"
        )


if __name__ == "__main__":
    main()
