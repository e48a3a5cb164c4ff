"""Real servers under real signals and under an admin's hands: graceful shutdown, leftover
processes after a crash, a reader and a writer in the sqlite3 shell, a full or read-only
disk."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, write_config
from tests.test_e2e import alive, job_row, submit, wait_for_job, wait_until

pytestmark = pytest.mark.integration


def stopped_listening(server: ServerProcess) -> bool:
    try:
        httpx.get(f"{server.url}/healthz", timeout=0.5)
    except httpx.HTTPError:
        return True
    return False


def draining(server: ServerProcess) -> bool:
    """The server has taken the first signal: it still answers, and says it is going."""
    return httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503


# -- graceful shutdown -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_waits_for_running_jobs_to_finish(
    tmp_path: Path, server_factory: Any, signum: int
) -> None:
    # max_jobs = 1: the second job waits for the first one's slot, which frees up during
    # the drain; it must not start then.
    config_path = write_config(
        tmp_path, server={"shutdown_grace": "30s"}, scheduler={"max_jobs": 1}
    )
    gate = tmp_path / "gate"
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(gate))
    queued = submit(server.url, "add", a=1)
    wait_for_job(server.url, job["id"], "running")
    server.process.send_signal(signum)
    wait_until(lambda: draining(server))
    time.sleep(0.3)  # the drain is under way; the job is still allowed to run
    assert server.process.poll() is None
    gate.write_text("finished during the grace period")
    assert server.process.wait(timeout=20) == 0
    row = job_row(tmp_path / "data" / "jobserver.db", job["id"])
    assert row["state"] == "succeeded" and row["attempts"] == 1
    assert job_row(tmp_path / "data" / "jobserver.db", queued["id"])["state"] == "queued"


def test_grace_expired_requeues_without_counting(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path, server={"shutdown_grace": "1s"})
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(tmp_path / "never"))
    wait_for_job(server.url, job["id"], "running")
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 15
    row = job_row(tmp_path / "data" / "jobserver.db", job["id"])
    assert row["state"] == "queued" and "shut down" in row["reason"]
    assert (row["rescues"], row["failures"]) == (0, 0)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGINT),
    ],
)
def test_second_signal_cuts_the_wait_short(
    tmp_path: Path, server_factory: Any, first: int, second: int
) -> None:
    config_path = write_config(tmp_path, server={"shutdown_grace": "10m"})
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(tmp_path / "never"))
    wait_for_job(server.url, job["id"], "running")
    pid = job_row(tmp_path / "data" / "jobserver.db", job["id"])["pid"]
    server.process.send_signal(first)
    wait_until(lambda: draining(server))
    time.sleep(0.2)
    assert server.process.poll() is None  # still waiting for the job
    server.process.send_signal(second)
    assert server.process.wait(timeout=20) == 0
    assert not alive(pid)
    row = job_row(tmp_path / "data" / "jobserver.db", job["id"])
    assert row["state"] == "queued" and (row["rescues"], row["failures"]) == (0, 0)


def test_a_draining_server_serves_reads_until_its_jobs_settle(
    tmp_path: Path, server_factory: Any
) -> None:
    # max_jobs = 1: the queued job waits for the running one's slot and never starts, so
    # nothing but the stop can end the readers that wait on it.
    config_path = write_config(
        tmp_path, server={"shutdown_grace": "30s"}, scheduler={"max_jobs": 1}
    )
    database = tmp_path / "data" / "jobserver.db"
    gate = tmp_path / "gate"
    server = server_factory(config_path)
    url = server.url
    failed = submit(url, "fail")
    wait_for_job(url, failed["id"], "failed")
    job = submit(url, "wait_for_file", path=str(gate))
    wait_for_job(url, job["id"], "running")
    queued = submit(url, "add", a=1)
    seen = httpx.get(f"{url}/api/v1/jobs/{job['id']}", timeout=5).headers["etag"]
    server.process.send_signal(signal.SIGTERM)
    wait_until(lambda: draining(server))

    # Readers opened during the drain: a long poll on the running job, which its end
    # answers; on the queued job a long poll, an event stream and a followed log, which
    # only the stop can end.
    answers: dict[str, Any] = {}
    opened = {name: threading.Event() for name in ("events", "log")}

    def poll(name: str, job_id: str, etag: str | None = None) -> None:
        headers = {} if etag is None else {"If-None-Match": etag}
        try:
            response = httpx.get(f"{url}/api/v1/jobs/{job_id}?wait=60", headers=headers, timeout=70)
            answers[name] = (response.status_code, response.json()["state"])
        except httpx.HTTPError as exc:
            answers[name] = exc

    def stream(name: str, path: str) -> None:
        try:
            with httpx.stream("GET", f"{url}{path}", timeout=70) as response:
                opened[name].set()
                answers[name] = (response.status_code, response.read().decode())
        except httpx.HTTPError as exc:
            answers[name] = exc
            opened[name].set()

    readers = [
        threading.Thread(target=poll, args=("settled", job["id"], seen)),
        threading.Thread(target=poll, args=("queued", queued["id"])),
        threading.Thread(target=stream, args=("events", f"/api/v1/jobs/{queued['id']}/events")),
        threading.Thread(target=stream, args=("log", f"/api/v1/jobs/{queued['id']}/logs?follow=1")),
    ]
    for reader in readers:
        reader.start()
    for event in opened.values():
        assert event.wait(timeout=10)

    # Reads are answered as before.
    document = httpx.get(f"{url}/api/v1/jobs/{job['id']}", timeout=5)
    assert document.status_code == 200 and document.json()["state"] == "running"
    status = httpx.get(f"{url}/api/v1/task-status/{job['id']}", timeout=5)
    assert status.status_code == 200 and status.json()["status"] == "STARTED"
    logged = httpx.get(f"{url}/api/v1/jobs/{job['id']}/logs", timeout=5)
    assert logged.status_code == 200 and "waiting for" in logged.text
    page = httpx.get(f"{url}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{url}/api/v1/system", timeout=5).json()["draining"]["since"]

    # New work is refused, and nothing is stored.
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    new_work = [
        ("/api/v1/jobs", {"task": "add", "args": {"a": 2}}),
        ("/api/v1/start-analysis", {"dataset_id": "d", "complexity": 0}),
        (f"/api/v1/jobs/{failed['id']}/retry", None),
    ]
    for path, body in new_work:
        refused = httpx.post(f"{url}{path}", json=body, timeout=5)
        assert refused.status_code == 503, (path, refused.text)
        assert int(refused.headers["retry-after"]) > 0
        error = refused.json()["error"]
        assert error["code"] == "draining" and error["message"] and error["details"]["since"]
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == rows
    assert job_row(database, failed["id"])["state"] == "failed"

    # The job settles: the server answers its waiting readers, then stops listening.
    assert server.process.poll() is None
    gate.write_text("finished while the server drained")
    assert server.process.wait(timeout=30) == 0
    for reader in readers:
        reader.join(timeout=10)
    assert stopped_listening(server)
    assert answers["settled"] == (200, "succeeded")
    assert answers["queued"] == (200, "queued")
    status_code, events = answers["events"]
    assert status_code == 200 and "event: job" in events
    assert answers["log"] == (200, "")
    assert job_row(database, job["id"])["state"] == "succeeded"
    assert job_row(database, queued["id"])["state"] == "queued"
    assert "Traceback" not in server.log()


# -- an acknowledged cancel outlives a crash and a stop -----------------------------------------

STUBBORN = {"stubborn": {"function": "sample_tasks:stubborn", "cpus": 0.1, "memory": "16MiB"}}


def runs(note: Path) -> int:
    """How many times the stubborn task started (it appends a line on each start)."""
    return note.read_text().count("started") if note.exists() else 0


def test_acknowledged_cancel_survives_sigkill_and_restart(
    tmp_path: Path, server_factory: Any
) -> None:
    # The task ignores SIGTERM and the kill grace is 10 minutes: the cancel is acknowledged
    # and its SIGTERM sent, but the job is still running when the server is killed.
    config_path = write_config(tmp_path, scheduler={"kill_grace": "10m"}, tasks=STUBBORN)
    database = tmp_path / "data" / "jobserver.db"
    note = tmp_path / "runs.txt"
    server = server_factory(config_path)
    job = submit(server.url, "stubborn", note=str(note))
    wait_until(lambda: runs(note) == 1)
    response = httpx.post(f"{server.url}/api/v1/jobs/{job['id']}/cancel", timeout=10)
    assert response.status_code == 202, response.text
    assert response.json()["cancel_requested"] is True
    row = job_row(database, job["id"])
    assert row["state"] == "running" and row["cancel_requested_at"] is not None
    pid = row["pid"]

    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_until(lambda: not alive(pid))
    restarted = server_factory(config_path)
    document = httpx.get(f"{restarted.url}/api/v1/jobs/{job['id']}", timeout=10).json()
    assert document["state"] == "cancelled", document
    assert document["attempts"] == 1
    assert [entry["outcome"] for entry in document["history"]] == ["cancelled"]
    # A job submitted after it runs to its start: the scheduler is live, yet the cancelled
    # job never started again.
    later = submit(restarted.url, "stubborn", note=str(tmp_path / "later.txt"), seconds=0)
    wait_for_job(restarted.url, later["id"], "succeeded")
    assert runs(note) == 1
    assert job_row(database, job["id"])["rescues"] == 0


def test_pending_cancel_survives_a_graceful_stop(tmp_path: Path, server_factory: Any) -> None:
    # The cancel flag must be set while the scheduler has not acted on it yet.  An HTTP
    # cancel wakes the scheduler at once, so the flag is set as an admin would, with
    # sqlite3, and the scheduler reads such flags only every poll_interval / 2 (30 min).
    config_path = write_config(
        tmp_path,
        server={"shutdown_grace": "0s"},
        scheduler={"poll_interval": "1h", "max_jobs": 1},
        tasks=STUBBORN,
    )
    database = tmp_path / "data" / "jobserver.db"
    note = tmp_path / "runs.txt"
    server = server_factory(config_path)
    job = submit(server.url, "stubborn", note=str(note))
    wait_until(lambda: runs(note) == 1)
    # A second job waits for the one slot: the tick that says so has read the cancel
    # flags (none yet), so the next read is 30 minutes away.
    waiting = submit(server.url, "stubborn", note=str(tmp_path / "other.txt"))
    wait_until(
        lambda: (
            "max_jobs"
            in (
                httpx.get(f"{server.url}/api/v1/jobs/{waiting['id']}", timeout=10).json()[
                    "waiting_reason"
                ]
                or ""
            )
        )
    )
    with sqlite3.connect(database, timeout=10) as db:
        db.execute("UPDATE jobs SET cancel_requested_at = started_at WHERE id = ?", (job["id"],))
    document = httpx.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=10).json()
    assert document["state"] == "running" and document["cancel_requested"] is True

    # shutdown_grace 0: the stop terminates it as a shutdown (it ignores SIGTERM, so it is
    # killed after kill_grace), a requeue that must keep the cancel.
    assert server.stop(signal.SIGTERM) == 0
    row = job_row(database, job["id"])
    assert row["state"] == "cancelled", dict(row)
    assert "cancelled by request" in row["reason"]
    restarted = server_factory(config_path)
    submit(restarted.url, "stubborn", note=str(tmp_path / "other.txt"))  # wakes the scheduler
    wait_for_job(restarted.url, waiting["id"], "running")
    document = httpx.get(f"{restarted.url}/api/v1/jobs/{job['id']}", timeout=10).json()
    assert document["state"] == "cancelled" and document["attempts"] == 1
    assert runs(note) == 1


# -- leftovers after a crash -------------------------------------------------------------------


@pytest.mark.parametrize("task", ["spawn_and_sleep", "spawn_escaped"])
def test_grandchildren_never_outlive_a_crash_and_restart(
    tmp_path: Path, server_factory: Any, task: str
) -> None:
    """The job's own process dies with the server (parent-death signal); a grandchild,
    in its process group or escaped with setsid, is found by its job-id tag on restart."""
    config_path = write_config(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    server = server_factory(config_path)
    job = submit(server.url, task, pid_file=str(pid_file))
    wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
    grandchild = int(pid_file.read_text())
    child = job_row(tmp_path / "data" / "jobserver.db", job["id"])["pid"]
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    wait_until(lambda: not alive(child))
    server_factory(config_path)
    wait_until(lambda: not alive(grandchild))


# -- the file under an admin's hands ---------------------------------------------------------


def test_reader_and_writer_in_a_shell_do_not_stop_the_server(
    tmp_path: Path, server_factory: Any
) -> None:
    config_path = write_config(
        tmp_path, server={"wal_max_size": "64KiB"}, scheduler={"max_memory": "1GiB"}
    )
    database = tmp_path / "data" / "jobserver.db"
    wal = database.with_name(database.name + "-wal")
    server = server_factory(config_path)
    first = submit(server.url, "big", a=0)  # "big" never fits: no processes, just rows

    # An admin opens a read transaction and leaves it open.
    reader = sqlite3.connect(database, isolation_level=None)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1

    statuses: list[int] = []

    def work(i: int) -> None:
        body = {"task": "big", "args": {"a": i}}
        statuses.append(httpx.post(f"{server.url}/api/v1/jobs", json=body, timeout=30).status_code)
        statuses.append(
            httpx.get(f"{server.url}/api/v1/jobs/{first['id']}", timeout=30).status_code
        )

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(150)))
    assert set(statuses) == {200, 202}
    # The reader pins the log: it grew past the bound and cannot be reset yet.
    assert wal.stat().st_size > 64 * 1024

    # An admin also runs a write, holding the write lock for a while.
    writer = sqlite3.connect(database, isolation_level=None, timeout=10, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE jobs SET priority = priority WHERE id = ?", (first["id"],))
    release = threading.Timer(1.5, writer.execute, ("COMMIT",))
    release.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(150, 190)))
    release.join()
    writer.close()
    assert set(statuses) == {200, 202}
    assert "database is locked" not in server.log()

    # The reader leaves: the checkpointer truncates the log on its next look.
    reader.execute("COMMIT")
    reader.close()
    wait_until(lambda: wal.stat().st_size <= 64 * 1024, timeout=20)
    assert (
        httpx.get(f"{server.url}/api/v1/jobs?limit=1000", timeout=30).json()["jobs"][-1]["id"]
        == first["id"]
    )
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 191


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot create a small file system for this test")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}"
        if "tmpfs" in os.environ.get("JOBSERVER_REQUIRE", ""):
            pytest.fail(f"{reason} (JOBSERVER_REQUIRE=tmpfs)", pytrace=False)
        pytest.skip(reason)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 65536)
            file.flush()
    return filler


def test_disk_full_answers_503_and_recovers(tmp_path: Path, server_factory: Any) -> None:
    with small_tmpfs(tmp_path / "disk", "4M") as disk:
        config_path = write_config(
            tmp_path,
            server={"database": str(disk / "jobs.db"), "wal_max_size": "1MiB"},
            scheduler={"max_memory": "1GiB"},
        )
        server = server_factory(config_path)
        before = submit(server.url, "big", a=1)

        filler = fill(disk)
        refused: httpx.Response | None = None
        for i in range(200):  # the WAL may still have room for a few pages
            response = httpx.post(
                f"{server.url}/api/v1/jobs",
                json={"task": "big", "args": {"a": i}},
                timeout=30,
            )
            assert response.status_code in (202, 503), response.text
            if response.status_code == 503:
                refused = response
                break
        assert refused is not None, "the disk never filled up"
        error = refused.json()["error"]
        assert error["code"] == "storage_unavailable"
        assert "disk full" in error["message"] and "retry" in error["message"]
        assert refused.headers["retry-after"]
        # Reads still work and what was stored is intact.
        assert httpx.get(f"{server.url}/api/v1/jobs/{before['id']}").json()["args"] == {"a": 1}

        filler.unlink()
        wait_until(
            lambda: (
                httpx.post(
                    f"{server.url}/api/v1/jobs", json={"task": "big", "args": {"a": -1}}, timeout=30
                ).status_code
                == 202
            )
        )

        assert server.stop() == 0
        with sqlite3.connect(disk / "jobs.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert (
                db.execute("SELECT args FROM jobs WHERE id = ?", (before["id"],)).fetchone()[0]
                == '{"a":1}'
            )


def test_disk_full_while_a_job_runs_keeps_its_outcome_until_space_returns(
    tmp_path: Path, server_factory: Any
) -> None:
    with small_tmpfs(tmp_path / "disk", "4M") as disk:
        config_path = write_config(
            tmp_path,
            server={
                "database": str(disk / "jobs.db"),
                "jobs_dir": str(disk / "jobs"),
                "wal_max_size": "1MiB",
            },
            scheduler={"max_memory": "1GiB"},
        )
        gate = tmp_path / "gate"  # off the full disk: the test decides when the job ends
        server = server_factory(config_path)
        job = submit(server.url, "wait_for_file", path=str(gate))
        wait_for_job(server.url, job["id"], "running")
        wait_until(lambda: job_row(disk / "jobs.db", job["id"])["pid"] is not None)

        filler = fill(disk)
        # Submits use up what room the write-ahead log still had, until one is refused.
        for i in range(200):
            response = httpx.post(
                f"{server.url}/api/v1/jobs", json={"task": "big", "args": {"a": i}}, timeout=30
            )
            assert response.status_code in (202, 503), response.text
            if response.status_code == 503:
                break
        else:
            raise AssertionError("the disk never filled up")

        gate.write_text("finished on a full disk")
        wait_until(lambda: "could not store how attempt 1 ended" in server.log(), timeout=30)
        assert job_row(disk / "jobs.db", job["id"])["state"] == "running"

        filler.unlink()
        done = wait_for_job(server.url, job["id"], "succeeded", "failed", "queued", timeout=30)
        assert (done["state"], done["result"], done["attempts"]) == (
            "succeeded",
            "finished on a full disk",
            1,
        )
        assert [entry["outcome"] for entry in done["history"]] == ["succeeded"]
        wait_until(lambda: not (disk / "jobs" / job["id"] / "outcome.json").exists())
        assert server.stop() == 0
        with sqlite3.connect(disk / "jobs.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# -- durability setting ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(("durability", "level"), [("full", 2), ("normal", 1)])
async def test_durability_sets_sqlite_synchronous(
    make_harness: Any, durability: str, level: int
) -> None:
    async with make_harness(server={"durability": durability}) as h:
        assert await h.application.driver.synchronous() == level
        assert await h.application.driver.integrity_check() == ["ok"]


def test_durability_rejects_other_values(tmp_path: Path) -> None:
    from jobserver import config
    from jobserver.errors import ConfigError

    with pytest.raises(ConfigError, match="expected one of full, normal"):
        config.load(write_config(tmp_path, server={"durability": "off"}))
