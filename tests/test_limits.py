"""Bad input and overload: every limit refused with its name, nothing stored; the job
process's environment, user and resource limits."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobserver import config
from jobserver.api import InputLimits, _within_limits, check_json_limits
from jobserver.errors import JobServerError
from jobserver.server import build
from jobserver.tasks import Registry
from tests.conftest import SAMPLE_TASKS, TESTS_DIR, needs, skip_for_want_of, write_config

pytestmark = pytest.mark.anyio


def stored(h: Any) -> int:
    with sqlite3.connect(h.settings.server.database) as db:
        count: int = db.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return count


SMALL = {
    "max_json_depth": 4,
    "max_string_length": 10,
    "max_array_length": 5,
    "max_args_size": 200,
}


@pytest.mark.parametrize(
    ("body", "status", "limit"),
    [
        ({"task": "echo", "args": {"text": "x" * 11}}, 422, "max_string_length"),
        ({"task": "echo", "args": {"text": "ok", "x" * 11: 1}}, 422, "max_string_length"),
        ({"task": "echo", "args": {"text": [1, 2, 3, 4, 5, 6]}}, 422, "max_array_length"),
        (
            {"task": "echo", "args": {"text": {str(i): i for i in range(6)}}},
            422,
            "max_array_length",
        ),
        ({"task": "echo", "args": {"text": [[[["deep"]]]]}}, 422, "max_json_depth"),
        ({"task": "echo", "args": {"text": "y" * 10, "times": 10**300}}, 413, "max_args_size"),
    ],
)
async def test_each_limit_is_named_and_nothing_is_stored(
    make_harness: Any, body: dict[str, Any], status: int, limit: str
) -> None:
    async with make_harness(server=SMALL) as h:
        response = await h.client.post("/api/v1/jobs", json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["details"]["limit"] == limit
        assert limit in error["message"]
        assert stored(h) == 0


async def test_limits_apply_to_the_tutorial_routes(make_harness: Any) -> None:
    async with make_harness(server=SMALL) as h:
        response = await h.client.post(
            "/api/v1/start-analysis", json={"dataset_id": "z" * 11, "complexity": 0}
        )
        assert response.status_code == 422
        assert response.json()["error"]["details"]["limit"] == "max_string_length"
        assert stored(h) == 0


async def test_integer_too_long_to_parse_is_a_clear_400(make_harness: Any) -> None:
    async with make_harness() as h:
        body = b'{"task": "add", "args": {"a": ' + b"9" * 5000 + b"}}"
        response = await h.client.post(
            "/api/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "malformed_json"
        assert stored(h) == 0


async def test_result_too_large_fails_the_job_with_a_clear_error(make_harness: Any) -> None:
    async with make_harness(server={"max_result_size": 1000}) as h:
        small = await h.client.post(
            "/api/v1/jobs", json={"task": "big_result", "args": {"size": 10}}
        )
        big = await h.client.post(
            "/api/v1/jobs", json={"task": "big_result", "args": {"size": 5000}}
        )
        assert (await h.wait_for_state(small.json()["id"], "succeeded"))["result"] == "x" * 10
        failed = await h.wait_for_state(big.json()["id"], "failed")
        assert failed["error"]["type"] == "ResultTooLarge"
        assert "max_result_size" in failed["error"]["message"]
        assert failed["result"] is None


async def test_max_queued_answers_503_with_retry_after(make_harness: Any) -> None:
    # max_jobs = 1 and a job that waits: the rest stay queued.
    async with make_harness(
        server={"max_queued": 2}, scheduler={"max_jobs": 1, "poll_interval": "1h"}
    ) as h:
        gate = h.settings.path.parent / "gate"
        first = await h.client.post(
            "/api/v1/jobs", json={"task": "wait_for_file", "args": {"path": str(gate)}}
        )
        await h.wait_for_state(first.json()["id"], "running")
        for _ in range(2):
            assert (
                await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})
            ).status_code == 202
        full = await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 1}})
        assert full.status_code == 503
        assert full.headers["retry-after"] == "5"
        assert full.json()["error"]["code"] == "queue_full"
        assert full.json()["error"]["details"]["limit"] == "max_queued"
        assert stored(h) == 3
        gate.write_text("go")


# -- Hypothesis: argument validation never errs, never stores bad args -------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**200), max_value=10**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def registry() -> Registry:
    with tempfile.TemporaryDirectory() as directory:
        settings = config.load(write_config(Path(directory)))
    return Registry.load(settings.tasks, (TESTS_DIR,))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=st.dictionaries(st.sampled_from(["a", "b", "c", "ü", "\x00"]), json_values, max_size=3))
def test_validation_accepts_exactly_well_typed_args(
    registry: Registry, args: dict[str, Any]
) -> None:
    task = registry.get("add")  # add(a: int, b: int = 0)
    well_typed = "a" in args and set(args) <= {"a", "b"} and all(type(args[k]) is int for k in args)
    try:
        validated = task.validate(args)
    except JobServerError as error:
        assert not well_typed
        assert error.code == "validation_error"
        assert all({"field", "message"} <= set(d) for d in error.details)
        return
    assert well_typed
    assert validated == args
    json.dumps(validated, allow_nan=False)  # storable as strict JSON


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_float_parameters_never_accept_nan_or_infinity(registry: Registry, value: Any) -> None:
    task = registry.get("sleep")  # sleep(seconds: float)
    try:
        task.validate({"seconds": value})
    except JobServerError:
        return
    assert type(value) in (int, float)
    assert math.isfinite(value)


# Short items, so that bodies near the limits are common.
JSON_VALUES = st.recursive(
    st.integers(0, 9) | st.none() | st.text(max_size=14),
    lambda children: (
        st.lists(children, max_size=9) | st.dictionaries(st.text(max_size=2), children, max_size=9)
    ),
    max_leaves=20,
)


@settings(max_examples=1000, deadline=None)
@given(
    value=JSON_VALUES,
    depth=st.integers(min_value=1, max_value=6),
    length=st.integers(min_value=0, max_value=30),
    items=st.integers(min_value=0, max_value=8),
    ascii_only=st.booleans(),
)
def test_a_body_short_enough_to_skip_the_walk_is_within_every_limit(
    value: Any, depth: int, length: int, items: int, ascii_only: bool
) -> None:
    limits = InputLimits(max_json_depth=depth, max_string_length=length, max_array_length=items)
    body = json.dumps(value, ensure_ascii=ascii_only, separators=(",", ":")).encode()
    if _within_limits(body, limits):
        check_json_limits(value, limits)  # raises if the shortcut were wrong


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8])
def test_the_shortest_body_over_each_limit_is_walked(limit: int) -> None:
    deep_list: Any = 0
    deep_object: Any = 0
    for _ in range(limit + 1):
        deep_list, deep_object = [deep_list], {"": deep_object}
    loose = {"max_json_depth": 1000, "max_string_length": 1000, "max_array_length": 1000}
    shortest_over = [
        ("max_string_length", "a" * (limit + 1)),
        ("max_string_length", {"a" * (limit + 1): 0}),
        ("max_array_length", list(range(limit + 1))),
        ("max_array_length", {chr(65 + n): 0 for n in range(limit + 1)}),
        ("max_json_depth", deep_list),
        ("max_json_depth", deep_object),
    ]
    for name, value in shortest_over:
        limits = InputLimits(**(loose | {name: limit}))
        with pytest.raises(JobServerError):
            check_json_limits(value, limits)
        body = json.dumps(value, separators=(",", ":")).encode()
        assert not _within_limits(body, limits), (name, body)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=0, max_value=60), in_object=st.booleans())
def test_json_depth_limit_is_exact(depth: int, in_object: bool) -> None:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value} if in_object else [value]
    try:
        check_json_limits(value, InputLimits(max_json_depth=20))
    except JobServerError as error:
        assert depth > 20 and error.details["limit"] == "max_json_depth"
        return
    assert depth <= 20


async def test_unicode_and_huge_ints_round_trip(make_harness: Any) -> None:
    async with make_harness() as h:
        text = "naïve 🚀 \u202e \x00 end"
        response = await h.client.post(
            "/api/v1/jobs", json={"task": "echo", "args": {"text": text, "times": 2}}
        )
        assert response.status_code == 202
        done = await h.wait_for_state(response.json()["id"], "succeeded")
        assert done["result"]["text"] == text * 2
        huge = await h.client.post("/api/v1/jobs", json={"task": "add", "args": {"a": 10**100}})
        assert huge.status_code == 202
        assert (await h.wait_for_state(huge.json()["id"], "succeeded"))["result"] == 10**100


# -- the job process: environment, user, resource limits -------------------------------------


async def test_job_environment_is_an_allow_list(
    make_harness: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setenv("CUSTOM_ALLOWED", "yes")
    async with make_harness(
        server={"env_allow": ["PATH", "LC_*", "PYTHON*", "CUSTOM_ALLOWED"]}
    ) as h:
        response = await h.client.post("/api/v1/jobs", json={"task": "environment", "args": {}})
        env = (await h.wait_for_state(response.json()["id"], "succeeded"))["result"]
        assert "AWS_SECRET_ACCESS_KEY" not in env
        assert "HOME" not in env  # not in this allow-list
        assert env["LC_TIME"] == "C" and env["CUSTOM_ALLOWED"] == "yes"
        assert env["PATH"] == os.environ["PATH"]
        assert env["JOBSERVER_JOB_ID"] == response.json()["id"]


async def test_rlimits_apply_before_the_task_runs(make_harness: Any) -> None:
    async with make_harness(
        server={"rlimit_nofile": 64, "rlimit_core": 0, "rlimit_nproc": 5000}
    ) as h:
        response = await h.client.post("/api/v1/jobs", json={"task": "identity", "args": {}})
        seen = (await h.wait_for_state(response.json()["id"], "succeeded"))["result"]
        assert seen["nofile"] == [64, 64]
        assert seen["core"] == [0, 0]
        assert seen["nproc"][0] <= 5000


def _readable_by_others(path: Path) -> bool:
    """Whether another user could read ``path`` (every directory above it searchable)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if parent != path and not mode & 0o001:
            return False
    return bool(path.stat().st_mode & 0o004)


