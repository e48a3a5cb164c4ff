"""Admission under real memory: real job processes allocate real memory, and an outside
process takes memory mid-run.

The probe is a small, controlled machine: its capacity is a budget (600 MiB) and its
available memory is the budget minus the real RSS, read through psutil on every tick, of
every process this test started (the job trees and the outside "hog").  That makes the
live reading real without depending on the shared host's free memory, which other work
on the machine moves by gigabytes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from jobserver.jobs import utcnow
from jobserver.resources import Snapshot

pytestmark = pytest.mark.anyio
MiB = 2**20
BUDGET = 600 * MiB


class BudgetProbe:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.me = psutil.Process()

    def used(self) -> int:
        total = 0
        for process in self.me.children(recursive=True):
            try:
                total += int(process.memory_info().rss)
            except psutil.Error:
                continue
        return total

    def snapshot(self) -> Snapshot:
        return Snapshot(
            cpu_capacity=8.0,
            memory_capacity=self.budget,
            cpu_idle=8.0,
            memory_available=max(0, self.budget - self.used()),
            memory_pressure=None,
            cpu_pressure=None,
            sources={
                "cpu_capacity": "test",
                "memory_capacity": "test budget",
                "cpu_idle": "test",
                "memory_available": "test budget minus real RSS",
            },
        )


def deadline_loop(timeout: float = 60) -> Any:
    end = time.monotonic() + timeout
    while True:
        yield
        assert time.monotonic() < end, "condition not met before the deadline"


async def test_admissions_fall_when_an_outside_process_takes_memory_and_recover(
    make_harness: Any, tmp_path: Path
) -> None:
    import anyio

    probe = BudgetProbe(BUDGET)
    tasks = {"hold": {"function": "sample_tasks:hold_memory", "cpus": 0.1, "memory": "60MiB"}}
    settings = {"max_memory": "600MiB", "memory_floor": 0, "memory_pressure_limit": "off"}
    hog: subprocess.Popen[bytes] | None = None
    async with make_harness(probe=probe, tasks=tasks, scheduler=settings) as h:
        scheduler = h.application.scheduler

        async def counts() -> dict[str, int]:
            return dict((await h.client.get("/api/v1/system")).json()["jobs"])

        gates = [tmp_path / f"gate-{i}" for i in range(12)]
        ids = []
        for gate in gates:
            response = await h.client.post(
                "/api/v1/jobs", json={"task": "hold", "args": {"mib": 40, "path": str(gate)}}
            )
            ids.append(response.json()["id"])
        by_gate = dict(zip(ids, gates, strict=True))

        # 1. 600 MiB / 60 MiB: up to ten run (each also has some interpreter overhead,
        # which the live reading sees); the rest wait for memory.
        for _ in deadline_loop():
            found = await counts()
            if found["running"] >= 8 and probe.used() >= found["running"] * 40 * MiB:
                break
            await anyio.sleep(0.05)
        for _ in range(5):
            await scheduler.tick(utcnow())
        settled = await counts()
        assert settled["running"] >= 8 and settled["queued"] >= 2

        try:
            # 2. Something else takes 250 MiB; then four jobs finish.
            hog = subprocess.Popen(
                [sys.executable, "-c", "import time; b = b'x' * (250 * 2**20); time.sleep(120)"]
            )
            for _ in deadline_loop():
                if psutil.Process(hog.pid).memory_info().rss >= 250 * MiB:
                    break
                await anyio.sleep(0.05)
            running = [
                job["id"] for job in (await h.client.get("/api/v1/system")).json()["running"]
            ]
            assert len(running) == settled["running"]
            for job_id in running[:4]:
                by_gate[job_id].write_text("go")
            for job_id in running[:4]:
                await h.wait_for_state(job_id, "succeeded")
            # Declared accounting alone would start waiting jobs (4 x 60 MiB freed); the
            # live reading holds them: the hog took that memory.
            for _ in range(5):
                await scheduler.tick(utcnow())
            held = await counts()
            assert held == {"queued": settled["queued"], "running": settled["running"] - 4}
            head = (await h.client.get("/api/v1/system")).json()["queue_head"]
            assert all(job["waiting_reason"].startswith("waiting for memory") for job in head)

            # 3. The hog lets go: admissions recover.
            hog.kill()
            hog.wait(timeout=10)
            for _ in deadline_loop():
                if (await counts())["running"] >= min(12 - 4, settled["running"] - 1):
                    break
                await anyio.sleep(0.05)
        finally:
            if hog is not None and hog.poll() is None:
                hog.kill()
                hog.wait(timeout=10)
            for gate in gates:
                gate.write_text("go")
        for job_id in ids:
            await h.wait_for_state(job_id, "succeeded")
