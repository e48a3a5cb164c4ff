"""The lifecycle end to end: a real ``jobserver serve`` on loopback, the real CLI."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, needs, write_config
from tests.test_e2e import run_cli, submit, wait_for_job, wait_until

pytestmark = pytest.mark.integration


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (no client normalisation)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_cli_lifecycle_commands(tmp_path: Path, server_factory: Any) -> None:
    server: ServerProcess = server_factory(write_config(tmp_path, jobs={"retry_base": "50ms"}))
    url = ["--url", server.url]

    later = run_cli("submit", "add", "a=1", "--delay", "3600", "--json", *url)
    assert later.returncode == 0, later.stderr
    later_job = json.loads(later.stdout)
    assert later_job["waiting_reason"].startswith("scheduled for ")

    gate = tmp_path / "gate"
    first = submit(server.url, "wait_for_file", path=str(gate))
    then = run_cli("submit", "add", "a=2", "--depends-on", first["id"], "--json", *url)
    then_job = json.loads(then.stdout)
    assert then_job["depends_on"] == [first["id"]]
    wait_for_job(server.url, first["id"], "running")
    status = run_cli("status", then_job["id"], *url)
    assert f"waiting for {first['id']} (running)" in status.stdout

    # logs -f streams while the job runs and ends when it ends.
    follow = subprocess.Popen(
        [sys.executable, "-m", "jobserver", "logs", first["id"], "-f", *url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    assert follow.poll() is None
    gate.write_text("open")
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0, err
    assert b"--- attempt 1 started" in out
    wait_for_job(server.url, then_job["id"], "succeeded")

    failed = run_cli("submit", "fail", "message=boom", "--wait", "--max-retries", "0", *url)
    assert failed.returncode == 1
    job_id = httpx.get(f"{server.url}/api/v1/jobs?task=fail").json()["jobs"][0]["id"]
    logs = run_cli("logs", job_id, "--tail", "1", *url)
    assert logs.returncode == 0 and logs.stdout.strip() == "ValueError: boom"
    retried = run_cli("retry", job_id, "--json", *url)
    assert retried.returncode == 0 and json.loads(retried.stdout)["state"] == "queued"
    done = wait_for_job(server.url, job_id, "failed")
    assert done["attempts"] == 2 and len(done["history"]) == 2
    shown = run_cli("status", job_id, *url).stdout
    assert "attempt 1:" in shown and "attempt 2:" in shown and "ValueError: boom" in shown
    again = run_cli("retry", then_job["id"], *url)
    assert again.returncode == 2 and "only a failed or cancelled job" in again.stderr
    assert run_cli("retry", "01ZZZZZZZZZZZZZZZZZZZZZZZZ", *url).returncode == 4
    assert run_cli("logs", "01ZZZZZZZZZZZZZZZZZZZZZZZZ", *url).returncode == 4

    key = ["--idempotency-key", "abc-123"]
    one = json.loads(run_cli("submit", "add", "a=5", "--json", *key, *url).stdout)
    two = json.loads(run_cli("submit", "add", "a=5", "--json", *key, *url).stdout)
    assert one["id"] == two["id"]
    clash = run_cli("submit", "add", "a=6", *key, *url)
    assert clash.returncode == 2 and "different request" in clash.stderr
    both = run_cli("submit", "add", "a=1", "--delay", "1", "--run-at", "2030-01-01T00:00Z", *url)
    assert both.returncode == 2


def test_artifact_paths_from_a_raw_client(tmp_path: Path, server_factory: Any) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    server: ServerProcess = server_factory(write_config(tmp_path))
    job = submit(server.url, "make_files", names=["out.txt"], link_to=str(secret))
    wait_for_job(server.url, job["id"], "succeeded")
    base = f"/api/v1/jobs/{job['id']}/artifacts"
    assert raw_get(server.url, f"{base}/out.txt") == (200, b"content of out.txt")
    for path in (
        f"{base}/..",
        f"{base}/../output.log",
        f"{base}/%2e%2e/output.log",
        f"{base}/..%2foutput.log",
        f"{base}/..%2F..%2F..%2Fsecret.txt",
        f"{base}/%2Fetc%2Fpasswd",
        f"{base}//etc/passwd",
        f"{base}/link",
        f"{base}/out.txt%00",
    ):
        status, body = raw_get(server.url, path)
        assert status in (404, 405), (path, status, body)
        assert b"TOP-SECRET" not in body and b"attempt 1 started" not in body


def test_prune_cli_beside_a_running_server(tmp_path: Path, server_factory: Any) -> None:
    config_path = write_config(tmp_path, jobs={"retention": "1h"})
    server: ServerProcess = server_factory(config_path)
    old = submit(server.url, "add", a=1)
    new = submit(server.url, "add", a=2)
    gate = tmp_path / "gate"
    running = submit(server.url, "wait_for_file", path=str(gate))
    wait_for_job(server.url, old["id"], "succeeded")
    wait_for_job(server.url, new["id"], "succeeded")
    wait_for_job(server.url, running["id"], "running")
    database = tmp_path / "data" / "jobserver.db"
    with sqlite3.connect(database) as db:
        db.execute(
            "UPDATE jobs SET finished_at = '2020-01-01T00:00:00.000Z' WHERE id = ?", (old["id"],)
        )
    dry = run_cli("prune", "--dry-run", "--config", str(config_path))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split() == [old["id"]] and "would prune 1" in dry.stderr
    assert (tmp_path / "data" / "jobs" / old["id"]).exists()
    pruned = run_cli("prune", "--config", str(config_path))
    assert pruned.returncode == 0 and pruned.stdout.split() == [old["id"]]
    assert not (tmp_path / "data" / "jobs" / old["id"]).exists()
    # The server is told that the id was pruned, not that it never existed.
    gone = httpx.get(f"{server.url}/api/v1/jobs/{old['id']}")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "gone"
    assert gone.json()["error"]["details"]["id"] == old["id"]
    # The CLI says so too, with the exit code of a job that does not exist.
    shown = run_cli("status", old["id"], "--url", server.url)
    assert shown.returncode == 4, (shown.returncode, shown.stderr)
    assert "pruned" in shown.stderr
    assert httpx.get(f"{server.url}/api/v1/jobs/{new['id']}").json()["state"] == "succeeded"
    assert httpx.get(f"{server.url}/api/v1/jobs/{running['id']}").json()["state"] == "running"
    gate.write_text("x")
    wait_until(
        lambda: (
            httpx.get(f"{server.url}/api/v1/jobs/{running['id']}").json()["state"] == "succeeded"
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    missing = run_cli("prune", "--config", str(write_config(elsewhere)))
    assert missing.returncode == 2 and "no database" in missing.stderr


@needs("setpriv", shutil.which("setpriv") is None, "needs setpriv (util-linux)")
def test_a_command_dies_with_a_killed_server(tmp_path: Path, server_factory: Any) -> None:
    from tests.test_e2e import alive

    server: ServerProcess = server_factory(write_config(tmp_path))
    job = submit(server.url, "cmd_sleep", s=60)
    wait_for_job(server.url, job["id"], "running")
    pids: list[int] = []

    def started() -> bool:
        running = httpx.get(f"{server.url}/api/v1/system").json()["running"]
        pids[:] = [r["pid"] for r in running if r["id"] == job["id"]]
        return bool(pids)

    wait_until(started)
    server.stop(signal.SIGKILL)
    wait_until(lambda: not alive(pids[0]), timeout=10)
