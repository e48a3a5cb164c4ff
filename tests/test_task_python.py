"""Tasks with their own interpreter (``python = ".../bin/python"``): the server never
imports their module; the child runs under that interpreter with task_paths on its path."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from jobserver import config
from jobserver.errors import ConfigError
from jobserver.runner import Runner
from jobserver.tasks import Registry
from tests.conftest import TESTS_DIR, Harness, write_config

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real second environment with a module (``onlyhere``) the server cannot import."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
    )
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert purelib != sysconfig.get_path("purelib")
    (Path(purelib) / "onlyhere.py").write_text("def scale(n):\n    return n * 100\n")
    return python


def venv_task(python: Path, **extra: Any) -> dict[str, dict[str, Any]]:
    return {
        "measure": {
            "function": "venv_tasks:measure",
            "python": str(python),
            "cpus": 0.1,
            "memory": "16MiB",
            **extra,
        }
    }


def test_the_module_really_is_not_importable_by_the_server() -> None:
    with pytest.raises(ModuleNotFoundError):
        __import__("onlyhere")


async def test_a_job_runs_under_the_tasks_own_interpreter(
    make_harness: Callable[..., AbstractAsyncContextManager[Harness]], venv: Path
) -> None:
    async with make_harness(tasks=venv_task(venv)) as harness:
        tasks = (await harness.client.get("/api/v1/tasks")).json()["tasks"]
        params = {p["name"]: p for p in tasks[0]["params"]}
        assert params["size"] == {"name": "size", "type": "int", "required": True, "default": None}
        assert params["unit"]["type"] == "Literal['cm', 'in']"
        assert params["unit"]["default"] == "cm"
        assert params["tags"]["type"] == "list[str] | None"

        response = await harness.client.post(
            "/api/v1/jobs", json={"task": "measure", "args": {"size": 3, "tags": ["x"]}}
        )
        assert response.status_code == 202, response.text
        job = await harness.wait_for_state(response.json()["id"], "succeeded", "failed")
        assert job["state"] == "succeeded", job
        assert job["result"] == {
            "answer": 300,
            "unit": "cm",
            "tags": ["x"],
            "prefix": str(venv.parent.parent),
        }


async def test_arguments_are_validated_against_the_signature_from_that_interpreter(
    make_harness: Callable[..., AbstractAsyncContextManager[Harness]], venv: Path
) -> None:
    async with make_harness(tasks=venv_task(venv)) as harness:
        response = await harness.client.post(
            "/api/v1/jobs", json={"task": "measure", "args": {"size": "3", "unit": "mm"}}
        )
        assert response.status_code == 422
        fields = {d["field"] for d in response.json()["error"]["details"]}
        assert fields == {"size", "unit"}
        jobs = (await harness.client.get("/api/v1/jobs")).json()["jobs"]
        assert jobs == []


def _load(tmp_path: Path, tasks: dict[str, dict[str, Any]]) -> Registry:
    settings = config.load(write_config(tmp_path, tasks=tasks))
    runner = Runner(settings.task_paths, {})
    return Registry.load(settings.tasks, settings.task_paths, describe=runner.describe)


def test_a_missing_interpreter_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot run .*nowhere/bin/python"):
        _load(tmp_path, venv_task(tmp_path / "nowhere" / "bin" / "python"))


def test_a_module_missing_under_that_interpreter_is_a_config_error(tmp_path: Path) -> None:
    # The server's own interpreter has no ``onlyhere``: the task cannot be described.
    with pytest.raises(ConfigError, match="ModuleNotFoundError: No module named 'onlyhere'"):
        _load(tmp_path, venv_task(Path(sys.executable)))


def test_a_relative_python_is_relative_to_the_config_file(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, tasks=venv_task(Path("venv/bin/python"))))
    assert settings.tasks["measure"].python == tmp_path / "venv" / "bin" / "python"
    assert TESTS_DIR in settings.task_paths
