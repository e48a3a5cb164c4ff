"""``jobserver.client`` and the admin CLI commands against a real ``jobserver serve``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from jobserver.client import (
    AsyncClient,
    Client,
    ClientError,
    JobCancelled,
    JobFailed,
    WaitTimeout,
)
from tests.conftest import SAMPLE_TASKS, ServerProcess, free_port, write_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
# Real servers measure this machine: on a busy one a job may wait for CPU a while.
WAIT = 120


class CountingTransport(httpx.HTTPTransport):
    """A real transport that counts the requests it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}?{request.url.query.decode()}")
        return super().handle_request(request)


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[ServerProcess]:
    yield server_factory(write_config(tmp_path))


def test_submit_and_wait_costs_a_handful_of_requests(server: ServerProcess) -> None:
    transport = CountingTransport()
    with Client(server.url, transport=transport) as client:
        started = time.monotonic()
        job = client.submit("sleep", seconds=4)
        assert job.state == "queued" and job.task == "sleep"
        assert job.wait(timeout=WAIT) == 4
        elapsed = time.monotonic() - started
        assert job.state == "succeeded" and job.done
    # submit + one long poll per change (queued -> running -> succeeded) + one per 30 s
    # unchanged (a busy machine may hold the job in the queue), not one a second.
    assert len(transport.requests) <= 3 + elapsed // 30, transport.requests
    assert all("wait=" in r for r in transport.requests[1:])


def test_the_tutorial_task_through_the_client(server: ServerProcess) -> None:
    with Client(server.url) as client:
        job = client.submit("analysis", dataset_id="x", complexity=0)
        result = job.wait(timeout=WAIT)
    assert result["dataset_id"] == "x" and result["status"] == "success"


def test_a_failed_job_raises_with_its_error(server: ServerProcess) -> None:
    with Client(server.url) as client:
        job = client.submit("fail", message="disk on fire")
        with pytest.raises(JobFailed) as caught:
            job.wait(timeout=WAIT)
    error = caught.value.error
    assert error["type"] == "ValueError" and error["message"] == "disk on fire"
    assert "Traceback" in error["traceback"]
    assert caught.value.job["state"] == "failed"
    assert "disk on fire" in str(caught.value)


