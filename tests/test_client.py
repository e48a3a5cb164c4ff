"""``jobserver.client`` and the admin CLI commands against a real ``jobserver serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
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


def test_every_submit_option_reaches_the_server(server: ServerProcess) -> None:
    with Client(server.url) as client:
        parent = client.submit("add", a=1)
        job = client.submit_job(
            "add",
            {"a": 2},
            priority=7,
            delay=3600,
            depends_on=[parent.id],
            max_retries=2,
            timeout=50,
            idempotency_key="k-1",
        )
        d = job.document
        assert d["priority"] == 7 and d["max_retries"] == 2 and d["timeout"] == 50
        assert d["depends_on"] == [parent.id] and d["run_after"] is not None
        assert job.version  # the ETag of the submit answer: the first poll waits on it
        again = client.submit_job("add", {"a": 2}, priority=7, delay=3600,
                                  depends_on=[parent.id], max_retries=2, timeout=50,
                                  idempotency_key="k-1")  # fmt: skip
        assert again.id == job.id
        at = datetime.now(UTC) + timedelta(hours=2)
        later = client.submit_job("add", {"a": 3}, run_at=at)
        assert later.document["run_after"].startswith(at.strftime("%Y-%m-%dT%H:%M"))
        with pytest.raises(ValueError):
            client.submit_job("add", {"a": 3}, run_at=datetime(2030, 1, 1))
        with pytest.raises(ClientError) as caught:
            client.submit_job("add", {"a": 3}, delay=-1)
        assert caught.value.status == 422


def test_bulk_retry_logs_and_artifacts(server: ServerProcess, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with Client(server.url) as client:
        failed = [client.submit("fail", message=f"no {n}") for n in range(2)]
        for job in failed:
            with pytest.raises(JobFailed):
                job.wait(timeout=WAIT)
        queued = client.submit_job("add", {"a": 1}, delay=3600)
        with pytest.raises(ClientError) as caught:
            client.cancel_jobs()  # no criterion: refused, nothing cancelled
        assert caught.value.status == 422
        answer = client.cancel_jobs(task="add", state="queued")
        assert answer["count"] == 1 and answer["ids"] == [queued.id]
        assert queued.refresh().state == "cancelled"
        answer = client.retry_jobs(task="fail", older_than=0)
        assert sorted(answer["ids"]) == sorted(job.id for job in failed)
        assert queued.retry().state == "queued"

        files = client.submit("make_files", names=["a.txt", "b.bin"])
        assert files.wait(timeout=WAIT) == 2
        assert sorted(a["name"] for a in files.artifacts) == ["a.txt", "b.bin"]
        saved = files.download("a.txt", tmp_path / "copy.txt")
        assert saved.read_text() == "content of a.txt"
        with pytest.raises(ClientError) as caught:
            files.download("nosuch", tmp_path / "nosuch")
        assert caught.value.status == 404 and not (tmp_path / "nosuch").exists()

        waiting = client.submit("wait_for_file", path=str(gate))
        followed = waiting.follow_logs()
        first = next(followed)  # the log as it is being written
        assert f"waiting for {gate}" in first
        assert waiting.refresh().state == "running"
        gate.write_text("done")
        rest = "".join(followed)  # ends when the job does
        assert waiting.refresh().state == "succeeded", rest
        assert waiting.logs(tail=1).strip() == f"waiting for {gate}"


@pytest.mark.anyio
async def test_the_async_twin_covers_the_rest(server: ServerProcess, tmp_path: Path) -> None:
    async with AsyncClient(server.url) as client:
        job = await client.submit_job(
            "make_files", {"names": ["x"]}, max_retries=1, timeout=60, idempotency_key="a"
        )
        assert await job.wait(timeout=WAIT) == 1
        assert (await job.download("x", tmp_path / "x")).read_text() == "content of x"
        assert (await job.logs(tail=0)) == ""
        assert "".join([text async for text in job.follow_logs()]) == await job.logs()
        delayed = await client.submit_job("add", {"a": 1}, delay=3600, priority=1)
        assert (await client.cancel_jobs(all=True))["ids"] == [delayed.id]
        assert (await client.retry_jobs(state=["cancelled"]))["ids"] == [delayed.id]
        assert await delayed.wait(timeout=WAIT) == 1  # a retry drops the delay
        with pytest.raises(ClientError) as caught:
            await delayed.retry()  # it succeeded: nothing to retry
        assert caught.value.status == 409


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


def test_cli_submit_wait_shows_running_for_a_job_without_progress(server: ServerProcess) -> None:
    # The job is running before the CLI's first long poll: that poll must answer at once
    # (it carries the submit answer's ETag), not wait for the job's end.
    done = cli(server.url, "submit", "sleep", "seconds=3", "--wait")
    assert done.returncode == 0, done.stderr
    states = [line.split()[1] for line in done.stderr.splitlines() if line.count(" ") > 1][1:]
    assert "running" in states and states[-1] == "succeeded", done.stderr


def test_cli_ctrl_c_during_wait_leaves_the_job_running(
    server: ServerProcess, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    process = subprocess.Popen(
        [sys.executable, "-m", "jobserver", "submit", "wait_for_file", f"path={gate}", "--wait"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JOBSERVER_URL": server.url},
    )
    try:
        assert process.stderr is not None
        seen = []
        while not any(" running " in line for line in seen):
            line = process.stderr.readline()
            assert line, f"the CLI ended first: {seen}"
            seen.append(line)
        job_id = seen[0].split()[1].rstrip(";")
        process.send_signal(signal.SIGINT)
        rest = process.stderr.read()
        assert process.wait(timeout=WAIT) == 130
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()
    assert f"job {job_id} keeps running" in rest
    assert f"jobserver cancel {job_id}" in rest and "Traceback" not in rest
    with Client(server.url) as client:
        assert client.job(job_id).state == "running"
        gate.write_text("done")
        assert client.job(job_id).wait(timeout=WAIT) == "done"


def test_cli_artifacts_lists_and_downloads(server: ServerProcess, tmp_path: Path) -> None:
    with Client(server.url) as client:
        job = client.submit("make_files", names=["a.txt", "b.bin"])
        job.wait(timeout=WAIT)
    listed = cli(server.url, "artifacts", job.id)
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == ["NAME", "a.txt", "b.bin"]
    as_json = json.loads(cli(server.url, "artifacts", job.id, "--json").stdout)
    assert [a["name"] for a in as_json] == ["a.txt", "b.bin"]

    saved = cli(server.url, "artifacts", job.id, "b.bin", "-o", str(tmp_path / "copy"))
    assert saved.returncode == 0, saved.stderr
    assert (tmp_path / "copy").read_text() == "content of b.bin"
    (tmp_path / "dir").mkdir()
    into = cli(server.url, "artifacts", job.id, "a.txt", "-o", str(tmp_path / "dir"))
    assert into.returncode == 0 and (tmp_path / "dir" / "a.txt").exists()
    missing = cli(server.url, "artifacts", job.id, "nosuch", "-o", str(tmp_path / "n"))
    assert missing.returncode == 4 and "nosuch" in missing.stderr
    assert not (tmp_path / "n").exists()


def test_cli_bulk_cancel_and_retry(server: ServerProcess) -> None:
    with Client(server.url) as client:
        queued = [client.submit_job("add", {"a": n}, delay=3600) for n in range(2)]
        other = client.submit_job("sleep", {"seconds": 1}, delay=3600)
    refused = cli(server.url, "cancel")
    assert refused.returncode == 2 and "--all" in refused.stderr
    both = cli(server.url, "cancel", queued[0].id, "--task", "add")
    assert both.returncode == 2 and "not both" in both.stderr
    bad = cli(server.url, "cancel", "--task", "nosuch")
    assert bad.returncode == 2 and "task" in bad.stderr
    done = cli(server.url, "cancel", "--task", "add", "--state", "queued")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(job.id for job in queued)
    assert "2 job(s)" in done.stderr
    again = cli(server.url, "retry", "--state", "cancelled", "--json")
    assert json.loads(again.stdout)["count"] == 2
    with Client(server.url) as client:
        assert client.job(other.id).state == "queued"
        assert client.job(queued[0].id).state != "cancelled"


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
