"""The startup rescuer against real processes: leftovers are killed, recycled pids never."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobserver.events import Events, NullRecorder, Transition
from jobserver.jobs import JobState, utcnow
from jobserver.maintenance import WalCheckpointer, rescue_interrupted
from jobserver.resources import process_start_time
from jobserver.store import NewJob, SqliteDriver, Store, migrate, open_store
from tests.conftest import claim, insert
from tests.test_e2e import alive, wait_until

pytestmark = pytest.mark.anyio

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def environ_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


async def running_job(store: Store, pid: int | None, started: float | None) -> str:
    job = await claim(store, (await insert(store, NewJob("t", {}, 0, 0))).id)
    assert job is not None
    if pid is not None:
        await store.record_process(job.id, job.attempts, pid, started)
    return job.id


async def test_rescue_kills_the_leftover_and_requeues(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    migrate(tmp_path / "x.db")
    store = open_store(tmp_path / "x.db")
    try:
        leftover = subprocess.Popen(SLEEPER, start_new_session=True)
        processes.append(leftover)
        job_id = await running_job(store, leftover.pid, process_start_time(leftover.pid))
        rescued = await rescue_interrupted(store, max_rescues=3, now=utcnow())
        assert [job.id for job in rescued] == [job_id]
        leftover.wait(timeout=10)
        job = await store.get(job_id)
        assert job.state is JobState.QUEUED and job.rescues == 1
        assert "rescue 1 of 3" in (job.reason or "")
    finally:
        await store.close()


class Transitions(NullRecorder):
    """A recorder keeping every transition published (the recorder seam of Events)."""

    def __init__(self) -> None:
        self.seen: list[Transition] = []

    def transition(self, transition: Transition) -> None:
        self.seen.append(transition)


async def test_rescue_of_a_cancelled_job_publishes_running_to_cancelled(tmp_path: Path) -> None:
    migrate(tmp_path / "x.db")
    store = open_store(tmp_path / "x.db")
    try:
        job_id = await running_job(store, None, None)
        await store.request_cancel(job_id, utcnow())
        recorder = Transitions()
        rescued = await rescue_interrupted(store, 3, utcnow(), Events(recorder))
        assert [(job.id, job.state) for job in rescued] == [(job_id, JobState.CANCELLED)]
        (published,) = recorder.seen
        assert (published.job_id, published.source, published.target) == (
            job_id,
            JobState.RUNNING,
            JobState.CANCELLED,
        )
        assert published.reason is not None and "cancelled by request" in published.reason
        job = await store.get(job_id)
        assert job.state is JobState.CANCELLED and job.rescues == 0
    finally:
        await store.close()


async def test_rescue_never_signals_a_recycled_pid(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    migrate(tmp_path / "x.db")
    store = open_store(tmp_path / "x.db")
    try:
        stranger = subprocess.Popen(SLEEPER, start_new_session=True)
        processes.append(stranger)
        started = process_start_time(stranger.pid)
        assert started is not None
        # Same pid, different start time: a process that merely reuses the old pid.
        await running_job(store, stranger.pid, started - 100)
        await rescue_interrupted(store, max_rescues=3, now=utcnow())
        assert alive(stranger.pid)
    finally:
        await store.close()


async def test_rescue_finds_escaped_processes_by_their_tag(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    migrate(tmp_path / "x.db")
    store = open_store(tmp_path / "x.db")
    try:
        job_id = await running_job(store, None, None)
        escaped = subprocess.Popen(
            SLEEPER, start_new_session=True, env={**os.environ, "JOBSERVER_JOB_ID": job_id}
        )
        processes.append(escaped)
        wait_until(lambda: f"JOBSERVER_JOB_ID={job_id}" in environ_of(escaped.pid))
        await rescue_interrupted(store, max_rescues=3, now=utcnow())
        escaped.wait(timeout=10)
        assert escaped.returncode == -9
    finally:
        await store.close()


async def test_wal_checkpointer_truncates_once_the_reader_leaves(tmp_path: Path) -> None:
    database = tmp_path / "jobs.db"
    migrate(database)
    driver = SqliteDriver(database)
    store = Store(driver)
    try:
        checkpointer = WalCheckpointer(driver, max_size=16 * 1024)
        reader = sqlite3.connect(database, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()
        for _ in range(40):
            await insert(store, NewJob("t", {"x": "y" * 500}, 0, 0))
        assert driver.wal_size() > 16 * 1024
        pinned = await checkpointer.tick()
        assert pinned is not None and pinned.busy
        assert driver.wal_size() > 16 * 1024  # the reader's snapshot keeps the log
        reader.execute("COMMIT")
        reader.close()
        done = await checkpointer.tick()
        assert done is not None and not done.busy
        assert driver.wal_size() == 0
        assert await driver.integrity_check() == ["ok"]
        assert len(await store.page(limit=100)) == 40
    finally:
        await store.close()
