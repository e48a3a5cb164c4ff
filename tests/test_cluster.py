"""jobserver on PostgreSQL, end to end: real ``jobserver serve`` processes on loopback,
each test on a fresh database of its own (``postgresql_database``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, postgresql_database, write_config
from tests.test_e2e import run_cli, submit, wait_for_job

pytestmark = pytest.mark.integration


@pytest.fixture
def url() -> Iterator[str]:
    """A fresh, empty database: the server migrates it itself."""
    with postgresql_database(migrated=False) as found:
        yield found


def test_serve_on_postgresql_walkthrough(tmp_path: Path, url: str, server_factory: Any) -> None:
    config_path = write_config(tmp_path, server={"database": url}, jobs={"retry_base": "50ms"})
    server: ServerProcess = server_factory(config_path)
    assert not (tmp_path / "data" / "jobserver.db").exists()

    # submit, poll, result
    added = submit(server.url, "add", a=2, b=3)
    done = wait_for_job(server.url, added["id"], "succeeded")
    assert done["result"] == 5 and done["attempts"] == 1

    # logs
    echoed = submit(server.url, "echo", text="hello")
    wait_for_job(server.url, echoed["id"], "succeeded")
    logs = httpx.get(f"{server.url}/api/v1/jobs/{echoed['id']}/logs", timeout=10)
    assert logs.status_code == 200 and "echo hello" in logs.text

    # cancel a running job
    gate = tmp_path / "gate"
    waiting = submit(server.url, "wait_for_file", path=str(gate))
    wait_for_job(server.url, waiting["id"], "running")
    cancelled = httpx.post(f"{server.url}/api/v1/jobs/{waiting['id']}/cancel", timeout=10)
    assert cancelled.status_code == 202, cancelled.text
    wait_for_job(server.url, waiting["id"], "cancelled")

    # a failure, then a retry by request
    failing = submit(server.url, "fail", message="boom")
    failed = wait_for_job(server.url, failing["id"], "failed")
    assert failed["error"]["message"] == "boom"
    retried = run_cli("retry", failing["id"], "--json", "--url", server.url)
    assert retried.returncode == 0 and json.loads(retried.stdout)["state"] == "queued"
    again = wait_for_job(server.url, failing["id"], "failed")
    assert again["attempts"] == 2 and len(again["history"]) == 2

    listed = httpx.get(f"{server.url}/api/v1/jobs?state=succeeded", timeout=10).json()
    assert {job["id"] for job in listed["jobs"]} == {added["id"], echoed["id"]}
    system = httpx.get(f"{server.url}/api/v1/system", timeout=10).json()
    assert system["jobs"] == {"queued": 0, "running": 0}
    assert server.stop() == 0


def test_backup_on_postgresql_points_at_pg_dump(tmp_path: Path, url: str) -> None:
    config_path = write_config(tmp_path, server={"database": url})
    result = run_cli("backup", str(tmp_path / "copy.db"), "--config", str(config_path))
    assert result.returncode == 2
    assert "pg_dump" in result.stderr


def test_migrate_on_postgresql(tmp_path: Path, url: str) -> None:
    config_path = write_config(tmp_path, server={"database": url})
    for _ in range(2):  # the second run finds nothing to do
        result = run_cli("migrate", "--config", str(config_path))
        assert result.returncode == 0, result.stderr
        assert "PostgreSQL database is up to date" in result.stdout


def test_a_restarted_node_rescues_only_its_own_jobs(
    tmp_path: Path, url: str, server_factory: Any
) -> None:
    """Two nodes on one database: each claims under its own name, and a node's start-up
    rescue requeues only what it ran itself, never the other node's running job."""
    servers = {}
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        config_path = write_config(
            directory,
            server={"database": url},
            tasks={"wait_for_file": {"function": "sample_tasks:wait_for_file", "cpus": 0.1}},
            scheduler={"max_jobs": 1},
        )
        config_path.write_text(config_path.read_text() + f'\n[cluster]\nnode = "{name}"\n')
        servers[name] = (config_path, server_factory(config_path))
    gates = {name: tmp_path / f"gate-{name}" for name in ("a", "b")}
    jobs = [submit(servers["a"][1].url, "wait_for_file", path=str(gate)) for gate in gates.values()]
    running = [wait_for_job(servers["a"][1].url, job["id"], "running") for job in jobs]
    assert {job["history"][0]["node"] for job in running} == {"a", "b"}
    on = {job["history"][0]["node"]: job["id"] for job in running}

    config_a, server_a = servers["a"]
    server_a.stop()  # shutdown_grace 0: its job goes back to the queue
    server_factory(config_a)
    other = httpx.get(f"{servers['b'][1].url}/api/v1/jobs/{on['b']}", timeout=10).json()
    assert other["state"] == "running" and other["attempts"] == 1
    for gate in gates.values():
        gate.write_text("go")
    for job_id in on.values():
        done = wait_for_job(servers["b"][1].url, job_id, "succeeded")
        assert done["result"] == "go"
    assert httpx.get(f"{servers['b'][1].url}/api/v1/jobs/{on['b']}").json()["attempts"] == 1
