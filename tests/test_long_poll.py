"""Long polling (``GET /api/v1/jobs/{id}?wait=N``), Server-Sent Events and the Retry-After
hint, in process over a real SQLite file with real child processes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from jobserver.api import job_version
from tests.conftest import Harness, ServerProcess, write_config
from tests.test_api import assert_error


async def submit(h: Harness, task: str, **args: Any) -> dict[str, Any]:
    response = await h.client.post("/api/v1/jobs", json={"task": task, "args": args})
    assert response.status_code == 202, response.text
    document: dict[str, Any] = response.json()
    return document


def job_reads(h: Harness) -> list[str]:
    """Every statement that reads one job by id, on any of the store's connections."""
    seen: list[str] = []

    def trace(statement: str) -> None:  # sqlite3 passes it with the parameters filled in
        if "WHERE jobs.id = " in statement and statement.lstrip().startswith("SELECT"):
            seen.append(statement)

    h.application.driver.trace(trace)
    return seen


@pytest.mark.anyio
async def test_wait_answers_as_soon_as_the_job_changes(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        marker = tmp_path / "go"
        job = await submit(h, "wait_for_file", path=str(marker))
        running = await h.wait_for_state(job["id"], "running")
        reads = job_reads(h)

        async def finish_soon() -> None:
            await anyio.sleep(0.5)
            marker.write_text("done")

        async with anyio.create_task_group() as group:
            group.start_soon(finish_soon)
            started = time.monotonic()
            response = await h.client.get(f"/api/v1/jobs/{job['id']}", params={"wait": 30})
            took = time.monotonic() - started
        assert response.status_code == 200
        assert response.json()["state"] == "succeeded"
        assert response.json()["result"] == "done"
        assert 0.4 < took < 10
        # No busy polling: the row was read when the request came and once per change.
        assert len(reads) <= 3, reads
        assert running["state"] == "running"


@pytest.mark.anyio
async def test_wait_returns_the_unchanged_document_after_the_timeout(
    make_harness: Any, tmp_path: Path
) -> None:
    async with make_harness() as h:
        job = await submit(h, "wait_for_file", path=str(tmp_path / "never"))
        running = await h.wait_for_state(job["id"], "running")
        # The row shows running from the claim on; the start's event (which wakes waiters)
        # is told once the process has started: let it pass before waiting.
        await h.application.scheduler.starts_settled(timeout=10)
        reads = job_reads(h)
        started = time.monotonic()
        response = await h.client.get(f"/api/v1/jobs/{job['id']}?wait=1.5")
        took = time.monotonic() - started
        assert response.status_code == 200
        assert 1.4 < took < 5
        document = response.json()
        assert document["state"] == "running" and document["id"] == running["id"]
        assert response.headers["retry-after"] == "1"
        assert response.headers["etag"]
        assert len(reads) == 1, reads  # one read at the start, none while waiting


@pytest.mark.anyio
async def test_if_none_match_returns_at_once_when_the_client_is_behind(
    make_harness: Any, tmp_path: Path
) -> None:
    async with make_harness() as h:
        job = await submit(h, "wait_for_file", path=str(tmp_path / "never"))
        first = await h.client.get(f"/api/v1/jobs/{job['id']}")
        tag = first.headers["etag"]
        await h.wait_for_state(job["id"], "running")
        started = time.monotonic()
        response = await h.client.get(
            f"/api/v1/jobs/{job['id']}?wait=30", headers={"If-None-Match": tag}
        )
        assert time.monotonic() - started < 5
        assert response.json()["state"] == "running"
        assert response.headers["etag"] != tag


@pytest.mark.anyio
async def test_a_finished_job_is_answered_at_once_without_retry_after(make_harness: Any) -> None:
    async with make_harness() as h:
        job = await submit(h, "add", a=1, b=2)
        done = await h.wait_for_state(job["id"], "succeeded")
        started = time.monotonic()
        response = await h.client.get(f"/api/v1/jobs/{job['id']}?wait=30")
        assert time.monotonic() - started < 2
        assert response.json() == done | {"waiting_reason": None}
        assert "retry-after" not in response.headers
        status = await h.client.get(f"/api/v1/task-status/{job['id']}")
        assert status.json()["status"] == "SUCCESS" and "retry-after" not in status.headers


@pytest.mark.anyio
async def test_every_answer_about_a_job_carries_the_same_etag(make_harness: Any) -> None:
    # A finished job's ETag is hashed from its rendered body, a queued one's (it has a
    # waiting_reason) from its document rendered again without it: both job_version(job).
    async with make_harness() as h:
        done = await submit(h, "add", a=1, b=2)
        await h.wait_for_state(done["id"], "succeeded")
        body = {"task": "add", "args": {"a": 1}, "delay": 3600}
        parked = (await h.client.post("/api/v1/jobs", json=body)).json()
        assert parked["waiting_reason"]
        for job_id in (done["id"], parked["id"]):
            expected = job_version(await h.application.store.get(job_id))
            for path in (f"/api/v1/jobs/{job_id}", f"/api/v1/task-status/{job_id}"):
                assert (await h.client.get(path)).headers["etag"] == expected, path
        # A change is seen at once, though the last answer's rendering is remembered.
        before = await h.client.get(f"/api/v1/jobs/{parked['id']}")
        await h.client.post(f"/api/v1/jobs/{parked['id']}/cancel")
        after = await h.client.get(f"/api/v1/jobs/{parked['id']}")
        assert (before.json()["state"], after.json()["state"]) == ("queued", "cancelled")
        assert after.headers["etag"] != before.headers["etag"]
        assert after.headers["etag"] == job_version(await h.application.store.get(parked["id"]))


@pytest.mark.anyio
async def test_cancel_request_wakes_a_waiting_reader(make_harness: Any) -> None:
    async with make_harness() as h:
        job = await submit(h, "ignore_sigterm", seconds=60)
        await h.wait_for_state(job["id"], "running")
        answers: list[dict[str, Any]] = []

        async def wait() -> None:
            response = await h.client.get(f"/api/v1/jobs/{job['id']}?wait=30")
            answers.append(response.json())

        async with anyio.create_task_group() as group:
            group.start_soon(wait)
            await anyio.sleep(0.3)
            await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        assert answers[0]["cancel_requested"] is True
        await h.wait_for_state(job["id"], "cancelled")


@pytest.mark.anyio
async def test_unfinished_jobs_carry_retry_after(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness(scheduler={"max_jobs": 1}) as h:
        first = await submit(h, "wait_for_file", path=str(tmp_path / "never"))
        await h.wait_for_state(first["id"], "running")
        second = await submit(h, "add", a=1)
        for path in (
            f"/api/v1/jobs/{second['id']}",
            f"/api/v1/task-status/{second['id']}",
            f"/api/v1/jobs/{first['id']}",
            f"/api/v1/task-status/{first['id']}",
        ):
            response = await h.client.get(path)
            assert response.headers["retry-after"] == "1", path
        submitted = await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})
        assert submitted.headers["retry-after"] == "1" and submitted.headers["etag"]
        tutorial = await h.client.post(
            "/api/v1/start-analysis", json={"dataset_id": "x", "complexity": 0}
        )
        assert tutorial.status_code == 202 and tutorial.headers["retry-after"] == "1"
        cancelled = await h.client.post(f"/api/v1/jobs/{first['id']}/cancel")
        assert cancelled.status_code == 202 and cancelled.headers["retry-after"] == "1"


