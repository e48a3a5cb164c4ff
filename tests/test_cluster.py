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