def test_cancel_refresh_and_timeout(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        job = client.submit("wait_for_file", path=str(tmp_path / "never"))
        started = time.monotonic()
        with pytest.raises(WaitTimeout):
            job.wait(timeout=1)
        assert time.monotonic() - started < 5
        assert job.refresh().state in ("queued", "running")
        job.cancel()
        assert job.document["cancel_requested"] or job.state == "cancelled"
        with pytest.raises(JobCancelled):
            job.wait(timeout=WAIT)
        assert client.job(job.id).state == "cancelled"
        listed = client.jobs(state="cancelled", task="wait_for_file")
        assert [j.id for j in listed] == [job.id]


def test_bad_requests_raise_client_errors(server: ServerProcess) -> None:
    with Client(server.url) as client:
        with pytest.raises(ClientError) as caught:
            client.submit("no_such_task")
        assert caught.value.status == 422 and caught.value.code == "unknown_task"
        with pytest.raises(ClientError) as caught:
            client.submit("add", a="not a number")
        assert caught.value.status == 422 and caught.value.details
        with pytest.raises(ClientError) as caught:
            client.job("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert caught.value.status == 404 and caught.value.code == "not_found"
        with pytest.raises(ClientError) as caught:
            client.jobs(state="bogus")
        assert caught.value.status == 422
    with Client(f"http://127.0.0.1:{free_port()}") as nowhere, pytest.raises(ClientError) as caught:
        nowhere.submit("add", a=1)
    assert caught.value.status is None and caught.value.code == "unreachable"


@pytest.mark.anyio
async def test_the_async_twin(server: ServerProcess, tmp_path: Path) -> None:
    async with AsyncClient(server.url) as client:
        job = await client.submit("add", a=2, b=5)
        seen: list[str] = []
        assert await job.wait(timeout=30, on_change=lambda j: seen.append(j.state)) == 7
        assert seen[-1] == "succeeded"
        failing = await client.submit_job("fail", {"message": "no"}, priority=5)
        with pytest.raises(JobFailed):
            await failing.wait(timeout=WAIT)
        assert failing.document["priority"] == 5
        blocked = await client.submit("wait_for_file", path=str(tmp_path / "never"))
        await blocked.cancel()
        with pytest.raises(JobCancelled):
            await blocked.wait(timeout=WAIT)
        assert (await blocked.refresh()).state == "cancelled"
        assert any(entry["task"] == "add" for entry in await client.stats())
        assert [j.id for j in await client.jobs(task="add")] == [job.id]


# -- the CLI ---------------------------------------------------------------------------


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobserver", *args, "--url", url],
        capture_output=True,
        text=True,
        timeout=WAIT + 30,
        env={**os.environ, "JOBSERVER_URL": ""},
    )


def test_cli_submit_wait_shows_progress_and_the_result(server: ServerProcess) -> None:
    done = cli(server.url, "submit", "add", "a=2", "b=40", "--wait")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 42
    assert "succeeded" in done.stderr and "[" in done.stderr  # the bar, one line per change
    failed = cli(server.url, "submit", "fail", "message=boom", "--wait")
    assert failed.returncode == 1
    assert "failed: boom" in failed.stderr


def test_cli_jobs_show_cancel_stats(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        ok = client.submit("add", a=1)
        ok.wait(timeout=WAIT)
        bad = client.submit("fail", message="kaput")
        with pytest.raises(JobFailed):
            bad.wait(timeout=WAIT)
        blocked = client.submit("wait_for_file", path=str(tmp_path / "never"))

    table = cli(server.url, "jobs")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "TASK", "STATE"]
    assert {row.split()[0] for row in rows} == {ok.id, bad.id, blocked.id}
    assert "kaput" in table.stdout

    only = cli(server.url, "jobs", "--state", "failed", "--json")
    assert [job["id"] for job in json.loads(only.stdout)] == [bad.id]
    by_task = cli(server.url, "jobs", "--task", "add", "--limit", "5", "--json")
    assert [job["id"] for job in json.loads(by_task.stdout)] == [ok.id]

    shown = cli(server.url, "show", bad.id)
    assert shown.returncode == 0
    assert "ValueError: kaput" in shown.stdout and "Traceback" in shown.stdout
    assert json.loads(cli(server.url, "show", ok.id, "--json").stdout)["result"] == 1

    cancelled = cli(server.url, "cancel", blocked.id)
    assert cancelled.returncode == 0 and blocked.id in cancelled.stdout
    again = cli(server.url, "cancel", ok.id)  # finished: nothing to cancel
    assert again.returncode == 2 and "succeeded" in again.stderr

    stats = cli(server.url, "stats")
    assert stats.returncode == 0
    lines = {line.split()[0]: line for line in stats.stdout.splitlines()}
    assert lines["TASK"].split()[:5] == ["TASK", "JOBS", "RUNNING", "QUEUED", "SUCCESS"]
    assert "100.0%" in lines["add"] and "0.0%" in lines["fail"]
    as_json = json.loads(cli(server.url, "stats", "--json").stdout)
    assert {entry["task"] for entry in as_json["tasks"]} >= {"add", "fail"}


def test_cli_exit_codes_mean_something(server: ServerProcess) -> None:
    missing = cli(server.url, "show", "01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.returncode == 4 and "no job" in missing.stderr
    assert cli(server.url, "cancel", "01ARZ3NDEKTSV4RRFFQ69G5FAV").returncode == 4
    bad_state = cli(server.url, "jobs", "--state", "bogus")
    assert bad_state.returncode == 2 and "state" in bad_state.stderr
    bad_limit = cli(server.url, "jobs", "--limit", "0")
    assert bad_limit.returncode == 2 and "--limit" in bad_limit.stderr
    nowhere = cli(f"http://127.0.0.1:{free_port()}", "stats")
    assert nowhere.returncode == 3 and "cannot reach" in nowhere.stderr


def test_stats_request_is_what_admission_reserves(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    tasks = {
        "add": SAMPLE_TASKS["add"],
        "loose": {"function": "sample_tasks:add", "cpus": 0.1},  # no memory: the default
    }
    server = server_factory(
        write_config(tmp_path, tasks=tasks, scheduler={"default_memory": "96MiB"})
    )
    stats = cli(server.url, "stats")
    assert stats.returncode == 0, stats.stderr
    lines = {line.split()[0]: line for line in stats.stdout.splitlines()}
    assert lines["TASK"].split()[-1] == "REQUEST"
    assert lines["add"].endswith("16.0 MiB")
    assert lines["loose"].endswith("96.0 MiB (default)")
