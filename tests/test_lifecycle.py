"""The job lifecycle through the HTTP API (in process, real child processes, real SQLite):
retries and history, timeouts, client retries, delayed jobs, idempotent submits, progress,
logs, artifacts, command tasks and dependencies."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from jobserver.jobs import format_timestamp, utcnow
from jobserver.scheduler import retry_delay
from tests.conftest import Harness
from tests.test_api import assert_error, stored_rows

pytestmark = pytest.mark.anyio

FAST_RETRIES = {"retry_base": "50ms", "retry_cap": "100ms", "progress_interval": 0}


async def post(h: Harness, body: dict[str, Any], **kwargs: Any) -> Any:
    return await h.client.post("/api/v1/jobs", json=body, **kwargs)


async def submitted(h: Harness, body: dict[str, Any]) -> dict[str, Any]:
    response = await post(h, body)
    assert response.status_code == 202, response.text
    document: dict[str, Any] = response.json()
    return document


def table_rows(h: Harness, table: str) -> int:
    with sqlite3.connect(h.settings.server.database) as db:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- retries, backoff, history ---------------------------------------------------------


def test_backoff_base_and_cap_are_parameters() -> None:
    assert retry_delay(1, 0.0) == 1.0
    assert retry_delay(3, 0.0) == 4.0
    assert retry_delay(30, 0.0) == 300.0
    assert retry_delay(1, 0.0, base=10, cap=15) == 10
    assert retry_delay(2, 0.0, base=10, cap=15) == 15
    assert retry_delay(2, 0.5, base=10, cap=100) == pytest.approx(22.0)
    assert retry_delay(10_000, 0.99, base=1, cap=5) <= 6.0


async def test_a_retry_waits_with_a_reason_and_history(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness(jobs={"retry_base": "1h", "retry_cap": "2h"}) as h:
        args = {"marker_dir": str(tmp_path / "m"), "failures": 1}
        job = await submitted(h, {"task": "flaky", "args": args})

        async def retrying() -> dict[str, Any]:
            while True:
                document: dict[str, Any] = (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()
                if document["history"] and document["history"][0]["outcome"] == "retrying":
                    return document
                await asyncio.sleep(0.02)

        document = await asyncio.wait_for(retrying(), 30)
        assert document["state"] == "queued" and document["attempts"] == 1
        assert document["waiting_reason"].startswith("scheduled for ")
        assert "retry 1 of 2" in document["waiting_reason"]
        # base 1 h, up to 20% jitter
        delay = (
            datetime_of(document["run_after"]) - datetime_of(document["history"][0]["finished_at"])
        ).total_seconds()
        assert 3600 <= delay <= 3600 * 1.2 + 1
        entry = document["history"][0]
        assert entry["attempt"] == 1 and entry["exit_code"] == 1
        assert entry["error"] == {"type": "RuntimeError", "message": "flaky failure 1"}


def datetime_of(text: str) -> Any:
    from jobserver.jobs import parse_timestamp

    return parse_timestamp(text)


async def test_history_lists_every_attempt(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness(jobs=FAST_RETRIES) as h:
        args = {"marker_dir": str(tmp_path / "m"), "failures": 1}
        job = await submitted(h, {"task": "flaky", "args": args})
        done = await h.wait_for_state(job["id"], "succeeded", "failed")
        assert done["state"] == "succeeded" and done["attempts"] == 2
        assert [(a["attempt"], a["outcome"]) for a in done["history"]] == [
            (1, "retrying"),
            (2, "succeeded"),
        ]
        for entry in done["history"]:
            assert entry["started_at"] <= entry["finished_at"]


async def test_per_task_backoff_overrides_the_global_one(make_harness: Any, tmp_path: Path) -> None:
    from tests.conftest import SAMPLE_TASKS

    tasks = dict(SAMPLE_TASKS)
    tasks["flaky"] = {**tasks["flaky"], "retry_base": "2h", "retry_cap": "3h"}
    async with make_harness(tasks=tasks, jobs={"retry_base": "1s"}) as h:
        args = {"marker_dir": str(tmp_path / "m"), "failures": 5}
        job = await submitted(h, {"task": "flaky", "args": args})
        while not (document := (await h.client.get(f"/api/v1/jobs/{job['id']}")).json())[
            "run_after"
        ]:
            await asyncio.sleep(0.02)
        waited = datetime_of(document["run_after"]) - utcnow()
        assert timedelta(hours=1, minutes=59) < waited <= timedelta(hours=2.5)


async def test_submit_may_override_max_retries_within_the_limit(
    make_harness: Any, tmp_path: Path
) -> None:
    async with make_harness(jobs={**FAST_RETRIES, "max_retries_limit": 3}) as h:
        args = {"marker_dir": str(tmp_path / "m"), "failures": 10}
        job = await submitted(h, {"task": "flaky", "args": args, "max_retries": 0})
        assert job["max_retries"] == 0
        done = await h.wait_for_state(job["id"], "failed")
        assert done["attempts"] == 1
        for bad in (4, -1, "2", True, 1.5):
            response = await post(h, {"task": "flaky", "args": args, "max_retries": bad})
            error = assert_error(response, 422, "validation_error")
            assert error["details"][0]["field"] == "max_retries"
        assert stored_rows(h) == 1


# -- timeouts -------------------------------------------------------------------------


async def test_per_job_timeout_overrides_the_task(make_harness: Any) -> None:
    async with make_harness() as h:
        job = await submitted(h, {"task": "sleep", "args": {"seconds": 30}, "timeout": 0.3})
        assert job["timeout"] == 0.3
        done = await h.wait_for_state(job["id"], "failed")
        assert done["error"]["type"] == "Timeout"
        assert done["error"]["message"] == "timed out after 0.3 s"
        assert done["history"][0]["outcome"] == "failed"
        for bad in (0, -1, "5m", None):
            response = await post(h, {"task": "sleep", "args": {"seconds": 1}, "timeout": bad})
            assert_error(response, 422, "validation_error")
        assert stored_rows(h) == 1


async def test_timeout_is_retried_only_when_the_task_allows(make_harness: Any) -> None:
    async with make_harness(jobs=FAST_RETRIES) as h:
        job = await submitted(h, {"task": "slow_retry", "args": {"seconds": 30}})
        done = await h.wait_for_state(job["id"], "failed")
        assert done["attempts"] == 2
        assert [a["outcome"] for a in done["history"]] == ["retrying", "failed"]
        assert all(a["error"]["type"] == "Timeout" for a in done["history"])
        # The same timeout on a task without retry_on_timeout: no retry despite max_retries.
        other = await submitted(
            h, {"task": "sleep", "args": {"seconds": 30}, "timeout": 0.2, "max_retries": 2}
        )
        done = await h.wait_for_state(other["id"], "failed")
        assert done["attempts"] == 1 and done["error"]["type"] == "Timeout"


# -- client retry ---------------------------------------------------------------------


async def test_retry_a_failed_job_as_a_new_attempt(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        gate = tmp_path / "gate"
        args = {"marker_dir": str(tmp_path / "m"), "failures": 1}
        job = await submitted(h, {"task": "flaky", "args": args, "max_retries": 0})
        await h.wait_for_state(job["id"], "failed")
        response = await h.client.post(f"/api/v1/jobs/{job['id']}/retry")
        assert response.status_code == 202, response.text
        assert response.json()["state"] == "queued"
        assert response.json()["finished_at"] is None and response.json()["error"] is None
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["attempts"] == 2
        assert [a["outcome"] for a in done["history"]] == ["failed", "succeeded"]
        # Succeeded, running and queued jobs cannot be retried; unknown ids are 404.
        assert_error(await h.client.post(f"/api/v1/jobs/{job['id']}/retry"), 409, "invalid_state")
        running = await submitted(h, {"task": "wait_for_file", "args": {"path": str(gate)}})
        await h.wait_for_state(running["id"], "running")
        assert_error(
            await h.client.post(f"/api/v1/jobs/{running['id']}/retry"), 409, "invalid_state"
        )
        later = await submitted(h, {"task": "add", "args": {"a": 1}, "delay": 3600})
        assert_error(await h.client.post(f"/api/v1/jobs/{later['id']}/retry"), 409, "invalid_state")
        assert_error(
            await h.client.post("/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ/retry"), 404, "not_found"
        )
        gate.write_text("x")
        # A cancelled job can be retried too.
        await h.client.post(f"/api/v1/jobs/{later['id']}/cancel")
        response = await h.client.post(f"/api/v1/jobs/{later['id']}/retry")
        assert response.status_code == 202
        assert (await h.wait_for_state(later["id"], "succeeded"))["result"] == 1


# -- later ----------------------------------------------------------------------------


async def test_delay_and_run_at_wait_in_the_queue(make_harness: Any) -> None:
    async with make_harness() as h:
        later = await submitted(h, {"task": "add", "args": {"a": 1}, "delay": 3600})
        assert later["state"] == "queued"
        assert later["waiting_reason"].startswith("scheduled for ")
        assert later["waiting_reason"] == f"scheduled for {later['run_after']}"
        run_at = (utcnow() + timedelta(days=2)).replace(microsecond=0)
        text = run_at.astimezone().isoformat()  # with the local offset
        dated = await submitted(h, {"task": "add", "args": {"a": 2}, "run_at": text})
        assert dated["run_after"] == format_timestamp(run_at)
        soon = await submitted(h, {"task": "add", "args": {"a": 3}, "delay": 0.2})
        past = await submitted(
            h, {"task": "add", "args": {"a": 4}, "run_at": "2020-01-01T00:00:00Z"}
        )
        assert (await h.wait_for_state(soon["id"], "succeeded"))["result"] == 3
        assert (await h.wait_for_state(past["id"], "succeeded"))["result"] == 4
        await h.application.scheduler.tick(utcnow())
        assert (await h.client.get(f"/api/v1/jobs/{later['id']}")).json()["state"] == "queued"
        status = (await h.client.get(f"/api/v1/task-status/{later['id']}")).json()
        assert status["status"] == "PENDING" and "scheduled for" in status["waiting_reason"]


@pytest.mark.parametrize(
    "extra",
    [
        {"delay": 5, "run_at": "2030-01-01T00:00:00Z"},
        {"delay": -1},
        {"delay": "5"},
        {"delay": 10**9},
        {"run_at": "2030-01-01T00:00:00"},  # no offset
        {"run_at": "tomorrow"},
        {"run_at": 1700000000},
        {"run_at": "2999-01-01T00:00:00Z"},
    ],
)
async def test_bad_run_at_or_delay_store_nothing(make_harness: Any, extra: dict[str, Any]) -> None:
    async with make_harness() as h:
        response = await post(h, {"task": "add", "args": {"a": 1}, **extra})
        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["field"] in ("run_at", "delay")
        assert stored_rows(h) == 0


# -- idempotency ----------------------------------------------------------------------


async def test_idempotency_key_returns_the_original_job(make_harness: Any) -> None:
    async with make_harness() as h:
        body = {"task": "add", "args": {"a": 1, "b": 2}}
        key = {"Idempotency-Key": "4d9a5c1e-client-retry"}
        first = await post(h, body, headers=key)
        assert first.status_code == 202
        again = await post(h, body, headers=key)
        assert again.status_code == 200
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        different = await post(h, {"task": "add", "args": {"a": 9}}, headers=key)
        error = assert_error(different, 409, "conflict")
        assert error["details"]["job_id"] == first.json()["id"]
        other_key = await post(h, body, headers={"Idempotency-Key": "another"})
        assert other_key.status_code == 202 and other_key.json()["id"] != first.json()["id"]
        assert stored_rows(h) == 2
        # The tutorial route honours the header too.
        tutorial = {"dataset_id": "d", "complexity": 0}
        one = await h.client.post(
            "/api/v1/start-analysis", json=tutorial, headers=key | {"Idempotency-Key": "tutorial-1"}
        )
        two = await h.client.post(
            "/api/v1/start-analysis", json=tutorial, headers={"Idempotency-Key": "tutorial-1"}
        )
        assert (one.status_code, two.status_code) == (202, 200)
        assert one.json()["task_id"] == two.json()["task_id"]
        assert one.headers["retry-after"] == "1"
        # The key repeated once the job has finished: its answer, without Retry-After.
        await h.wait_for_state(one.json()["task_id"], "succeeded")
        three = await h.client.post(
            "/api/v1/start-analysis", json=tutorial, headers={"Idempotency-Key": "tutorial-1"}
        )
        assert three.status_code == 200 and "retry-after" not in three.headers
        assert three.json()["task_id"] == one.json()["task_id"]


async def test_idempotency_key_expires_after_the_window(make_harness: Any) -> None:
    async with make_harness(jobs={"idempotency_window": "1s"}) as h:
        body = {"task": "add", "args": {"a": 1}}
        first = await post(h, body, headers={"Idempotency-Key": "k"})
        with sqlite3.connect(h.settings.server.database) as db:
            db.execute("UPDATE idempotency_keys SET created_at = '2000-01-01T00:00:00.000Z'")
        second = await post(h, body, headers={"Idempotency-Key": "k"})
        assert second.status_code == 202 and second.json()["id"] != first.json()["id"]
        assert table_rows(h, "idempotency_keys") == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "naïve"])
async def test_bad_idempotency_keys_store_nothing(make_harness: Any, key: str) -> None:
    async with make_harness() as h:
        response = await h.client.post(
            "/api/v1/jobs",
            content=b'{"task": "add", "args": {"a": 1}}',
            headers={"content-type": "application/json", "Idempotency-Key": key.encode()},
        )
        assert_error(response, 422, "validation_error")
        assert stored_rows(h) == 0 and table_rows(h, "idempotency_keys") == 0


async def test_a_rejected_body_does_not_claim_the_key(make_harness: Any) -> None:
    async with make_harness() as h:
        key = {"Idempotency-Key": "k1"}
        assert_error(
            await post(h, {"task": "add", "args": {}}, headers=key), 422, "validation_error"
        )
        assert (await post(h, {"task": "add", "args": {"a": 1}}, headers=key)).status_code == 202
        assert stored_rows(h) == 1


# -- progress -------------------------------------------------------------------------


async def test_progress_reaches_the_job_document_and_task_status(
    make_harness: Any, tmp_path: Path
) -> None:
    async with make_harness(jobs=FAST_RETRIES) as h:
        gate = tmp_path / "gate"
        job = await submitted(h, {"task": "report", "args": {"gate": str(gate)}})
        assert job["progress"] is None
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            document = (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()
            if document["progress"] and document["progress"]["fraction"] == 1.0:
                break
            assert asyncio.get_running_loop().time() < deadline, document
            await asyncio.sleep(0.02)
        assert document["state"] == "running"
        assert document["progress"]["message"] == "step 3 of 3"
        assert document["progress"]["updated_at"] >= document["started_at"]
        status = (await h.client.get(f"/api/v1/task-status/{job['id']}")).json()
        assert status == {
            "task_id": job["id"],
            "status": "STARTED",
            "info": {"fraction": 1.0, "message": "step 3 of 3"},
        }
        gate.write_text("go")
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["progress"]["fraction"] == 1.0


async def test_stored_progress_is_rate_limited(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness(jobs={"progress_interval": "1h"}) as h:
        gate = tmp_path / "gate"
        job = await submitted(h, {"task": "report", "args": {"gate": str(gate), "steps": 5}})
        await h.wait_for_state(job["id"], "running")
        deadline = asyncio.get_running_loop().time() + 20
        while not (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()["progress"]:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        log = h.settings.server.jobs_dir / job["id"] / "output.log"
        # Every report has been sent (the log appears with the job's first output).
        while not log.exists() or "all reported" not in log.read_text():
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        await h.application.scheduler.tick(utcnow())
        document = (await h.client.get(f"/api/v1/jobs/{job['id']}")).json()
        assert document["progress"]["fraction"] < 1.0  # later ones wait for the interval
        gate.write_text("go")
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["progress"]["fraction"] == 1.0  # the last one is stored at the end


def test_progress_outside_a_job_is_a_no_op() -> None:
    from jobserver import progress
    from jobserver.reporting import parse_line

    assert progress(0.5, "x") is False
    with pytest.raises(ValueError, match="from 0 to 1"):
        progress(1.5)
    with pytest.raises(TypeError):
        progress("half")  # type: ignore[arg-type]
    assert parse_line("JOBSERVER_PROGRESS 0.4 resizing frames") == (0.4, "resizing frames")
    assert parse_line("JOBSERVER_PROGRESS 1") == (1.0, "")
    assert parse_line("JOBSERVER_PROGRESS 2 too far") is None
    assert parse_line("JOBSERVER_PROGRESSX 0.1") is None
    assert parse_line('{"fraction": null, "message": "m"}') == (None, "m")
    assert parse_line("plain output") is None


# -- logs -----------------------------------------------------------------------------


async def test_logs_whole_tail_and_follow(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        job = await submitted(h, {"task": "chatty", "args": {"lines": 5, "width": 3}})
        await h.wait_for_state(job["id"], "succeeded")
        response = await h.client.get(f"/api/v1/jobs/{job['id']}/logs")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text.startswith("--- attempt 1 started ")
        assert "00000004 xxx\n" in response.text
        tail = await h.client.get(f"/api/v1/jobs/{job['id']}/logs", params={"tail": 2})
        assert tail.text == "00000003 xxx\n00000004 xxx\n"
        gate = tmp_path / "gate"
        waiting = await submitted(h, {"task": "wait_for_file", "args": {"path": str(gate)}})
        await h.wait_for_state(waiting["id"], "running")
        follow = asyncio.create_task(
            h.client.get(f"/api/v1/jobs/{waiting['id']}/logs", params={"follow": 1})
        )
        await asyncio.sleep(0.3)
        assert not follow.done()  # streams until the job ends
        gate.write_text("x")
        response = await asyncio.wait_for(follow, 20)
        assert response.status_code == 200 and "--- attempt 1 started" in response.text
        for params in ({"tail": "-1"}, {"tail": "x"}, {"follow": "yes"}, {"grep": "x"}):
            bad = await h.client.get(f"/api/v1/jobs/{job['id']}/logs", params=params)
            assert_error(bad, 422, "validation_error")
        missing = await h.client.get("/api/v1/jobs/01ZZZZZZZZZZZZZZZZZZZZZZZZ/logs")
        assert_error(missing, 404, "not_found")


async def test_log_cap_is_enforced_while_the_job_writes(make_harness: Any) -> None:
    async with make_harness(jobs={"max_log_size": "4KiB"}) as h:
        job = await submitted(h, {"task": "chatty", "args": {"lines": 2000}})
        done = await h.wait_for_state(job["id"], "succeeded")
        assert done["result"] == 2000  # the job never blocked on its output
        path = h.settings.server.jobs_dir / job["id"] / "output.log"
        text = path.read_text()
        assert text.rstrip().endswith("further output discarded")
        assert "max_log_size (4096 bytes) reached" in text
        assert path.stat().st_size < 4096 + 200


# -- artifacts ------------------------------------------------------------------------


async def test_artifacts_are_listed_and_served(make_harness: Any, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    async with make_harness() as h:
        job = await submitted(
            h,
            {
                "task": "make_files",
                "args": {"names": ["report.csv", "frames.txt"], "link_to": str(secret)},
            },
        )
        done = await h.wait_for_state(job["id"], "succeeded")
        content = b"content of report.csv"
        assert done["artifacts"] == [
            {"name": "frames.txt", "size": 21, "sha256": sha("content of frames.txt")},
            {"name": "report.csv", "size": len(content), "sha256": sha("content of report.csv")},
        ]
        base = f"/api/v1/jobs/{job['id']}/artifacts"
        response = await h.client.get(f"{base}/report.csv")
        assert response.status_code == 200 and response.content == content
        assert response.headers["x-checksum-sha256"] == sha("content of report.csv")
        for name in (
            "link",  # a symlink pointing outside: not an artifact
            "%2e%2e",
            "..%2Foutput.log",
            "..%2F..%2Fsecret.txt",
            "%2Fetc%2Fpasswd",
            "report.csv%00",
            "nope.txt",
        ):
            response = await h.client.get(f"{base}/{name}")
            assert response.status_code == 404, (name, response.text)
            assert "outside" not in response.text
        # Clients normalise dot segments; what reaches the server is never a file outside.
        for path in (f"{base}/../output.log", f"{base}//etc/passwd", f"{base}/a/../../x"):
            response = await h.client.get(path)
            assert "outside" not in response.text and "attempt 1 started" not in response.text
            assert response.status_code in (404, 405)
        # A listed name replaced by a symlink afterwards is refused, not followed.
        listed = h.settings.server.jobs_dir / job["id"] / "artifacts" / "frames.txt"
        listed.unlink()
        listed.symlink_to(secret)
        response = await h.client.get(f"{base}/frames.txt")
        assert response.status_code == 404 and "outside" not in response.text


def test_artifact_names_must_be_one_plain_file_name() -> None:
    from jobserver.api import _safe_name

    for bad in ("", ".", "..", "../x", "/etc/passwd", "a/b", "a\\b", "x\x00"):
        assert not _safe_name(bad), bad
    for good in ("report.csv", ".hidden", "a..b", "frames 01.png"):
        assert _safe_name(good), good


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- command tasks --------------------------------------------------------------------


INJECTIONS = [
    "two words",
    'it\'s "quoted"',
    "x; touch /tmp/jobserver-injected",
    "$(touch /tmp/jobserver-injected)",
    "`id`",
    "a\nb",
    "{n}",
    "*",
]


@pytest.mark.parametrize("value", INJECTIONS)
async def test_command_placeholders_fill_exactly_one_argument(
    make_harness: Any, value: str
) -> None:
    async with make_harness(jobs={"progress_interval": 0}) as h:
        job = await submitted(h, {"task": "argv", "args": {"src": value, "n": 3}})
        done = await h.wait_for_state(job["id"], "succeeded", "failed")
        assert done["state"] == "succeeded", done
        assert done["result"] == [value, "-n", "3"]
        assert not Path("/tmp/jobserver-injected").exists()
        assert done["progress"]["fraction"] == 0.5
        assert done["progress"]["message"] == "half way"
        assert [a["name"] for a in done["artifacts"]] == ["argv.json"]
        log = (await h.client.get(f"/api/v1/jobs/{job['id']}/logs")).text
        assert "to stderr" in log and "some text output" in log


async def test_command_params_are_typed_and_dashes_are_refused(make_harness: Any) -> None:
    async with make_harness() as h:
        for args in (
            {"src": "-rf", "n": 1},
            {"src": "--output=/etc/x", "n": 1},
            {"src": "a", "n": "3"},
            {"src": "a"},
            {"src": "a", "n": 1, "extra": 1},
            {"src": "nul\u0000byte", "n": 1},
        ):
            response = await post(h, {"task": "argv", "args": args})
            assert_error(response, 422, "validation_error")
        assert stored_rows(h) == 0
        job = await submitted(h, {"task": "dash_ok", "args": {"offset": "-5"}})
        assert (await h.wait_for_state(job["id"], "succeeded"))["result"] == ["-5"]
        tasks = (await h.client.get("/api/v1/tasks")).json()["tasks"]
        argv = next(t for t in tasks if t["name"] == "argv")
        assert argv["kind"] == "command" and argv["command"][-3:] == ["{src}", "-n", "{n}"]
        assert [p["name"] for p in argv["params"]] == ["src", "n"]


async def test_command_exit_codes_decide_the_outcome(make_harness: Any) -> None:
    async with make_harness() as h:
        job = await submitted(h, {"task": "cmd_exit", "args": {"code": 3}})
        done = await h.wait_for_state(job["id"], "failed")
        assert done["error"]["type"] == "Exited" and done["exit_code"] == 3
        assert "exited with code 3" in done["error"]["message"]
        missing = await submitted(h, {"task": "cmd_missing", "args": {}})
        done = await h.wait_for_state(missing["id"], "failed")
        assert done["error"]["type"] == "SpawnFailed"
        assert "'jobserver-no-such-program-x' not found on PATH" in done["error"]["message"]
        ok = await submitted(h, {"task": "cmd_exit", "args": {"code": 0}})
        done = await h.wait_for_state(ok["id"], "succeeded")
        assert done["result"] is None  # "bye" is not JSON


async def test_a_command_task_is_cancelled_with_its_tree(make_harness: Any) -> None:
    from tests.test_e2e import alive

    async with make_harness() as h:
        job = await submitted(h, {"task": "cmd_sleep", "args": {"s": 60}})
        running = await h.wait_for_state(job["id"], "running")
        # The row says running from the claim on; the process appears just after it.
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            system = (await h.client.get("/api/v1/system")).json()
            pids = [r["pid"] for r in system["running"] if r["id"] == job["id"] and r["pid"]]
            if pids or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.02)
        pid = pids[0]
        # Under setpriv (when installed) the leader execs the program: same pid.  While
        # that exec is under way the kernel shows an empty cmdline: wait for it to end.
        cmdline = Path(f"/proc/{pid}/cmdline")
        while not cmdline.read_text() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert "time.sleep" in cmdline.read_text()
        await h.client.post(f"/api/v1/jobs/{job['id']}/cancel")
        done = await h.wait_for_state(job["id"], "cancelled")
        assert done["history"][0]["outcome"] == "cancelled"
        assert running["state"] == "running" and not alive(pid)


# -- dependencies ---------------------------------------------------------------------


async def test_a_job_waits_for_its_dependencies(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        gate = tmp_path / "gate"
        first = await submitted(h, {"task": "wait_for_file", "args": {"path": str(gate)}})
        await h.wait_for_state(first["id"], "running")
        quick = await submitted(h, {"task": "add", "args": {"a": 0}})
        await h.wait_for_state(quick["id"], "succeeded")
        then = await submitted(
            h, {"task": "add", "args": {"a": 1}, "depends_on": [first["id"], quick["id"]]}
        )
        assert then["depends_on"] == sorted([first["id"], quick["id"]])
        await h.application.scheduler.tick(utcnow())
        document = (await h.client.get(f"/api/v1/jobs/{then['id']}")).json()
        assert document["state"] == "queued"
        assert document["waiting_reason"] == f"waiting for {first['id']} (running)"
        gate.write_text("x")
        assert (await h.wait_for_state(then["id"], "succeeded"))["result"] == 1


async def test_a_failed_dependency_cancels_its_dependents(make_harness: Any) -> None:
    async with make_harness() as h:
        root = await submitted(h, {"task": "add", "args": {"a": 1}, "delay": 3600})
        child = await submitted(h, {"task": "add", "args": {"a": 2}, "depends_on": [root["id"]]})
        grandchild = await submitted(
            h, {"task": "add", "args": {"a": 3}, "depends_on": [child["id"]]}
        )
        await h.client.post(f"/api/v1/jobs/{root['id']}/cancel")
        for job, cause, state in ((child, root, "cancelled"), (grandchild, child, "cancelled")):
            done = await h.wait_for_state(job["id"], "cancelled")
            assert done["reason"] == f"dependency {cause['id']} {state}"
        failing = await submitted(h, {"task": "fail", "args": {}})
        after = await submitted(h, {"task": "add", "args": {"a": 4}, "depends_on": [failing["id"]]})
        done = await h.wait_for_state(after["id"], "cancelled")
        assert done["reason"] == f"dependency {failing['id']} failed"
        # Depending on a job that already failed: cancelled at once.
        late = await submitted(h, {"task": "add", "args": {"a": 5}, "depends_on": [failing["id"]]})
        assert late["state"] == "cancelled"
        # Retrying a dependent whose dependency failed is refused until that one is retried.
        assert_error(await h.client.post(f"/api/v1/jobs/{after['id']}/retry"), 409, "invalid_state")


@pytest.mark.parametrize(
    "depends_on",
    [
        ["01ZZZZZZZZZZZZZZZZZZZZZZZZ"],
        "01ZZZZZZZZZZZZZZZZZZZZZZZZ",
        [1],
        ["not-an-id"],
        ["SAME"],  # replaced by a real id listed twice
    ],
)
async def test_bad_dependencies_store_nothing(make_harness: Any, depends_on: Any) -> None:
    async with make_harness() as h:
        existing = await submitted(h, {"task": "add", "args": {"a": 1}})
        if depends_on == ["SAME"]:
            depends_on = [existing["id"], existing["id"]]
        response = await post(h, {"task": "add", "args": {"a": 1}, "depends_on": depends_on})
        error = assert_error(response, 422, "validation_error")
        assert error["details"][0]["field"] == "depends_on"
        assert stored_rows(h) == 1 and table_rows(h, "dependencies") == 0


async def test_job_directory_holds_only_what_the_runner_wrote(make_harness: Any) -> None:
    async with make_harness() as h:
        assert h.application.runner is not None
        assert await h.application.runner.fork_server_ready()
        job = await submitted(h, {"task": "echo", "args": {"text": "x"}})
        await h.wait_for_state(job["id"], "succeeded")
        names = sorted(os.listdir(h.settings.server.jobs_dir / job["id"]))
        # Forked (the default): the spec travelled in the fork request and the outcome
        # came back on a pipe, neither in a file.
        assert names == ["artifacts", "output.log"]


def test_progress_never_blocks_on_a_full_pipe() -> None:
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    script = (
        "import time, jobserver.reporting as r\n"
        "r.MIN_INTERVAL = 0\n"
        "sent = sum(r.progress(0.5, 'x' * 200) for _ in range(5000))\n"
        "print(sent)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "JOBSERVER_PROGRESS_FD": str(write_end)},
            pass_fds=(write_end,),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0, done.stderr
    sent = int(done.stdout)
    assert 0 < sent < 5000  # the pipe filled up (nobody read it) and the rest was dropped
    first = os.read(read_end, 4096).split(b"\n")[0]
    os.close(read_end)
    assert first == b'{"fraction": 0.5, "message": "' + b"x" * 200 + b'"}'
