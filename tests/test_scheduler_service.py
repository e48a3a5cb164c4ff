"""The Scheduler service with real child processes; a fake probe sets the machine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

from jobserver.errors import StorageUnavailable
from jobserver.jobs import utcnow
from jobserver.maintenance import Reconciler
from jobserver.store import OUTCOME_FILE, NewJob
from jobserver.store.driver import Driver, Operation
from tests.conftest import FakeProbe, GiB, PassThroughDriver, insert

pytestmark = pytest.mark.anyio

T = TypeVar("T")

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


# -- an outcome the store cannot take -------------------------------------------------------


class FailingEnds(PassThroughDriver):
    """The real driver, except that the repository's ``end_attempt`` writes fail with
    ``StorageUnavailable`` (what a full disk makes SQLite's writes do) ``failures`` times,
    or for as long as ``failing`` is set."""

    def __init__(
        self, inner: Driver, failures: int = 0, error: type[Exception] = StorageUnavailable
    ) -> None:
        super().__init__(inner)
        self.failures = failures
        self.error = error
        self.failing = False
        self.failed = 0

    async def write(self, op: Operation[T], *, batched: bool = True) -> T:
        if "end_attempt" in op.__qualname__ and (self.failing or self.failures > 0):
            self.failures -= 1
            self.failed += 1
            raise self.error("the database file cannot be written (disk full?)")
        return await self.inner.write(op, batched=batched)


def reconciler(h: Any) -> Reconciler:
    return Reconciler(
        h.application.store,
        h.application.scheduler.owned_attempts,
        h.settings.scheduler.max_rescues,
        h.settings.server.jobs_dir,
    )


async def no_attempt_left(h: Any) -> None:
    """Wait until the scheduler watches no attempt: its outcome, file included, is settled
    (the job's row shows the end as soon as it commits, a little before)."""
    deadline = time.monotonic() + 30
    while h.application.scheduler.owned_attempts() != frozenset():
        assert time.monotonic() < deadline, "an attempt was never settled"
        await anyio.sleep(0.02)


def failing_ends(drivers: list[FailingEnds], **options: Any) -> Callable[[Driver], Driver]:
    """A ``wrap_driver`` for the harness that keeps the driver it made in ``drivers``."""

    def wrap(inner: Driver) -> FailingEnds:
        drivers.append(FailingEnds(inner, **options))
        return drivers[-1]

    return wrap


async def end_while_failing(h: Any, driver: FailingEnds, gate: Path, text: str) -> tuple[str, Path]:
    """Run a gated job, make the store refuse its end, end it: its id and the path of its
    kept outcome, once kept."""
    response = await h.client.post(
        "/api/v1/jobs", json={"task": "gated", "args": {"path": str(gate)}}
    )
    job_id = response.json()["id"]
    await h.wait_for_state(job_id, "running")
    kept = h.settings.server.jobs_dir / job_id / OUTCOME_FILE
    driver.failing = True
    gate.write_text(text)
    deadline = time.monotonic() + 30
    while not kept.exists():
        assert time.monotonic() < deadline, "the outcome was never kept"
        await anyio.sleep(0.02)
    return job_id, kept


async def stored_state(h: Any, job_id: str) -> str:
    return str((await h.client.get(f"/api/v1/jobs/{job_id}")).json()["state"])


async def test_a_failed_outcome_write_is_kept_and_retried(
    make_harness: Any, tmp_path: Path
) -> None:
    drivers: list[FailingEnds] = []
    async with make_harness(tasks=GATED, wrap_driver=failing_ends(drivers)) as h:
        (driver,) = drivers
        job_id, kept = await end_while_failing(h, driver, tmp_path / "gate", "done")
        deadline = time.monotonic() + 30
        while driver.failed < 2:  # and retried
            assert time.monotonic() < deadline, "the write was never retried"
            await anyio.sleep(0.02)
        assert await stored_state(h, job_id) == "running"
        # Its attempt is still this server's while the write is retried: not an orphan.
        assert await reconciler(h).tick(utcnow()) == []
        document = json.loads(kept.read_text())
        assert document["attempt"] == 1
        assert document["end"]["state"] == "succeeded" and document["end"]["result"] == "done"

        driver.failing = False  # space is back
        job = await h.wait_for_state(job_id, "succeeded")
        assert job["result"] == "done" and job["attempts"] == 1
        await no_attempt_left(h)
        assert not kept.exists()


async def test_one_failed_outcome_write_leaves_no_file(make_harness: Any) -> None:
    drivers: list[FailingEnds] = []
    async with make_harness(wrap_driver=failing_ends(drivers, failures=1)) as h:
        response = await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 2}})
        job_id = response.json()["id"]
        job = await h.wait_for_state(job_id, "succeeded", "failed")
        assert (job["state"], job["result"], job["attempts"]) == ("succeeded", 2, 1)
        assert drivers[0].failed == 1
        await no_attempt_left(h)
        assert not (h.settings.server.jobs_dir / job_id / OUTCOME_FILE).exists()
        # The attempt is no longer this server's: nothing shows as running.
        assert (await h.client.get("/api/v1/system")).json()["jobs"]["running"] == 0


async def test_a_restart_applies_the_kept_outcome_instead_of_rerunning(
    make_harness: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    drivers: list[FailingEnds] = []
    async with make_harness(tasks=GATED, wrap_driver=failing_ends(drivers)) as h:
        job_id, kept = await end_while_failing(h, drivers[0], gate, "done once")
    # Stopped with the store still failing: the row says running, the file says how it ended.
    assert kept.exists()
    gate.write_text("a second run would say this")
    async with make_harness(tasks=GATED) as h:
        job = (await h.client.get(f"/api/v1/jobs/{job_id}")).json()
        assert (job["state"], job["result"], job["attempts"]) == ("succeeded", "done once", 1)
        assert [entry["outcome"] for entry in job["history"]] == ["succeeded"]
        assert not kept.exists()


async def test_the_reconciler_settles_a_running_row_no_attempt_owns(
    make_harness: Any, tmp_path: Path
) -> None:
    # An unexpected error (not the store being unavailable) drops the attempt's outcome:
    # the row says running while nothing runs.
    gate = tmp_path / "gate"
    drivers: list[FailingEnds] = []
    wrap = failing_ends(drivers, failures=1, error=RuntimeError)
    async with make_harness(tasks=GATED, wrap_driver=wrap) as h:
        gate.write_text("go")
        response = await h.client.post(
            "/api/v1/jobs", json={"task": "gated", "args": {"path": str(gate)}}
        )
        job_id = response.json()["id"]
        deadline = time.monotonic() + 30
        while drivers[0].failed == 0:
            assert time.monotonic() < deadline, "the write never failed"
            await anyio.sleep(0.02)
        await no_attempt_left(h)
        assert await stored_state(h, job_id) == "running"

        (settled,) = await reconciler(h).tick(utcnow())
        assert (settled.id, settled.state.value, settled.rescues) == (job_id, "queued", 1)
        assert "no longer watched" in (settled.reason or "")
        h.application.scheduler.wake()
        job = await h.wait_for_state(job_id, "succeeded")
        assert (job["attempts"], job["result"]) == (2, "go")
        assert [entry["outcome"] for entry in job["history"]] == ["interrupted", "succeeded"]
