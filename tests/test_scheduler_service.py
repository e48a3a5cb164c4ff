"""The Scheduler service with real child processes; a fake probe sets the machine."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from jobserver.jobs import utcnow
from jobserver.store import NewJob
from tests.conftest import FakeProbe, GiB, insert

pytestmark = pytest.mark.anyio

GATED = {"gated": {"function": "sample_tasks:wait_for_file", "cpus": 0.1, "memory": "1GiB"}}


async def test_a_burst_never_exceeds_what_fits(make_harness: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with make_harness(probe=FakeProbe(cpus=8, memory=4 * GiB), tasks=GATED) as h:
        ids = []
        for _ in range(30):
            response = await h.client.post(
                "/api/v1/jobs", json={"task": "gated", "args": {"path": str(gate)}}
            )
            ids.append(response.json()["id"])
        # Several ticks while the jobs run: their measured memory (a few MiB) is far below
        # their 1 GiB request and the fake machine's free memory never drops, so only the
        # claims of the running jobs keep the scheduler from starting more.
        for _ in range(5):
            await h.application.scheduler.tick(utcnow())
        counts = (await h.client.get("/api/v1/system")).json()["jobs"]
        assert counts == {"queued": 26, "running": 4}
        waiting = (await h.client.get(f"/api/v1/jobs/{ids[-1]}")).json()["waiting_reason"]
        assert waiting.startswith("waiting for memory: needs 1.0 GiB")

        gate.write_text("go")
        most = 0
        deadline = time.monotonic() + 60
        while True:
            counts = (await h.client.get("/api/v1/system")).json()["jobs"]
            most = max(most, counts["running"])
            if counts == {"queued": 0, "running": 0}:
                break
            assert time.monotonic() < deadline, counts
            await anyio.sleep(0.01)
        assert most <= 4
        states = {(await h.client.get(f"/api/v1/jobs/{i}")).json()["state"] for i in ids}
        assert states == {"succeeded"}


async def test_max_jobs_caps_concurrency(make_harness: Any, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    tasks = {"gated": {**GATED["gated"], "memory": "1MiB"}}
    async with make_harness(scheduler={"max_jobs": 2}, tasks=tasks) as h:
        for _ in range(5):
            await h.client.post("/api/v1/jobs", json={"task": "gated", "args": {"path": str(gate)}})
        for _ in range(3):
            await h.application.scheduler.tick(utcnow())
        counts = (await h.client.get("/api/v1/system")).json()["jobs"]
        assert counts == {"queued": 3, "running": 2}
        head = (await h.client.get("/api/v1/system")).json()["queue_head"]
        assert all("max_jobs" in job["waiting_reason"] for job in head)
        gate.write_text("go")


async def test_a_small_job_passes_a_large_waiting_one(make_harness: Any) -> None:
    async with make_harness(probe=FakeProbe(memory=4 * GiB)) as h:
        big = (await h.client.post("/api/v1/jobs", json={"task": "big", "args": {"a": 1}})).json()
        small = (await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})).json()
        await h.wait_for_state(small["id"], "succeeded")
        assert (await h.client.get(f"/api/v1/jobs/{big['id']}")).json()["state"] == "queued"


async def test_queued_job_of_a_removed_task_fails_clearly(make_harness: Any) -> None:
    async with make_harness() as h:
        job = await insert(h.application.store, NewJob("gone", {}, 0, 0))
        await h.application.scheduler.tick(utcnow())
        document = (await h.client.get(f"/api/v1/jobs/{job.id}")).json()
        assert document["state"] == "failed"
        assert "no longer in the config" in document["error"]["message"]
