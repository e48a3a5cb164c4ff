"""``GET /metrics``, the transition log line (text and JSON), ``GET /api/v1/stats`` and the
admin views, over real jobs in a real SQLite file."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jobserver.events import JsonFormatter, Transition
from jobserver.jobs import JobState, utcnow
from jobserver.scheduler import hold_kind
from tests.conftest import (
    SAMPLE_TASKS,
    FakeProbe,
    GiB,
    Harness,
    ServerProcess,
    skip_for_want_of,
    write_config,
)
from tests.test_e2e import wait_until


async def submit(h: Harness, task: str, **args: Any) -> str:
    response = await h.client.post("/api/v1/jobs", json={"task": task, "args": args})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def scrape(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await h.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.anyio
async def test_metrics_count_jobs_by_task_and_state(make_harness: Any) -> None:
    async with make_harness() as h:
        ok = [await submit(h, "add", a=i) for i in range(3)]
        bad = await submit(h, "fail")
        for job_id in ok:
            await h.wait_for_state(job_id, "succeeded")
        await h.wait_for_state(bad, "failed")
        # The free-resource gauges are the scheduler's latest plan: one made after the
        # last finish (the wake-up it causes may still be pending).
        await h.application.scheduler.tick(utcnow())
        m = await scrape(h)
        assert all(name.startswith("jobserver_") for name, _ in m)
        assert m["jobserver_jobs_submitted_total", (("task", "add"),)] == 3
        assert m["jobserver_jobs_finished_total", (("state", "succeeded"), ("task", "add"))] == 3
        assert m["jobserver_jobs_finished_total", (("state", "failed"), ("task", "fail"))] == 1
        assert m["jobserver_jobs_failed_total", (("task", "fail"),)] == 1
        assert m["jobserver_jobs", (("state", "succeeded"),)] == 3
        assert m["jobserver_jobs", (("state", "failed"),)] == 1
        assert m["jobserver_node_info", (("incarnation", "local"), ("node", "local"))] == 1
        assert m["jobserver_jobs", (("state", "queued"),)] == 0
        assert m["jobserver_job_duration_seconds_count", (("task", "add"),)] == 3
        assert m["jobserver_job_queue_wait_seconds_count", (("task", "add"),)] == 3
        assert m["jobserver_admissions_total", (("task", "add"),)] == 3
        assert m["jobserver_capacity_cpus", ()] == 8
        assert m["jobserver_capacity_memory_bytes", ()] == 16 * GiB
        assert m["jobserver_reserved_memory_bytes", ()] == 0
        assert m["jobserver_free_cpus", ()] == 8


@pytest.mark.anyio
async def test_metrics_have_no_created_series(make_harness: Any) -> None:
    async with make_harness() as h:
        await h.wait_for_state(await submit(h, "add", a=1), "succeeded")
        text = (await h.client.get("/metrics")).text
        # Counters and histograms with samples are there, their _created twins are not.
        assert 'jobserver_jobs_submitted_total{task="add"} 1.0' in text
        assert 'jobserver_job_duration_seconds_count{task="add"} 1.0' in text
        assert "_created" not in text


@pytest.mark.anyio
async def test_holds_and_pressure_are_counted_by_kind_once(make_harness: Any) -> None:
    probe = FakeProbe(cpus=8, memory=4 * GiB)
    async with make_harness(probe=probe) as h:
        big = await submit(h, "big", a=1)  # 8 GiB request on a 4 GiB machine: never fits
        for _ in range(5):  # many ticks, one hold
            await h.application.scheduler.tick(h.application.scheduler._clock())
        probe.snapshot_value = replace(probe.snapshot_value, memory_pressure=25.0)
        for _ in range(3):
            await h.application.scheduler.tick(h.application.scheduler._clock())
        m = await scrape(h)
        assert m["jobserver_holds_total", (("reason", "never_fits"),)] == 1
        assert m["jobserver_holds_total", (("reason", "memory"),)] == 0
        assert m["jobserver_pressure_events_total", (("resource", "memory"),)] == 1
        assert m["jobserver_pressure_ratio", (("resource", "memory"),)] == 0.25
        probe.snapshot_value = replace(probe.snapshot_value, memory_pressure=1.0)
        await h.application.scheduler.tick(h.application.scheduler._clock())
        probe.snapshot_value = replace(probe.snapshot_value, memory_pressure=30.0)
        await h.application.scheduler.tick(h.application.scheduler._clock())
        m = await scrape(h)
        assert m["jobserver_pressure_events_total", (("resource", "memory"),)] == 2
        assert m["jobserver_jobs", (("state", "queued"),)] == 1
        document = (await h.client.get(f"/api/v1/jobs/{big}")).json()
        assert "can never start" in document["waiting_reason"]


def test_hold_kinds_cover_every_reason_plan_gives() -> None:
    assert hold_kind("waiting for memory: needs 1.0 GiB, 0 B free after reserve") == "memory"
    assert hold_kind("waiting for CPU: needs 1.00 CPU, 0.00 free after reserve") == "cpu"
    assert hold_kind("max_jobs limit 2 reached") == "max_jobs"
    assert hold_kind("needs 8.0 GiB memory but ...: it can never start; lower it") == "never_fits"
    assert hold_kind("something new") == "other"


# -- the transition log line -----------------------------------------------------------


@pytest.mark.anyio
async def test_every_transition_is_one_log_line(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jobserver.jobs")
    async with make_harness() as h:
        job_id = await submit(h, "fail", message="nope")
        await h.wait_for_state(job_id, "failed")
    lines = [r for r in caplog.records if r.name == "jobserver.jobs" and job_id in r.message]
    moves = [(r.transition["source"], r.transition["target"]) for r in lines]  # type: ignore[attr-defined]
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "failed")]
    last = lines[-1]
    assert last.levelno == logging.WARNING
    assert last.message.startswith(f"job {job_id} (fail): running -> failed after ")
    assert last.message.endswith(": nope")
    assert last.transition["duration"] > 0  # type: ignore[attr-defined]


def test_json_log_lines_carry_the_transition_fields() -> None:
    event = Transition("01ABC", "add", JobState.RUNNING, JobState.SUCCEEDED, None, 1.5)
    record = logging.LogRecord(
        "jobserver.jobs", logging.INFO, __file__, 1, event.describe(), (), None
    )
    record.transition = event.to_dict()
    document = json.loads(JsonFormatter().format(record))
    assert document["event"] == "transition"
    assert document["job_id"] == "01ABC" and document["task"] == "add"
    assert document["source"] == "running" and document["target"] == "succeeded"
    assert document["duration"] == 1.5 and document["reason"] is None
    assert document["message"] == "job 01ABC (add): running -> succeeded after 1.500 s"
    assert document["time"].endswith("Z") and document["level"] == "info"


@pytest.mark.integration
def test_a_server_with_log_format_json_logs_one_object_per_line(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(
        write_config(tmp_path, server={"log_format": "json", "log_level": "info"})
    )
    job = httpx.post(f"{server.url}/api/v1/jobs", json={"task": "add", "args": {"a": 1}}).json()

    def finished() -> bool:
        return '"target": "succeeded"' in server.log()

    wait_until(finished, timeout=120)  # a real probe: a busy machine may delay the start
    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    moves = [(d["source"], d["target"]) for d in lines if d.get("job_id") == job["id"]]
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]
    assert any(d["logger"].startswith("uvicorn") for d in lines)  # its lines are JSON too


def test_log_format_is_validated(tmp_path: Path) -> None:
    from jobserver import config
    from jobserver.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"server.log_format = \"xml\": expected one of text, json"
    ):
        config.load(write_config(tmp_path, server={"log_format": "xml"}))


# -- statistics and the admin views ----------------------------------------------------


@pytest.mark.anyio
async def test_stats_say_what_admission_reserves(make_harness: Any) -> None:
    tasks = {
        "add": SAMPLE_TASKS["add"],
        "loose": {"function": "sample_tasks:add", "cpus": 0.25},  # no memory declared
    }
    async with make_harness(tasks=tasks, scheduler={"default_memory": "96MiB"}) as h:
        found = {e["task"]: e for e in (await h.client.get("/api/v1/stats")).json()["tasks"]}
        assert found["add"]["scheduled_with"] == {
            "cpus": 0.1,
            "memory": 16 * 2**20,
            "source": "declared",
            "why": "declared 16.0 MiB; no measured run yet",
        }
        loose = found["loose"]
        assert loose["memory_request"] is None and loose["learned_memory"] is None
        assert loose["scheduled_with"] == {
            "cpus": 0.25,
            "memory": 96 * 2**20,
            "source": "default_memory",
            "why": "no memory declared and no measured run: default_memory 96.0 MiB",
        }


@pytest.mark.anyio
async def test_stats_per_task(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        for i in range(3):
            await h.wait_for_state(await submit(h, "add", a=i), "succeeded")
        await h.wait_for_state(await submit(h, "fail"), "failed")
        never = await submit(h, "wait_for_file", path=str(tmp_path / "never"))
        await h.wait_for_state(never, "running")
        response = await h.client.get("/api/v1/stats")
        assert response.status_code == 200
        tasks = {entry["task"]: entry for entry in response.json()["tasks"]}
        add = tasks["add"]
        assert add["count"] == 3 and add["states"]["succeeded"] == 3
        assert add["success_rate"] == 1.0
        assert 0 < add["duration_p50"] <= add["duration_p95"] < 30
        assert add["samples"] == 3
        assert add["memory_request"] == 16 * 2**20
        assert tasks["fail"]["success_rate"] == 0.0 and tasks["fail"]["duration_p50"] is None
        assert tasks["wait_for_file"]["states"]["running"] == 1
        assert tasks["wait_for_file"]["success_rate"] is None
        assert tasks["echo"]["count"] == 0 and tasks["echo"]["registered"] is True
        await h.client.post(f"/api/v1/jobs/{never}/cancel")
        await h.wait_for_state(never, "cancelled")


@pytest.mark.anyio
async def test_admin_views_answer_the_common_questions(make_harness: Any, tmp_path: Path) -> None:
    async with make_harness() as h:
        await h.wait_for_state(await submit(h, "add", a=1), "succeeded")
        failed = await submit(h, "fail", message="broken disk")
        await h.wait_for_state(failed, "failed")
        running = await submit(h, "wait_for_file", path=str(tmp_path / "go"))
        await h.wait_for_state(running, "running")
        database = h.settings.server.database
        if shutil.which("sqlite3") is None:
            skip_for_want_of("sqlite3", "the sqlite3 shell is not installed (.ci/run installs it)")
        # The sqlite3 shell, as an admin runs it beside the live server.
        shell = subprocess.run(
            ["sqlite3", "-readonly", "-json", str(database), "SELECT * FROM jobs_running;"],
            capture_output=True,
            text=True,
            check=True,
        )
        rows = json.loads(shell.stdout)
        assert [row["id"] for row in rows] == [running]
        assert rows[0]["task"] == "wait_for_file" and rows[0]["running_seconds"] >= 0
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            recent = db.execute("SELECT * FROM jobs_failed_recent").fetchall()
            assert [(r["id"], r["error_type"], r["error"]) for r in recent] == [
                (failed, "ValueError", "broken disk")
            ]
            summary = {r["task"]: dict(r) for r in db.execute("SELECT * FROM task_summary")}
        assert summary["add"]["succeeded"] == 1 and summary["add"]["success_percent"] == 100.0
        assert summary["fail"]["failed"] == 1 and summary["fail"]["success_percent"] == 0.0
        assert summary["wait_for_file"]["running"] == 1
        assert summary["wait_for_file"]["success_percent"] is None
        (tmp_path / "go").write_text("done")
        await h.wait_for_state(running, "succeeded")