@needs("root", os.geteuid() != 0, "run_as needs the server to run as root")
def test_drop_privileges_sets_uid_gid_and_groups() -> None:
    import pwd
    import subprocess
    import sys

    nobody = pwd.getpwnam("nobody")
    # Python is loaded before the drop, so this works wherever the interpreter lives.
    code = (
        "import os, json; from jobserver.child import drop_privileges; "
        "drop_privileges('nobody'); "
        "print(json.dumps([os.getuid(), os.geteuid(), os.getgid(), os.getgroups()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    uid, euid, gid, groups = json.loads(out.stdout)
    assert (uid, euid, gid) == (nobody.pw_uid, nobody.pw_uid, nobody.pw_gid)
    assert 0 not in groups


def python_others_can_run() -> str | None:
    """This Python if another user can read its standard library, else a system Python of
    the same version that they can (this one may live under a private home directory,
    as pyenv's under /root does on the CI machine); None if there is neither."""
    for candidate in (
        sys.executable,
        f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}",
    ):
        found = subprocess.run(
            [candidate, "-c", "import os; print(os.__file__)"], capture_output=True, text=True
        )
        if found.returncode == 0 and _readable_by_others(Path(found.stdout.strip())):
            return candidate
    return None


@needs("root", os.geteuid() != 0, "run_as needs the server to run as root")
async def test_run_as_drops_to_that_user(make_harness: Any) -> None:
    import pwd

    python = python_others_can_run()
    if python is None:
        skip_for_want_of(
            "root",
            "no Python here whose standard library other users may read: no job "
            "can start as 'nobody'",
        )
    nobody = pwd.getpwnam("nobody")
    # The job writes its result in jobs_dir: put it where that user can reach it (pytest's
    # tmp_path is private to root).
    jobs_dir = Path(tempfile.mkdtemp(prefix="jobserver-run-as-"))
    jobs_dir.chmod(0o755)
    # The task runs under a Python that user can read (the task's own ``python``).
    identity = {**SAMPLE_TASKS["identity"], "python": python}
    try:
        async with make_harness(
            server={"run_as": "nobody", "jobs_dir": str(jobs_dir)}, tasks={"identity": identity}
        ) as h:
            response = await h.client.post("/api/v1/jobs", json={"task": "identity", "args": {}})
            seen = (await h.wait_for_state(response.json()["id"], "succeeded"))["result"]
            assert seen["uid"] == nobody.pw_uid and seen["gid"] == nobody.pw_gid
            assert 0 not in seen["groups"]
            assert seen["home"] == nobody.pw_dir
    finally:
        import shutil

        shutil.rmtree(jobs_dir, ignore_errors=True)


