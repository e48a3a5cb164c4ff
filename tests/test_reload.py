"""SIGHUP reloads config.toml in a real ``jobserver serve`` process."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ServerProcess, write_config

pytestmark = pytest.mark.integration

TASKS = {"add": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "16MiB"}}


def system(server: ServerProcess) -> dict[str, Any]:
    return dict(httpx.get(f"{server.url}/api/v1/system", timeout=5).json())


def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.05)


def test_sighup_applies_a_good_config_and_ignores_a_bad_one(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    path = write_config(tmp_path, scheduler={"max_jobs": 2}, tasks=TASKS)
    server = server_factory(path)
    view = system(server)
    assert view["max_jobs"] == 2
    # The real probe: every reading names where it came from.
    signals = view["signals"]
    assert signals["memory_available"]["source"] in ("psutil", "cgroup v1", "cgroup v2")
    assert signals["memory_pressure"]["source"] in ("psi", "absent")
    assert signals["memory_pressure"]["limit"] == 20.0
    assert signals["reserve_memory"] == {"value": 0, "source": "config"}

    write_config(
        tmp_path,
        scheduler={"max_jobs": 5, "starvation_after": "1m"},
        tasks={"add": {**TASKS["add"], "max_concurrency": 3}},
    )
    os.kill(server.process.pid, signal.SIGHUP)
    wait_until(lambda: system(server)["max_jobs"] == 5)
    assert system(server)["settings"]["starvation_after"] == 60.0
    tasks = httpx.get(f"{server.url}/api/v1/tasks", timeout=5).json()["tasks"]
    assert tasks[0]["declared"]["max_concurrency"] == 3
    wait_until(lambda: "configuration changed by SIGHUP" in server.log())
    assert "scheduler.max_jobs: 2 -> 5" in server.log()

    path.write_text(path.read_text().replace("max_jobs = 5", "max_jobs = 0"))
    os.kill(server.process.pid, signal.SIGHUP)
    wait_until(lambda: "failed; keeping the running settings" in server.log())
    assert "scheduler.max_jobs = 0" in server.log()
    assert server.process.poll() is None
    assert system(server)["max_jobs"] == 5
    # Still serving jobs.
    job = httpx.post(
        f"{server.url}/api/v1/jobs", json={"task": "add", "args": {"a": 2}}, timeout=5
    ).json()
    wait_until(
        lambda: (
            httpx.get(f"{server.url}/api/v1/jobs/{job['id']}", timeout=5).json()["state"]
            == "succeeded"
        )
    )
    assert server.stop() == 0
