"""The data behind the page's pictures: the machine's history (kept by the scheduler),
the timeline of attempts and the per-task series (read by the store: its part is in
test_store_contract.py), their endpoints, and the page that carries them for its first
paint.  The browser tests are in test_dashboard.py."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from jobserver import access
from jobserver.scheduler import HISTORY_SIZE, MachineHistory, MachineSample, Usage
from tests.conftest import GiB

T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
SNAPSHOT = re.compile(rb'<script id="snapshot" type="application/json">(.*?)</script>', re.S)


def _sample(at: datetime, overload: str | None = None) -> MachineSample:
    usage = Usage(capacity=4, used=1, claimed=2, reserved=0.5, free=1.5)
    return MachineSample(at, usage, usage, running=1, overload=overload)


def _record(history: MachineHistory, sample: MachineSample) -> bool:
    """Offer a tick's sample, as the scheduler does: True if it was kept."""
    if not history.due(sample.at, sample.overload):
        return False
    history.record(sample)
    return True


# -- the machine's history ---------------------------------------------------------------


def test_history_keeps_one_sample_per_interval() -> None:
    history = MachineHistory(interval=10, window=3600)
    kept = [_record(history, _sample(T0 + timedelta(seconds=s))) for s in range(0, 35)]
    assert [s for s, k in enumerate(kept) if k] == [0, 10, 20, 30]
    assert [s.at for s in history.samples(T0 + timedelta(seconds=35))] == [
        T0 + timedelta(seconds=s) for s in (0, 10, 20, 30)
    ]


def test_history_keeps_the_moments_admission_stops_and_resumes() -> None:
    history = MachineHistory(interval=10, window=3600)
    assert _record(history, _sample(T0))
    # Between two interval samples: the stop and the resumption are both kept, and a
    # stop whose reason changes (its numbers do, tick by tick) is not a new moment.
    assert _record(history, _sample(T0 + timedelta(seconds=2), "memory floor: 1 GiB"))
    assert not _record(history, _sample(T0 + timedelta(seconds=3), "memory floor: 0.9 GiB"))
    assert _record(history, _sample(T0 + timedelta(seconds=4)))
    overloads = [s.overload for s in history.samples(T0 + timedelta(seconds=5))]
    assert overloads == [None, "memory floor: 1 GiB", None]


def test_history_is_bounded_in_time_and_in_count() -> None:
    history = MachineHistory(interval=10, window=60, size=5)
    for s in range(0, 200, 10):
        history.record(_sample(T0 + timedelta(seconds=s)))
    kept = history.samples(T0 + timedelta(seconds=190))
    assert [(s.at - T0).total_seconds() for s in kept] == [150, 160, 170, 180, 190]
    # An hour later, with no tick in between: nothing is older than the window.
    assert history.samples(T0 + timedelta(seconds=190 + 61)) == ()
    assert HISTORY_SIZE >= 3600 / 10  # the default holds an hour of interval samples


def test_history_starts_over_when_the_clock_goes_back() -> None:
    history = MachineHistory(interval=10, window=3600)
    history.record(_sample(T0))
    assert _record(history, _sample(T0 - timedelta(seconds=30)))
    assert [s.at for s in history.samples(T0)] == [T0 - timedelta(seconds=30)]


@pytest.mark.anyio
async def test_the_scheduler_records_the_machine_and_admission_stops(make_harness: Any) -> None:
    async with make_harness(scheduler={"memory_floor": "1GiB", "hysteresis": 0}) as h:
        job = await h.client.post("/api/v1/jobs", json={"task": "sleep", "args": {"seconds": 30}})
        job_id = job.json()["id"]
        await h.wait_for_state(job_id, "running")
        healthy = h.probe.snapshot_value
        h.probe.snapshot_value = replace(healthy, memory_available=GiB // 2)

        async def samples() -> list[dict[str, Any]]:
            answer = await h.client.get("/api/v1/system/history")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["interval"], body["window"]) == (10, 3600)
            found: list[dict[str, Any]] = body["samples"]
            return found

        async def until(condition: Any) -> list[dict[str, Any]]:
            import anyio

            with anyio.fail_after(20):
                while not condition(found := await samples()):
                    await anyio.sleep(0.05)
            return found

        stopped = await until(lambda s: any(x["overload"] for x in s))
        stop = next(x for x in stopped if x["overload"])
        assert stop["overload"].startswith("memory floor")
        # The running job's request is what it claims; the FakeProbe's capacity is 8 CPUs.
        assert stop["cpu"]["claimed"] == pytest.approx(0.1)
        assert stop["cpu"]["capacity"] == 8 and stop["memory"]["capacity"] == 16 * GiB
        assert stop["memory"]["claimed"] == 16 * 2**20 and stop["running"] == 1
        h.probe.snapshot_value = healthy
        resumed = await until(lambda s: s[-1]["overload"] is None and len(s) >= 3)
        assert [bool(x["overload"]) for x in resumed][-2:] == [True, False]
        await h.client.post(f"/api/v1/jobs/{job_id}/cancel")


@pytest.mark.anyio
async def test_system_history_takes_no_query(make_harness: Any) -> None:
    async with make_harness() as h:
        answer = await h.client.get("/api/v1/system/history?window=60")
        assert answer.status_code == 422
        assert answer.json()["error"]["details"] == [
            {"field": "window", "message": "unknown query parameter"}
        ]


