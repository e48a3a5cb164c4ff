"""The HTTP API in process (httpx over ASGI), with real child processes and a real SQLite
file; the resource probe is fake so admissions do not depend on this machine's load."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import sqlite3
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobserver import api
from jobserver.api import _RENDER, _joined, _rendered_halves, job_document
from jobserver.config import RESERVED_ROUTES
from jobserver.jobs import (
    Artifact,
    Attempt,
    Job,
    JobError,
    JobState,
    Progress,
    new_job_id,
    utcnow,
)
from jobserver.store import NewJob
from tests.conftest import FakeProbe, Harness

pytestmark = pytest.mark.anyio

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def stored_rows(harness: Harness) -> int:
    with sqlite3.connect(harness.settings.server.database) as db:
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return dict(body["error"])


async def test_submit_run_and_read_a_job(make_harness: Any) -> None:
    async with make_harness() as h:
        response = await h.client.post(
            "/api/v1/jobs", json={"task": "add", "args": {"a": 2, "b": 3}}
        )
        assert response.status_code == 202
        job = response.json()
        assert response.headers["location"] == f"/api/v1/jobs/{job['id']}"
        assert job["state"] == "queued" and job["task"] == "add" and job["args"] == {"a": 2, "b": 3}
        assert ISO.match(job["created_at"])
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["result"] == 5
        assert done["attempts"] == 1
        assert done["error"] is None and done["waiting_reason"] is None
        assert ISO.match(done["started_at"]) and ISO.match(done["finished_at"])
        assert done["created_at"] <= done["started_at"] <= done["finished_at"]


async def test_job_environment_and_log(make_harness: Any) -> None:
    async with make_harness() as h:
        job = (
            await h.client.post("/api/v1/jobs", json={"task": "echo", "args": {"text": "hi"}})
        ).json()
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["result"] == {"text": "hi", "job": job["id"], "attempt": 1}
        log = (h.settings.server.jobs_dir / job["id"] / "output.log").read_text()
        assert "echo hi" in log


@pytest.mark.parametrize(
    ("task", "args", "error_type", "message"),
    [
        ("fail", {"message": "bad input file"}, "ValueError", "bad input file"),
        ("die", {"signum": 9}, "Killed", "killed by signal 9 (SIGKILL)"),
        ("exit_with", {"code": 7}, "Exited", "exited with code 7"),
        ("unserializable", {}, "ResultNotSerializable", "not JSON-serialisable"),
    ],
)
async def test_failures_are_recorded(
    make_harness: Any, task: str, args: dict[str, Any], error_type: str, message: str
) -> None:
    async with make_harness() as h:
        job = (await h.client.post("/api/v1/jobs", json={"task": task, "args": args})).json()
        done = await h.wait_for_state(job["id"], "failed")
        assert done["error"]["type"] == error_type
        assert message in done["error"]["message"]
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status["status"] == "FAILURE" and message in status["error"]


async def test_exception_keeps_its_traceback(make_harness: Any) -> None:
    async with make_harness() as h:
        job = (await h.client.post("/api/v1/jobs", json={"task": "fail", "args": {}})).json()
        done = await h.wait_for_state(job["id"], "failed")
        assert "Traceback" in done["error"]["traceback"]
        assert "sample_tasks.py" in done["error"]["traceback"]


async def test_retries_until_success(make_harness: Any, tmp_path: Any) -> None:
    async with make_harness() as h:
        args = {"marker_dir": str(tmp_path / "markers"), "failures": 1}
        job = (await h.client.post("/api/v1/jobs", json={"task": "flaky", "args": args})).json()
        done = await h.wait_for_state(job["id"], "succeeded", "failed")
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        assert done["result"] == "succeeded after 1 failures"


async def test_retries_exhausted(make_harness: Any, tmp_path: Any) -> None:
    async with make_harness() as h:
        args = {"marker_dir": str(tmp_path / "markers"), "failures": 10}
        job = (await h.client.post("/api/v1/jobs", json={"task": "flaky", "args": args})).json()
        done = await h.wait_for_state(job["id"], "failed", timeout=30)
        assert done["attempts"] == 3  # max_retries = 2
        assert done["error"]["message"] == "flaky failure 3"


async def test_tutorial_walkthrough(make_harness: Any) -> None:
    async with make_harness() as h:
        response = await h.client.post(
            "/api/v1/start-analysis", json={"dataset_id": "data_xyz", "complexity": 0}
        )
        assert response.status_code == 202
        body = response.json()
        assert set(body) == {"message", "task_id"}
        task_id = body["task_id"]
        await h.wait_for_state(task_id, "succeeded")
        status = (await h.client.get(f"/api/v1/task-status/{task_id}")).json()
        assert status == {
            "task_id": task_id,
            "status": "SUCCESS",
            "result": {
                "status": "success",
                "dataset_id": "data_xyz",
                "analysis_time_sec": 0,
                "result_url": "http://example.com/results/data_xyz.zip",
            },
        }


async def test_status_names_follow_celery(make_harness: Any, tmp_path: Any) -> None:
    gate = tmp_path / "gate"
    async with make_harness(probe=FakeProbe(cpus=8)) as h:
        job = (
            await h.client.post(
                "/api/v1/jobs", json={"task": "wait_for_file", "args": {"path": str(gate)}}
            )
        ).json()
        await h.wait_for_state(job["id"], "running")
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status == {"task_id": job["id"], "status": "STARTED"}
        gate.write_text("done")
        await h.wait_for_state(job["id"], "succeeded")
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status["status"] == "SUCCESS" and status["result"] == "done"


async def test_pending_while_queued_with_reason(make_harness: Any) -> None:
    # 8 GiB requested on a machine with 4 GiB: it waits, and says why with numbers.
    async with make_harness(probe=FakeProbe(memory=4 * 2**30)) as h:
        job = (await h.client.post("/api/v1/jobs", json={"task": "big", "args": {"a": 1}})).json()
        await h.application.scheduler.tick(utcnow())
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status["status"] == "PENDING"
        assert "8.0 GiB" in status["waiting_reason"]
        document = (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()
        assert document["state"] == "queued"
        assert document["waiting_reason"] == status["waiting_reason"]
        system = (await h.client.get("/api/v1/system")).json()
        assert system["queue_head"] == [
            {"id": job["id"], "waiting_reason": status["waiting_reason"]}
        ]


async def test_unknown_ids_are_404(make_harness: Any) -> None:
    async with make_harness() as h:
        for path in (
            "/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ",
            "/api/v1/task-status/a9b1c8d2-0000",
        ):
            assert_error(await h.client.get(path), 404, "not_found")
        assert_error(
            await h.client.post("/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ/cancel"), 404, "not_found"
        )
        assert_error(await h.client.get("/no/such/route"), 404, "not_found")
        assert_error(await h.client.delete("/api/v1/jobs"), 405, "method_not_allowed")


@pytest.mark.parametrize(
    ("request_kwargs", "status", "code"),
    [
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        (
            {
                "content": b'{"task": "add", "args": {"a": NaN}}',
                "headers": {"content-type": "application/json"},
            },
            400,
            "malformed_json",
        ),
        (
            {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        (
            {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "malformed_json",
        ),
        ({"json": [1, 2]}, 422, "validation_error"),
        ({"json": "add"}, 422, "validation_error"),
        ({"json": {"task": "nope", "args": {}}}, 422, "unknown_task"),
        ({"json": {"args": {}}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": {"a": "abc"}}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": {"a": "3"}}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": []}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": {"a": 1}, "priority": "high"}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": {"a": 1}, "priority": 10**6}}, 422, "validation_error"),
        ({"json": {"task": "add", "args": {"a": 1}, "extra": 1}}, 422, "validation_error"),
        (
            {
                "content": b"task=add",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            415,
            "unsupported_media_type",
        ),
        ({"content": b'{"task": "add"}'}, 415, "unsupported_media_type"),
        (
            {
                "content": b'{"task": "add", "args": {"a": 1}, "x": "' + b"x" * 2_000_000 + b'"}',
                "headers": {"content-type": "application/json"},
            },
            413,
            "body_too_large",
        ),
    ],
)
async def test_bad_submissions_store_nothing(
    make_harness: Any, request_kwargs: dict[str, Any], status: int, code: str
) -> None:
    async with make_harness() as h:
        response = await h.client.post("/api/v1/jobs", **request_kwargs)
        assert_error(response, status, code)
        assert stored_rows(h) == 0


async def test_argument_errors_name_each_field(make_harness: Any) -> None:
    async with make_harness() as h:
        response = await h.client.post(
            "/api/v1/jobs", json={"task": "add", "args": {"b": "x", "c": 1}}
        )
        error = assert_error(response, 422, "validation_error")
        fields = sorted(problem["field"] for problem in error["details"])
        assert fields == ["a", "b", "c"]
        assert stored_rows(h) == 0


async def test_tutorial_route_rejects_bad_bodies(make_harness: Any) -> None:
    async with make_harness() as h:
        response = await h.client.post(
            "/api/v1/start-analysis", json={"dataset_id": "x", "complexity": "abc"}
        )
        error = assert_error(response, 422, "validation_error")
        assert [p["field"] for p in error["details"]] == ["complexity"]
        assert_error(
            await h.client.post(
                "/api/v1/start-analysis", content=b"{", headers={"content-type": "application/json"}
            ),
            400,
            "malformed_json",
        )
        assert_error(await h.client.get("/api/v1/start-analysis"), 405, "method_not_allowed")
        assert stored_rows(h) == 0


async def test_list_newest_first_with_stable_cursor(make_harness: Any) -> None:
    async with make_harness() as h:
        ids = []
        for i in range(7):
            response = await h.client.post(
                "/api/v1/jobs", json={"task": "big", "args": {"a": i}, "priority": 0}
            )
            ids.append(response.json()["id"])
        page = (await h.client.get("/api/v1/jobs", params={"limit": 3})).json()
        assert [job["id"] for job in page["jobs"]] == ids[::-1][:3]
        # A job submitted between pages must not shift the pages being walked.
        await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})
        seen = [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        while cursor:
            page = (
                await h.client.get("/api/v1/jobs", params={"limit": 3, "cursor": cursor})
            ).json()
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
        assert seen == ids[::-1]
        filtered = (await h.client.get("/api/v1/jobs", params={"task": "add"})).json()
        assert [job["task"] for job in filtered["jobs"]] == ["add"]
        assert filtered["next_cursor"] is None


@pytest.mark.parametrize(
    "params",
    [
        {"state": "done"},
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "x"},
        {"cursor": "../x"},
        {"colour": "red"},
    ],
)
async def test_list_rejects_bad_queries(make_harness: Any, params: dict[str, str]) -> None:
    async with make_harness() as h:
        assert_error(await h.client.get("/api/v1/jobs", params=params), 422, "validation_error")


async def test_cancel_queued_job(make_harness: Any) -> None:
    # No machine room for this job: it stays queued until cancelled.
    async with make_harness(probe=FakeProbe(memory=2 * 2**30)) as h:
        job = (await h.client.post("/api/v1/jobs", json={"task": "big", "args": {"a": 1}})).json()
        queued = (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()
        assert queued["state"] == "queued"
        response = await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200
        assert response.json()["state"] == "cancelled"
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status["status"] == "REVOKED"
        assert_error(await h.client.post(f"/api/v1/jobs/{job['id']}/cancel"), 409, "invalid_state")


async def test_cancel_running_job_kills_its_tree(make_harness: Any, tmp_path: Any) -> None:
    import os

    pid_file = tmp_path / "grandchild.pid"
    async with make_harness() as h:
        job = (
            await h.client.post(
                "/api/v1/jobs",
                json={"task": "spawn_and_sleep", "args": {"pid_file": str(pid_file)}},
            )
        ).json()
        await h.wait_for_state(job["id"], "running")
        # The row says running from the claim on; the process is started by this event
        # loop just after, so let that happen before the blocking wait below.
        await h.application.scheduler.starts_settled(timeout=10)
        from tests.test_e2e import wait_until

        wait_until(lambda: pid_file.exists() and pid_file.read_text() != "")
        grandchild = int(pid_file.read_text())
        response = await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 202
        assert response.json()["cancel_requested"] is True
        done = await h.wait_for_state(job["id"], "cancelled")
        assert done["finished_at"] is not None
        wait_until(lambda: not _alive(grandchild))
        assert_error(await h.client.post(f"/api/v1/jobs/{job['id']}/cancel"), 409, "invalid_state")
        del os


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_cancel_escalates_to_sigkill(make_harness: Any) -> None:
    async with make_harness(scheduler={"kill_grace": "300ms"}) as h:
        job = (
            await h.client.post("/api/v1/jobs", json={"task": "ignore_sigterm", "args": {}})
        ).json()
        await h.wait_for_state(job["id"], "running")
        await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        done = await h.wait_for_state(job["id"], "cancelled", timeout=15)
        assert done["state"] == "cancelled"


async def test_cancel_and_timeout_log_the_sigkill_step(
    make_harness: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.INFO, logger="jobserver")
    stubborn = {"function": "sample_tasks:ignore_sigterm_then_say", "cpus": 0.1}
    tasks = {"stubborn": {**stubborn, "memory": "16MiB", "timeout": "1s"}}
    timed_ready, cancel_ready = tmp_path / "timed", tmp_path / "cancel"
    async with make_harness(scheduler={"kill_grace": "300ms"}, tasks=tasks) as h:
        timed = (
            await h.client.post(
                "/api/v1/jobs", json={"task": "stubborn", "args": {"ready": str(timed_ready)}}
            )
        ).json()
        body = {"task": "stubborn", "args": {"ready": str(cancel_ready)}, "timeout": 3600}
        cancelled = (await h.client.post("/api/v1/jobs", json=body)).json()
        deadline = time.monotonic() + 30
        while not (cancel_ready.exists() and timed_ready.exists()):
            assert time.monotonic() < deadline, "the jobs never started"
            await asyncio.sleep(0.02)
        await h.client.post(f"/api/v1/jobs/{cancelled['id']}/cancel")
        await h.wait_for_state(cancelled["id"], "cancelled", timeout=15)
        await h.wait_for_state(timed["id"], "failed", timeout=15)
    for job_id, reason in ((cancelled["id"], "cancel"), (timed["id"], "timeout")):
        lines = [
            r.getMessage() for r in caplog.records if r.getMessage().startswith(f"job {job_id}")
        ]
        assert f"job {job_id}: sent SIGTERM to its process group ({reason})" in lines
        killed = [line for line in lines if "SIGKILL" in line]
        assert killed == [
            f"job {job_id} (stubborn): still running 0.3 s after SIGTERM ({reason}); "
            "sent SIGKILL to its process group"
        ]


async def test_timeout_fails_the_job(make_harness: Any) -> None:
    tasks = {
        "slow": {
            "function": "sample_tasks:sleep",
            "cpus": 0.1,
            "memory": "16MiB",
            "timeout": "300ms",
        }
    }
    async with make_harness(tasks=tasks) as h:
        job = (
            await h.client.post("/api/v1/jobs", json={"task": "slow", "args": {"seconds": 30}})
        ).json()
        done = await h.wait_for_state(job["id"], "failed", timeout=15)
        assert done["error"]["type"] == "Timeout"
        assert done["error"]["message"] == "timed out after 0.3 s"


async def test_tasks_system_and_health(make_harness: Any) -> None:
    async with make_harness() as h:
        tasks = (await h.client.get("/api/v1/tasks")).json()["tasks"]
        add = next(task for task in tasks if task["name"] == "add")
        assert [p["name"] for p in add["params"]] == ["a", "b"]
        assert add["params"][1]["default"] == 0 and add["params"][0]["required"] is True
        assert add["resources"] == {"cpus": 0.1, "memory": 16 * 2**20}
        await h.client.post("/api/v1/jobs", json={"task": "big", "args": {"a": 1}})
        system = (await h.client.get("/api/v1/system")).json()
        assert system["capacity"]["cpus"] == 8
        assert {"capacity", "free", "reserved", "jobs", "running", "queue_head"} <= set(system)
        assert set(system["jobs"]) >= {"queued", "running"}
        health = await h.client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"


async def test_a_new_job_says_it_waits_for_the_next_tick(make_harness: Any) -> None:
    async with make_harness(probe=FakeProbe(memory=2**30)) as h:
        response = await h.client.post("/api/v1/jobs", json={"task": "big", "args": {"a": 1}})
        assert response.json()["waiting_reason"] == "waiting for the scheduler's next tick"


async def test_shutdown_does_not_undo_a_cancel(make_harness: Any) -> None:
    async with make_harness(scheduler={"kill_grace": "500ms"}) as h:
        job = (
            await h.client.post("/api/v1/jobs", json={"task": "ignore_sigterm", "args": {}})
        ).json()
        await h.wait_for_state(job["id"], "running")
        await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        await h.application.scheduler.tick(utcnow())  # sends SIGTERM, which the task ignores
    with sqlite3.connect(h.settings.server.database) as db:
        state, reason = db.execute(
            "SELECT state, reason FROM jobs WHERE id = ?", (job["id"],)
        ).fetchone()
    assert (state, reason) == ("cancelled", "cancelled by request while running")


async def test_a_draining_server_refuses_new_work_and_answers_reads(make_harness: Any) -> None:
    async with make_harness(server={"shutdown_grace": "30s"}) as h:
        failed = (await h.client.post("/api/v1/jobs", json={"task": "fail", "args": {}})).json()
        await h.wait_for_state(failed["id"], "failed")
        ready = await h.client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        assert (await h.client.get("/api/v1/system")).json()["draining"] is None
        h.application.drain.begin()  # what the first SIGTERM does
        rows = stored_rows(h)
        new_work = [
            ("/api/v1/jobs", {"task": "add", "args": {"a": 1}}),
            ("/api/v1/start-analysis", {"dataset_id": "d", "complexity": 1}),
            (f"/api/v1/jobs/{failed['id']}/retry", None),
            ("/api/v1/jobs/retry", {"all": True}),
        ]
        for path, body in new_work:
            response = await h.client.post(path, json=body)
            error = assert_error(response, 503, "draining")
            assert response.headers["retry-after"] == api.RETRY_LATER, path
            assert ISO.match(error["details"]["since"]) and ISO.match(
                error["details"]["grace_ends"]
            )
        assert stored_rows(h) == rows
        # Reads go on as before; readiness says the server is going away, liveness not.
        assert (await h.wait_for_state(failed["id"], "failed"))["attempts"] == 1
        status = await h.client.get(f"/api/v1/task-status/{failed['id']}")
        assert status.status_code == 200 and status.json()["status"] == "FAILURE"
        assert (await h.client.get(f"/api/v1/jobs/{failed['id']}/logs")).status_code == 200
        assert (await h.client.get("/")).status_code == 200
        assert (await h.client.get("/healthz")).status_code == 200
        draining = assert_error(await h.client.get("/readyz"), 503, "draining")
        system = (await h.client.get("/api/v1/system")).json()
        assert system["draining"] == draining["details"]
        assert system["draining"]["since"] < system["draining"]["grace_ends"]


def _sample_jobs() -> list[Job]:
    now = utcnow()
    plain = Job(
        id="01A", task="add", args={"waiting_reason": None, "text": 'a "quoted" é'},
        state=JobState.QUEUED, priority=-2, created_at=now, started_at=None,
        finished_at=None, attempts=0, max_retries=1, failures=0, rescues=0, result=None,
        error=None, reason=None, cancel_requested=False, run_after=now, pid=None,
        pid_started_at=None, exit_code=None, peak_rss=None, cpu_seconds=None,
    )  # fmt: skip
    finished = dataclasses.replace(
        plain,
        state=JobState.FAILED,
        started_at=now,
        finished_at=now,
        attempts=1,
        result=[1, {"waiting_reason": "x"}],
        error=JobError("ValueError", "bad", "Traceback..."),
        reason="it failed",
        progress=Progress(0.5, ',"waiting_reason":null', now),
        artifacts=(Artifact("out.txt", 3, "ab" * 32),),
        history=(Attempt(1, now, now, "failed", "ValueError", "bad", 1),),
        depends_on=("01B",),
        owner="alice",
    )
    return [plain, finished]


@pytest.mark.parametrize("reason", [None, "scheduled for 2030-01-01T00:00:00.000Z", 'é "x"'])
def test_a_document_rendered_in_halves_is_the_document_rendered_whole(
    reason: str | None,
) -> None:
    # _answer() joins the halves around the waiting_reason; job_version hashes the whole.
    for job in _sample_jobs():
        before, after = _rendered_halves(job)
        whole = _RENDER.encode(job_document(job, reason)).encode()
        assert _joined(before, _RENDER.encode(reason).encode(), after) == whole
        assert json.loads(whole) == json.loads(json.dumps(job_document(job, reason)))


def test_a_task_route_cannot_shadow_an_api_route() -> None:
    # So tutorial_routes may precede api.routes: config refuses a task route
    # on any path the API serves.
    for route in api.routes:
        path = getattr(route, "path", "")
        assert any(path == r or path.startswith(r + "/") for r in RESERVED_ROUTES), path


# -- bulk cancel and retry -----------------------------------------------------------------


async def test_bulk_cancel_cancels_queued_and_signals_running(make_harness: Any) -> None:
    async with make_harness() as h:

        async def post(body: dict[str, Any]) -> dict[str, Any]:
            response = await h.client.post("/api/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            return dict(response.json())

        running = await post({"task": "sleep", "args": {"seconds": 60}})
        await h.wait_for_state(running["id"], "running")
        queued = [
            await post({"task": "sleep", "args": {"seconds": 60}, "delay": 3600}) for _ in range(3)
        ]
        child = await post({"task": "add", "args": {"a": 1}, "depends_on": [queued[0]["id"]]})
        other = await post({"task": "add", "args": {"a": 1}, "delay": 3600})

        response = await h.client.post("/api/v1/jobs/cancel", json={"task": "sleep"})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["count"] == 4 and answer["truncated"] is False
        assert answer["cascaded"] == 1
        assert set(answer["ids"]) == {running["id"], *(job["id"] for job in queued)}
        for job in queued:
            assert (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "cancelled"
        await h.wait_for_state(child["id"], "cancelled")
        await h.wait_for_state(running["id"], "cancelled")  # the scheduler signalled it
        assert (await h.client.get(f"/api/v1/jobs/{other['id']}")).json()["state"] == "queued"

        # Retry what was cancelled, by state and task: the scheduler is woken for them.
        response = await h.client.post(
            "/api/v1/jobs/retry", json={"task": "sleep", "state": ["cancelled"]}
        )
        assert response.status_code == 200, response.text
        assert response.json()["count"] == 4
        await h.wait_for_state(running["id"], "running")
        for job in queued:  # a retry drops the delay: they run again
            await h.wait_for_state(job["id"], "queued", "running")


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("cancel", {}, "body"),
        ("cancel", {"all": False}, "body"),
        ("retry", {}, "body"),
        ("cancel", [], "body"),
        ("cancel", {"task": "nosuch"}, "task"),
        ("cancel", {"task": None}, "task"),  # no criterion: it would select every job
        ("cancel", {"state": "failed"}, "state"),
        ("retry", {"state": ["queued"]}, "state"),
        ("cancel", {"state": []}, "state"),
        ("cancel", {"older_than": -1}, "older_than"),
        ("cancel", {"older_than": "1h"}, "older_than"),
        ("cancel", {"before": "yesterday"}, "before"),
        ("cancel", {"before": "2030-01-01T00:00:00"}, "before"),  # no UTC offset
        ("cancel", {"all": "yes"}, "all"),
        ("cancel", {"tasks": "sleep"}, "tasks"),
    ],
)
async def test_bad_bulk_filters_are_refused_and_change_nothing(
    make_harness: Any, path: str, body: Any, field: str
) -> None:
    async with make_harness() as h:
        job = (
            await h.client.post(
                "/api/v1/jobs", json={"task": "sleep", "args": {"seconds": 1}, "delay": 3600}
            )
        ).json()
        error = assert_error(
            await h.client.post(f"/api/v1/jobs/{path}", json=body), 422, "validation_error"
        )
        assert field in [problem["field"] for problem in error["details"]]
        assert (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()["state"] == "queued"


async def test_bulk_cancel_of_all_and_by_age(make_harness: Any) -> None:
    async with make_harness() as h:
        job = (
            await h.client.post(
                "/api/v1/jobs", json={"task": "sleep", "args": {"seconds": 1}, "delay": 3600}
            )
        ).json()
        young = await h.client.post("/api/v1/jobs/cancel", json={"older_than": 3600})
        assert young.json() == {"count": 0, "ids": [], "truncated": False, "cascaded": 0}
        old = await h.client.post("/api/v1/jobs/cancel", json={"before": "2000-01-01T00:00:00Z"})
        assert old.json()["count"] == 0
        everything = await h.client.post("/api/v1/jobs/cancel", json={"all": True})
        assert everything.json()["ids"] == [job["id"]]


async def test_paging_with_the_largest_limit_sees_every_job_once(make_harness: Any) -> None:
    # One page more than MAX_PAGE: the API asks the store for limit + 1 rows to learn
    # whether a next page exists, so the store must not cap that below MAX_PAGE + 1.
    async with make_harness() as h:
        store = h.application.store
        count = api.MAX_PAGE + 5
        # Due tomorrow: they stay queued while the test pages.
        new = NewJob("add", {"a": 1, "b": 2}, 0, 0, run_after=utcnow() + timedelta(days=1))
        ids = [new_job_id() for _ in range(count)]
        await asyncio.gather(*(store.submit(new, job_id, utcnow()) for job_id in ids))
        seen: list[str] = []
        cursor = None
        while True:
            params = {"limit": str(api.MAX_PAGE), **({"cursor": cursor} if cursor else {})}
            page = (await h.client.get("/api/v1/jobs", params=params)).json()
            seen += [job["id"] for job in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == count and set(seen) == set(ids)
        assert sorted(seen, reverse=True) == seen


async def test_a_405_allows_the_methods_of_every_route_on_its_path(make_harness: Any) -> None:
    """GET and POST /api/v1/jobs are two routes: Starlette's own Allow named only the first."""
    async with make_harness() as h:
        for method, path, allowed in [
            ("OPTIONS", "/api/v1/jobs", "GET, HEAD, POST"),
            ("DELETE", "/api/v1/jobs", "GET, HEAD, POST"),
            ("OPTIONS", "/api/v1/system", "GET, HEAD, PATCH"),
            ("PUT", "/api/v1/jobs/some-id", "GET, HEAD"),
            # also the path of /api/v1/jobs/{job_id}: the literal route's methods
            ("OPTIONS", "/api/v1/jobs/cancel", "POST"),
        ]:
            response = await h.client.request(method, path)
            assert_error(response, 405, "method_not_allowed")
            assert response.headers["allow"] == allowed, (method, path)


async def test_reading_a_job_refuses_unknown_query_parameters(make_harness: Any) -> None:
    """Like the listing and the logs: a misspelt ``wait`` is a 422, not a poll that
    answers at once."""
    async with make_harness() as h:
        job = await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1, "b": 2}})
        job_id = job.json()["id"]
        response = await h.client.get(f"/api/v1/jobs/{job_id}", params={"wiat": "5", "wait": "x"})
        error = assert_error(response, 422, "validation_error")
        assert {(d["field"], d["message"].split(" from ")[0]) for d in error["details"]} == {
            ("wiat", "unknown query parameter"),
            ("wait", "expected a number of seconds"),
        }
        response = await h.client.get(f"/api/v1/jobs/{job_id}", params={"wait": "0"})
        assert response.status_code == 200