def test_run_as_unknown_user_is_a_config_error(tmp_path: Path) -> None:
    settings = config.load(write_config(tmp_path, server={"run_as": "no-such-user-xyz"}))
    with pytest.raises(JobServerError, match="no such user"):
        build(settings)


@needs("root", os.geteuid() != 0, "run_as needs the server to run as root")
@needs("setpriv", shutil.which("setpriv") is None, "setpriv (util-linux) is missing")
async def test_command_tasks_run_as_that_user_under_the_rlimits(make_harness: Any) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    tasks = {
        "whoami": {
            "command": ["sh", "-c", 'echo "[$(id -u), $(id -g), $(ulimit -n)]"'],
            "cpus": 0.1,
            "memory": "8MiB",
        }
    }
    jobs_dir = Path(tempfile.mkdtemp(prefix="jobserver-run-as-"))
    jobs_dir.chmod(0o755)
    try:
        async with make_harness(
            server={"run_as": "nobody", "jobs_dir": str(jobs_dir), "rlimit_nofile": 64},
            tasks=tasks,
        ) as h:
            response = await h.client.post("/api/v1/jobs", json={"task": "whoami", "args": {}})
            done = await h.wait_for_state(response.json()["id"], "succeeded", "failed")
            assert done["result"] == [nobody.pw_uid, nobody.pw_gid, 64], done
    finally:
        shutil.rmtree(jobs_dir, ignore_errors=True)