# -- the timeline ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_timeline_endpoint_shows_attempts_and_checks_its_limit(make_harness: Any) -> None:
    async with make_harness() as h:
        ok = (await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})).json()
        bad = (await h.client.post("/api/v1/jobs", json={"task": "fail", "args": {}})).json()
        await h.wait_for_state(ok["id"], "succeeded")
        await h.wait_for_state(bad["id"], "failed")
        answer = await h.client.get("/api/v1/timeline?limit=1")
        assert answer.status_code == 200
        (only,) = answer.json()["attempts"]
        assert (only["job_id"], only["outcome"], only["state"]) == (bad["id"], "failed", "failed")
        assert only["started_at"] <= only["finished_at"] <= answer.json()["now"]
        everything = (await h.client.get("/api/v1/timeline")).json()["attempts"]
        assert {a["job_id"] for a in everything} == {ok["id"], bad["id"]}
        for query, field in (
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=ten", "limit"),
            ("limit=-1", "limit"),
            ("since=1", "since"),
        ):
            answer = await h.client.get(f"/api/v1/timeline?{query}")
            assert answer.status_code == 422, query
            error = answer.json()["error"]
            assert error["code"] == "validation_error"
            assert [d["field"] for d in error["details"]] == [field], query


# -- per task, over time -----------------------------------------------------------------


@pytest.mark.anyio
async def test_stats_history_endpoint_and_its_bounds(make_harness: Any) -> None:
    async with make_harness() as h:
        ids = [
            (await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": n}})).json()[
                "id"
            ]
            for n in range(3)
        ]
        for job_id in ids:
            await h.wait_for_state(job_id, "succeeded")
        body = (await h.client.get("/api/v1/stats/history?window=600&bucket=60")).json()
        assert body["bucket"] == 60
        since = datetime.fromisoformat(body["since"])
        assert since.timestamp() % 60 == 0  # buckets on whole minutes: they stay put
        (add,) = body["tasks"]
        assert add["task"] == "add"
        assert sum(b["finished"] for b in add["buckets"]) == 3
        assert all(b["duration_p50"] is not None for b in add["buckets"])
        for query, field in (
            ("window=59", "window"),
            ("window=86401", "window"),
            ("bucket=59", "bucket"),
            ("window=x", "window"),
            ("task=add", "task"),
        ):
            answer = await h.client.get(f"/api/v1/stats/history?{query}")
            assert answer.status_code == 422, query
            assert [d["field"] for d in answer.json()["error"]["details"]] == [field], query
        day = (await h.client.get("/api/v1/stats/history?window=86400&bucket=60")).json()
        assert day["bucket"] == 60 and day["tasks"][0]["task"] == "add"


# -- the page's first paint --------------------------------------------------------------


def _snapshot(html: bytes) -> Any:
    found = SNAPSHOT.search(html)
    assert found is not None
    return json.loads(found.group(1))


@pytest.mark.anyio
async def test_the_page_carries_the_data_of_its_first_paint(make_harness: Any) -> None:
    async with make_harness() as h:
        sneaky = "</script><script>alert(1)</script><!--"
        job = await h.client.post("/api/v1/jobs", json={"task": "echo", "args": {"text": sneaky}})
        await h.wait_for_state(job.json()["id"], "succeeded")
        page = await h.client.get("/")
        assert page.status_code == 200
        # The job's text cannot end the data block: the page has its two script tags only.
        assert page.content.count(b"</script>") == 2 and b"<!--" not in page.content
        snapshot = _snapshot(page.content)
        assert snapshot["recent"][0]["args"] == {"text": sneaky}
        assert snapshot["timeline"]["attempts"][0]["job_id"] == job.json()["id"]
        assert snapshot["series"]["tasks"][0]["task"] == "echo"
        assert snapshot["history"]["samples"], "the scheduler has ticked: one sample at least"
        assert snapshot["system"]["capacity"]["cpus"] == 8
        assert "jobserver_job_queue_wait_seconds_bucket" in snapshot["metrics"]
        assert "echo" in snapshot["tasks"]
        assert b'data-state="live">live<' in page.content


@pytest.mark.anyio
async def test_a_server_with_tokens_serves_the_page_without_data(
    make_harness: Any, tmp_path: Path
) -> None:
    secret = access.create_token(tmp_path / "tokens.json", "operator", ["admin"])
    reader = access.create_token(tmp_path / "tokens.json", "reader", ["read"])
    async with make_harness() as h:
        page = await h.client.get("/")
        assert page.status_code == 200
        assert _snapshot(page.content) is None
        assert b'data-state="error">token needed<' in page.content
        # A wrong token, or one that may not see the whole server, gets no data either.
        for token in ("jst_wrong", reader):
            page = await h.client.get("/", headers={"Authorization": f"Bearer {token}"})
            assert _snapshot(page.content) is None, token
        page = await h.client.get("/", headers={"Authorization": f"Bearer {secret}"})
        assert _snapshot(page.content)["system"]["max_jobs"] >= 1
        # The pictures' own endpoints are guarded like the rest of the API.
        for path in ("/api/v1/system/history", "/api/v1/timeline", "/api/v1/stats/history"):
            assert (await h.client.get(path)).status_code == 401, path
        assert (
            await h.client.get(
                "/api/v1/system/history", headers={"Authorization": f"Bearer {reader}"}
            )
        ).status_code == 403
        assert (
            await h.client.get("/api/v1/timeline", headers={"Authorization": f"Bearer {reader}"})
        ).status_code == 200
