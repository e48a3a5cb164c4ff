"""End to end: real ``jobserver serve`` processes on loopback, real signals, real CLI."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, write_config

pytestmark = pytest.mark.integration


def wait_until(condition: Callable[[], bool], timeout: float = 20, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(interval)


def wait_for_job(url: str, job_id: str, *states: str, timeout: float = 30) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reached() -> bool:
        found.update(httpx.get(f"{url}/api/v1/jobs/{job_id}", timeout=5).json())
        return found.get("state") in states

    try:
        wait_until(reached, timeout=timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(f"job {job_id} never reached {states}: {found}") from None
    return found


def job_row(database: Path, job_id: str) -> sqlite3.Row:
    with sqlite3.connect(database) as db:
        db.row_factory = sqlite3.Row
        row: sqlite3.Row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def submit(url: str, task: str, **args: Any) -> dict[str, Any]:
    response = httpx.post(f"{url}/api/v1/jobs", json={"task": task, "args": args}, timeout=10)
    assert response.status_code == 202, response.text
    document: dict[str, Any] = response.json()
    return document


def test_tutorial_walkthrough_over_http(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(write_config(tmp_path))
    response = httpx.post(
        f"{server.url}/api/v1/start-analysis",
        json={"dataset_id": "data_xyz", "complexity": 0},
        timeout=10,
    )
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    wait_for_job(server.url, task_id, "succeeded")
    status = httpx.get(f"{server.url}/api/v1/task-status/{task_id}").json()
    assert status["status"] == "SUCCESS"
    assert status["result"]["dataset_id"] == "data_xyz"
    missing = httpx.get(f"{server.url}/api/v1/task-status/a9b1c8d2-never-issued")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert server.stop() == 0


def test_serve_runs_on_uvloop_and_httptools(tmp_path: Path, server_factory: Any) -> None:
    server = server_factory(write_config(tmp_path, server={"log_level": "info"}))
    job = submit(server.url, "add", a=2, b=3)
    assert wait_for_job(server.url, job["id"], "succeeded")["result"] == 5
    assert server.stop() == 0
    assert (
        "event loop uvloop.Loop, HTTP protocol "
        "uvicorn.protocols.http.httptools_impl.HttpToolsProtocol" in server.log()
    )


def test_sigkill_mid_job_then_restart_requeues_and_succeeds(
    tmp_path: Path, server_factory: Any
) -> None:
    config_path = write_config(tmp_path)
    database = tmp_path / "data" / "jobserver.db"
    gate = tmp_path / "gate"
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(gate))
    wait_for_job(server.url, job["id"], "running")
    wait_until(lambda: job_row(database, job["id"])["pid"] is not None)
    child_pid = job_row(database, job["id"])["pid"]
    assert alive(child_pid)

    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    # The job's process dies with the server (parent-death signal), not left unsupervised.
    wait_until(lambda: not alive(child_pid))
    assert job_row(database, job["id"])["state"] == "running"

    restarted = server_factory(config_path)
    rescued = wait_for_job(restarted.url, job["id"], "running", "queued")
    assert (
        "requeued after the server stopped" in (rescued["reason"] or "")
        or rescued["state"] == "running"
    )
    wait_for_job(restarted.url, job["id"], "running")
    gate.write_text("released")
    done = wait_for_job(restarted.url, job["id"], "succeeded")
    assert done["result"] == "released"
    assert done["attempts"] == 2
    row = job_row(database, job["id"])
    assert row["rescues"] == 1 and row["failures"] == 0
    assert restarted.stop() == 0


def test_job_rescued_too_often_fails_as_lost(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path, scheduler={"max_rescues": 0})
    database = tmp_path / "data" / "jobserver.db"
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(tmp_path / "never"))
    wait_for_job(server.url, job["id"], "running")
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    restarted = server_factory(config_path)
    done = wait_for_job(restarted.url, job["id"], "failed")
    assert done["error"]["type"] == "lost"
    assert "max_rescues = 0" in done["error"]["message"]
    assert job_row(database, job["id"])["reason"] == "lost"


def test_sigterm_requeues_running_jobs_and_exits_zero(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path)
    gate = tmp_path / "gate"
    server = server_factory(config_path)
    job = submit(server.url, "wait_for_file", path=str(gate))
    wait_for_job(server.url, job["id"], "running")
    assert server.stop(signal.SIGTERM) == 0
    row = job_row(tmp_path / "data" / "jobserver.db", job["id"])
    assert row["state"] == "queued"
    assert "shut down" in row["reason"]
    restarted = server_factory(config_path)
    gate.write_text("ok")
    done = wait_for_job(restarted.url, job["id"], "succeeded")
    assert done["attempts"] == 2
    assert job_row(tmp_path / "data" / "jobserver.db", job["id"])["rescues"] == 0


def test_second_server_on_the_same_file_refuses(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path)
    first = server_factory(config_path)
    second = server_factory(config_path, wait=False)
    assert second.process.wait(timeout=30) != 0
    assert f"pid {first.process.pid}" in second.log()
    migrating = run_cli("migrate", "--config", str(config_path))
    assert migrating.returncode == 2 and f"pid {first.process.pid}" in migrating.stderr
    assert httpx.get(f"{first.url}/healthz").status_code == 200


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobserver", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_cli_submit_wait_and_status(tmp_path: Path, server_factory: Any) -> None:
    server: ServerProcess = server_factory(write_config(tmp_path))
    done = run_cli(
        "submit", "analysis", "dataset_id=007", "complexity=0", "--wait", "--url", server.url
    )
    assert done.returncode == 0, done.stderr
    assert '"dataset_id": "007"' in done.stdout

    failed = run_cli("submit", "fail", "message=nope", "--wait", env={"JOBSERVER_URL": server.url})
    assert failed.returncode == 1
    assert "nope" in failed.stderr

    queued = run_cli("submit", "add", "a=1", "--json", "--url", server.url)
    assert queued.returncode == 0
    import json

    job_id = json.loads(queued.stdout)["id"]
    wait_for_job(server.url, job_id, "succeeded")
    status = run_cli("status", job_id, "--url", server.url)
    assert status.returncode == 0 and "succeeded" in status.stdout

    bad = run_cli("submit", "add", "a=abc", "--url", server.url)
    assert bad.returncode == 2 and "a:" in bad.stderr
    unknown = run_cli("status", "01ZZZZZZZZZZZZZZZZZZZZZZZZ", "--url", server.url)
    assert unknown.returncode == 4
    unreachable = run_cli("status", job_id, "--url", "http://127.0.0.1:9")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr


def test_serve_with_a_bad_config_names_the_key(tmp_path: Path) -> None:
    config_path = write_config(tmp_path, scheduler={"reserve_memory": "lots"})
    result = run_cli("serve", "--config", str(config_path))
    assert result.returncode == 2
    assert "scheduler.reserve_memory" in result.stderr
    assert "config.toml:" in result.stderr


def test_migrate_creates_the_database(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    result = run_cli("migrate", "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(tmp_path / "data" / "jobserver.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
