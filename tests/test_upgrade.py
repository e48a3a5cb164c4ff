"""Upgrades with real data: databases that older revisions' own servers wrote (one job in
every state, made by tests/fixtures/make_old_databases.py, the server SIGKILLed with two
jobs running) are upgraded by ``jobserver serve`` and served, and every job ends as it
should.

The tasks keep their names and parameters but no longer hold or fail
(tests/upgrade_tasks.py), so each job's end shows within seconds."""

from __future__ import annotations

import json
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobserver.store import pending_migrations
from tests.conftest import ServerProcess, poll_value, write_config
from tests.fixtures.make_old_databases import REVISIONS, ROLES, SCHEDULE

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFESTS = sorted(FIXTURES.glob("jobs-*.json"))

# The same names and parameters as when the fixtures were made; none holds or fails now.
TASKS = {
    "quick": {"function": "upgrade_tasks:quick", "cpus": 0.1, "memory": "16MiB"},
    "hold": {"function": "upgrade_tasks:hold_no_more", "cpus": 0.1, "memory": "16MiB"},
    # Started again, it would succeed: an acknowledged cancel must keep it from starting.
    "stubborn": {"function": "upgrade_tasks:hold_no_more", "cpus": 0.1, "memory": "16MiB"},
    "broken": {"function": "upgrade_tasks:mended", "cpus": 0.1, "memory": "16MiB"},
}


def test_every_revision_has_its_fixture() -> None:
    assert [path.stem for path in MANIFESTS] == [f"jobs-{r}" for r in sorted(REVISIONS)]
    for path in MANIFESTS:
        manifest = json.loads(path.read_text())
        assert manifest["commit"].startswith(REVISIONS[manifest["revision"]])
        assert set(manifest["jobs"]) == set(ROLES)
        database = path.with_suffix(".sqlite")
        assert pending_migrations(database), f"{database.name} is already at the head"


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("manifest_path", MANIFESTS, ids=[p.stem for p in MANIFESTS])
def test_an_old_database_upgrades_and_every_job_ends_as_it_should(
    manifest_path: Path, tmp_path: Path, server_factory: Any
) -> None:
    manifest = json.loads(manifest_path.read_text())
    jobs: dict[str, str] = manifest["jobs"]
    database = tmp_path / "jobs.db"
    shutil.copyfile(manifest_path.with_suffix(".sqlite"), database)
    config_path = write_config(
        tmp_path,
        server={"database": str(database)},
        scheduler={"max_jobs": 4},
        tasks=TASKS,
        # The fixture's finished jobs are older than the default retention.
        jobs={"retention": "3650d"},
        schedules={SCHEDULE: {"task": "quick", "cron": "* * * * *", "args": {"n": 0}}},
    )
    server: ServerProcess = server_factory(config_path)
    # `serve` took a copy of the old file before it migrated it.
    assert list((tmp_path / "backups").iterdir()), server.log()
    assert pending_migrations(database) == []
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def document(role: str) -> dict[str, Any]:
            answer: dict[str, Any] = client.get(f"/api/v1/jobs/{jobs[role]}").json()
            return answer

        def ended(role: str, state: str) -> dict[str, Any]:
            job: dict[str, Any] = poll_value(
                lambda: (found := document(role))["state"] == state and found,
                f"{role} ({jobs[role]}) to end {state}: {document(role)}\n{server.log()}",
            )
            return job

        # Done before the upgrade: unchanged, measured run kept (the scheduler learns from it).
        done = document("succeeded")
        assert (done["state"], done["attempts"], len(done["history"])) == ("succeeded", 1, 1)
        tasks = {task["name"]: task for task in client.get("/api/v1/tasks").json()["tasks"]}
        assert tasks["hold"]["learned"]["runs"] >= 1
        cancelled = document("cancelled")
        assert (cancelled["state"], cancelled["attempts"]) == ("cancelled", 0)

        # Queued: runs once.  Its dependent runs after it.
        queued = ended("queued", "succeeded")
        assert queued["attempts"] == 1
        dependent = ended("dependent", "succeeded")
        assert parse_time(dependent["started_at"]) >= parse_time(queued["finished_at"])
        # Failed once, queued for its retry: the retry runs.
        retried = ended("retrying", "succeeded")
        assert retried["attempts"] == 2
        # Running at the crash: rescued, run again, done.
        rescued = ended("running", "succeeded")
        assert rescued["attempts"] == 2
        assert rescued["history"][0]["outcome"] != "succeeded"
        # Running with its cancel acknowledged: cancelled, never started again.
        flagged = ended("cancel_requested", "cancelled")
        assert flagged["attempts"] == 1 and len(flagged["history"]) == 1, flagged
        # The cron slot's job runs once, and that slot never fires again.
        fired = ended("cron", "succeeded")
        assert fired["attempts"] == 1
        # Failed for good: a retry after the upgrade runs it.
        retry = client.post(f"/api/v1/jobs/{jobs['failed']}/retry")
        assert retry.status_code == 202, retry.text
        assert ended("failed", "succeeded")["attempts"] == 2

        # Delayed: runs once its time has come, not before (the near one is a minute after
        # the fixture was made, the far one 360 days).
        for role in ("delayed_near", "delayed_far"):
            if parse_time(document(role)["run_after"]) <= datetime.now(UTC):
                assert ended(role, "succeeded")["attempts"] == 1
        # Read last, after everything else ran: a job still waiting for its time never started.
        for role in ("delayed_near", "delayed_far"):
            job = document(role)
            if job["attempts"] == 0:
                assert job["state"] == "queued", job
                assert parse_time(job["run_after"]) > datetime.now(UTC), job

        slot = parse_time(manifest["cron_slot"])
        listing = client.get("/api/v1/jobs", params={"task": "quick", "limit": 1000}).json()
        since = [job for job in listing["jobs"] if job["schedule"] is not None]
        slots = [parse_time(job["schedule"]["slot"]) for job in since]
        assert all(later > slot for later in slots), since
        assert len(set(slots)) == len(slots), since  # each later slot once
        assert server.stop(signal.SIGTERM) == 0, server.log()
        assert "Traceback" not in server.log(), server.log()
