"""Outside memory pressure, for real: a server and another program share one memory
cgroup (so the test can never starve the machine), the program takes most of what is
free mid-run, and admission follows the machine's real readings (MachineProbe, no fake)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobserver.cgroups import JobCgroup, JobCgroups
from tests.conftest import in_cgroup, poll_value, skip_for_want_of, write_config

MiB = 2**20
BOX = 1536 * MiB
POLL = 0.2  # the server's poll_interval, seconds
# What the outside program leaves free: room for the two short jobs that may start while
# it takes the rest (each holds 16 MiB and its interpreter's pages), less than one short
# job's request (256 MiB) once they are gone.
MARGIN = 140 * MiB

HOG = """
import sys
size = int(sys.argv[1])
block = bytearray(size)
block[::4096] = b"\\x01" * (len(block) // 4096 + (len(block) % 4096 > 0))
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def box() -> Iterator[JobCgroup]:
    """A memory cgroup of ``BOX`` bytes; whatever is left in it is killed at the end."""
    cgroups = JobCgroups.detect()
    if cgroups is None:
        skip_for_want_of("cgroup", "no writable memory cgroup here (needs root or a delegated one)")
    group = cgroups.create(f"pressure-box-{os.getpid()}", BOX)
    assert group is not None
    yield group
    deadline = time.monotonic() + 10
    while not group.remove():
        assert time.monotonic() < deadline, f"{group.path} stays busy"
        time.sleep(0.05)


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    document: dict[str, Any] = client.get(f"/api/v1/jobs/{job_id}").json()
    return document


def _started(client: httpx.Client, ids: list[str]) -> list[datetime]:
    found = []
    for job_id in ids:
        started = _job(client, job_id).get("started_at")
        if started:
            found.append(datetime.fromisoformat(started.replace("Z", "+00:00")))
    return found


def _now() -> datetime:
    return datetime.now().astimezone()


def test_an_outside_program_taking_the_memory_stops_admission_until_it_lets_go(
    tmp_path: Path, box: JobCgroup, server_factory: Any
) -> None:
    gate = tmp_path / "gate"
    config = write_config(
        tmp_path,
        scheduler={
            "poll_interval": f"{int(POLL * 1000)}ms",
            "reserve_memory": "64MiB",
            "max_jobs": 4,
            # The live reading is the rule under test: no floor, no host-wide PSI (the
            # machine is shared), no pressure action on the running jobs.
            "memory_floor": 0,
            "memory_pressure_limit": "off",
            "pressure_action": "none",
            "job_cgroups": False,
        },
        tasks={
            "long": {"function": "sample_tasks:hold_memory", "cpus": 0.1, "memory": "128MiB"},
            "short": {"function": "sample_tasks:hold_memory", "cpus": 0.1, "memory": "256MiB"},
        },
    )
    server = server_factory(config, cgroup_procs=box.procs)
    with httpx.Client(base_url=server.url, timeout=30) as client:

        def submit(task: str, **args: Any) -> str:
            response = client.post("/api/v1/jobs", json={"task": task, "args": args})
            assert response.status_code == 202, response.text
            job_id: str = response.json()["id"]
            return job_id

        # Two jobs that run through it all and fit whatever happens.
        longs = [submit("long", mib=96, path=str(gate), seconds=120) for _ in range(2)]
        poll_value(lambda: all(_job(client, i)["state"] == "running" for i in longs), timeout=30)
        shorts = [submit("short", mib=16, seconds=0.3) for _ in range(60)]
        # Admission flows: short jobs start and end, two at a time beside the long ones.
        poll_value(
            lambda: sum(_job(client, i)["state"] == "succeeded" for i in shorts) >= 4,
            timeout=60,
        )

        # The outside program takes all but MARGIN of what the box has free now.
        free = BOX - (box.usage() or 0)
        assert free > 300 * MiB, f"the box has only {free} bytes free"
        hog = subprocess.Popen(
            in_cgroup(box.procs, [sys.executable, "-c", HOG, str(free - MARGIN)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert hog.stdout is not None and hog.stdout.readline() == b"ready\n"
            taken = _now()
            # Within a tick admissions stop: the short jobs still running end, and then
            # nothing starts (what they free is less than one short job's request).

            def memory_reason() -> str | None:
                for job_id in shorts:
                    document = _job(client, job_id)
                    reason = document.get("waiting_reason") or ""
                    if document["state"] == "queued" and "waiting for memory" in reason:
                        return str(reason)
                return None

            reason = poll_value(memory_reason, "a waiting reason about memory", timeout=10)
            assert reason.startswith("waiting for memory: needs 256.0 MiB"), reason
            free_now = float(reason.split(", ")[1].split(" MiB")[0])
            assert free_now < 256, reason
            # Nothing may start while the program holds the memory: watch for a few
            # seconds of ticks (an absence can only be watched over a while).
            watch_until = time.monotonic() + 3.0
            while time.monotonic() < watch_until:
                assert hog.poll() is None, "the outside program was killed"
                time.sleep(POLL)
            late = [t for t in _started(client, shorts) if t > taken]
            # One tick may have read the machine just before the program took it.
            assert all((t - taken).total_seconds() <= 2 * POLL + 0.5 for t in late), late
            # The long jobs fit and survive.
            assert all(_job(client, i)["state"] == "running" for i in longs)
            released = _now()
        finally:
            hog.communicate(b"", timeout=30)
        # Admissions recover within a few ticks.
        recovered = poll_value(
            lambda: [t for t in _started(client, shorts) if t > released] or None, timeout=10
        )
        assert (min(recovered) - released).total_seconds() <= 10 * POLL + 1.0, recovered
        gate.touch()
        for job_id in longs:
            document = poll_value(
                lambda j=job_id: (d := _job(client, j))["state"] != "running" and d, timeout=30
            )
            assert document["state"] == "succeeded" and document["attempts"] == 1, document