@pytest.mark.anyio
@pytest.mark.parametrize("wait", ["-1", "61", "abc", "nan", "inf", ""])
async def test_bad_wait_values_are_rejected(make_harness: Any, wait: str) -> None:
    async with make_harness() as h:
        job = await submit(h, "add", a=1)
        response = await h.client.get(f"/api/v1/jobs/{job['id']}?wait={wait}")
        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["field"] == "wait"
        assert "0 to 60" in error["details"][0]["message"]


@pytest.mark.anyio
async def test_wait_on_an_unknown_job_is_404(make_harness: Any) -> None:
    async with make_harness() as h:
        response = await h.client.get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV?wait=5")
        assert_error(response, 404, "not_found")
        response = await h.client.get("/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/events")
        assert_error(response, 404, "not_found")


@pytest.mark.integration
def test_server_sent_events_follow_a_job_to_its_end(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    # A real server: the in-process transport buffers whole responses, a stream included.
    server = server_factory(write_config(tmp_path))
    marker = tmp_path / "go"
    job = httpx.post(
        f"{server.url}/api/v1/jobs",
        json={"task": "wait_for_file", "args": {"path": str(marker)}},
        timeout=10,
    ).json()
    states: list[str] = []
    names: list[str] = []
    url = f"{server.url}/api/v1/jobs/{job['id']}/events"
    with httpx.stream("GET", url, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
                names.append(name)
            elif line.startswith("data: ") and name == "job":
                document = json.loads(line.removeprefix("data: "))
                if not states or states[-1] != document["state"]:
                    states.append(document["state"])
                if document["state"] == "running" and not marker.exists():
                    marker.write_text("ok")
    assert states[-1] == "succeeded"
    assert "running" in states
    assert names[-1] == "end"


@pytest.mark.integration
def test_stopping_the_server_answers_waiting_readers_at_once(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    import threading

    server = server_factory(write_config(tmp_path))
    job = httpx.post(
        f"{server.url}/api/v1/jobs",
        json={"task": "wait_for_file", "args": {"path": str(tmp_path / "never")}},
        timeout=10,
    ).json()
    answers: list[tuple[int, str]] = []
    streams: list[str] = []

    def poll() -> None:
        response = httpx.get(f"{server.url}/api/v1/jobs/{job['id']}?wait=60", timeout=70)
        answers.append((response.status_code, response.json()["state"]))

    def stream() -> None:
        url = f"{server.url}/api/v1/jobs/{job['id']}/events"
        with httpx.stream("GET", url, timeout=70) as response:
            streams.extend(response.iter_lines())

    readers = [threading.Thread(target=poll), threading.Thread(target=stream)]
    for reader in readers:
        reader.start()
    deadline = time.monotonic() + 10
    while not any(line.startswith("event: job") for line in streams):
        assert time.monotonic() < deadline, "the event stream never started"
        time.sleep(0.05)
    time.sleep(0.3)  # the long poll is waiting too
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 4  # not uvicorn's 5 s grace for open requests
    for reader in readers:
        reader.join(timeout=10)
    assert answers and answers[0][0] == 200 and answers[0][1] in ("queued", "running")
    assert "Traceback" not in server.log()
