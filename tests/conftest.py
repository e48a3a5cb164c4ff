"""Shared test parts: config files in temp dirs, a fake resource probe, an in-process app
with its lifespan running, and a real server process on a free loopback port."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import psycopg
import pytest
import sqlalchemy as sa

from jobserver import config
from jobserver.jobs import Job, new_job_id, utcnow
from jobserver.resources import Snapshot
from jobserver.server import Application, build
from jobserver.store import Changed, Finish, NewJob, Requeue, Store, migrate, open_store, postgres
from jobserver.store.driver import Driver, Operation

TESTS_DIR = Path(__file__).resolve().parent
GiB = 2**30

SAMPLE_TASKS = {
    "add": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "16MiB"},
    "echo": {"function": "sample_tasks:echo", "cpus": 0.1, "memory": "16MiB"},
    "sleep": {"function": "sample_tasks:sleep", "cpus": 0.1, "memory": "16MiB"},
    "fail": {"function": "sample_tasks:fail", "cpus": 0.1, "memory": "16MiB"},
    "die": {"function": "sample_tasks:die", "cpus": 0.1, "memory": "16MiB"},
    "exit_with": {"function": "sample_tasks:exit_with", "cpus": 0.1, "memory": "16MiB"},
    "unserializable": {"function": "sample_tasks:unserializable", "cpus": 0.1, "memory": "16MiB"},
    "flaky": {"function": "sample_tasks:flaky", "cpus": 0.1, "memory": "16MiB", "max_retries": 2},
    "spawn_and_sleep": {"function": "sample_tasks:spawn_and_sleep", "cpus": 0.1, "memory": "16MiB"},
    "ignore_sigterm": {"function": "sample_tasks:ignore_sigterm", "cpus": 0.1, "memory": "16MiB"},
    "wait_for_file": {"function": "sample_tasks:wait_for_file", "cpus": 0.1, "memory": "16MiB"},
    "big": {"function": "sample_tasks:add", "cpus": 0.1, "memory": "8GiB"},
    # --- lifecycle (issue 4) ---
    "report": {"function": "sample_tasks:report", "cpus": 0.1, "memory": "16MiB"},
    "make_files": {"function": "sample_tasks:make_files", "cpus": 0.1, "memory": "16MiB"},
    "chatty": {"function": "sample_tasks:chatty", "cpus": 0.1, "memory": "16MiB"},
    "slow_retry": {
        "function": "sample_tasks:sleep",
        "cpus": 0.1,
        "memory": "16MiB",
        "timeout": "300ms",
        "max_retries": 1,
        "retry_on_timeout": True,
    },
    "argv": {
        "command": [sys.executable, str(TESTS_DIR / "argv_tool.py"), "{src}", "-n", "{n}"],
        "params": {"src": "str", "n": "int"},
        "cpus": 0.1,
        "memory": "16MiB",
    },
    "dash_ok": {
        "command": [sys.executable, str(TESTS_DIR / "argv_tool.py"), "{offset}"],
        "params": {"offset": "str"},
        "allow_leading_dash": ["offset"],
        "cpus": 0.1,
        "memory": "16MiB",
    },
    "cmd_sleep": {
        "command": [
            sys.executable,
            "-c",
            "import sys, time; time.sleep(float(sys.argv[1]))",
            "{s}",
        ],
        "params": {"s": "float"},
        "cpus": 0.1,
        "memory": "16MiB",
    },
    "cmd_missing": {"command": ["jobserver-no-such-program-x"], "cpus": 0.1, "memory": "16MiB"},
    "cmd_exit": {
        "command": [
            sys.executable,
            "-c",
            "import sys; print('bye'); sys.exit(int(sys.argv[1]))",
            "{code}",
        ],
        "params": {"code": "int"},
        "cpus": 0.1,
        "memory": "16MiB",
    },
    "environment": {"function": "sample_tasks:environment", "cpus": 0.1, "memory": "16MiB"},
    "identity": {"function": "sample_tasks:identity", "cpus": 0.1, "memory": "16MiB"},
    "big_result": {"function": "sample_tasks:big_result", "cpus": 0.1, "memory": "16MiB"},
    "spawn_escaped": {"function": "sample_tasks:spawn_escaped", "cpus": 0.1, "memory": "16MiB"},
    "analysis": {
        "function": "jobserver.demo:run_long_analysis",
        "cpus": 0.1,
        "memory": "16MiB",
        "route": "/api/v1/start-analysis",
    },
}


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def write_config(
    directory: Path,
    *,
    server: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    tasks: dict[str, dict[str, Any]] | None = None,
    jobs: dict[str, Any] | None = None,
    schedules: dict[str, dict[str, Any]] | None = None,
) -> Path:
    lines = [f"task_paths = {_toml_value([str(TESTS_DIR)])}", "", "[server]"]
    # shutdown_grace 0: a stopped test server requeues its running jobs at once (tests of
    # the graceful wait set it themselves).
    server_values = {
        "log_level": "warning",
        "access_log": False,
        "shutdown_grace": "0s",
        **(server or {}),
    }
    lines += [f"{key} = {_toml_value(value)}" for key, value in server_values.items()]
    scheduler_values = {
        "poll_interval": "100ms",
        "reserve_cpus": 0,
        "reserve_memory": 0,
        "kill_grace": "2s",
        **(scheduler or {}),
    }
    lines += ["", "[scheduler]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in scheduler_values.items()]
    for name, table in (SAMPLE_TASKS if tasks is None else tasks).items():
        lines += ["", f"[tasks.{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    if jobs:
        lines += ["", "[jobs]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in jobs.items()]
    for name, table in (schedules or {}).items():
        lines += ["", f"[schedules.{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class FakeProbe:
    """A machine whose capacity and free resources the test sets."""

    def __init__(self, cpus: float = 8, memory: int = 16 * GiB) -> None:
        self.snapshot_value = Snapshot(
            cpu_capacity=cpus,
            memory_capacity=memory,
            cpu_idle=cpus,
            memory_available=memory,
            memory_pressure=None,
            cpu_pressure=None,
            sources={
                "cpu_capacity": "fake",
                "memory_capacity": "fake",
                "cpu_idle": "fake",
                "memory_available": "fake",
            },
        )

    def snapshot(self) -> Snapshot:
        return self.snapshot_value


@dataclass
class Harness:
    application: Application
    client: httpx.AsyncClient
    settings: config.Settings
    probe: FakeProbe

    async def wait_for_state(
        self, job_id: str, *states: str, timeout: float = 30
    ) -> dict[str, Any]:
        return await wait_for(self.client, job_id, *states, timeout=timeout)


async def wait_for(
    client: httpx.AsyncClient, job_id: str, *states: str, timeout: float = 30
) -> dict[str, Any]:
    import anyio

    deadline = time.monotonic() + timeout
    while True:
        response = await client.get(f"/api/v1/jobs/{job_id}")
        document: dict[str, Any] = response.json()
        if document.get("state") in states:
            return document
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} never reached {states}: {document}")
        await anyio.sleep(0.02)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A migrated SQLite file in the test's temp dir."""
    path = tmp_path / "jobs.db"
    migrate(path)
    return path


@pytest.fixture
async def store(database: Path) -> AsyncIterator[Store]:
    opened = open_store(database)
    yield opened
    await opened.close()


# -- the store's operations as tests use them one job at a time --------------------------


async def insert(
    store: Store, new: NewJob, job_id: str | None = None, now: datetime | None = None
) -> Job:
    """Submit ``new`` (at ``now``); the stored job."""
    change, _ = await store.submit(new, job_id or new_job_id(), now or utcnow())
    return change.job


async def claim(store: Store, job_id: str, now: datetime | None = None) -> Job | None:
    """Claim this one job in a scheduler tick's transaction; None if it is not in the head."""
    claimed = await store.claim_head(
        now or utcnow(), 1000, lambda head, _: [entry.id for entry in head if entry.id == job_id]
    )
    return claimed[0].job if claimed else None


async def end(
    store: Store, job: Job, ending: Finish | Requeue, now: datetime | None = None
) -> Changed | None:
    """End the current attempt of ``job`` (as read or claimed) at ``now``."""
    return await store.end_attempt(job.id, job.attempts, ending, now or utcnow())


# -- skips: allowed on a user's machine, failures where JOBSERVER_REQUIRE forbids them ---

# What a machine may lack, each a kind of skip.  The development and CI machines have all
# but a GPU: .ci/run sets JOBSERVER_REQUIRE to every other kind, so that CI cannot go
# green by skipping.
SKIP_KINDS = frozenset(
    {"root", "cgroup", "tmpfs", "setpriv", "memory", "chromium", "sqlite3", "postgresql", "gpu"}
)


def required_kinds() -> frozenset[str]:
    """The kinds ``JOBSERVER_REQUIRE`` (comma-separated) names; an unknown one is an error,
    so that a typo cannot let a skip through."""
    named = {kind.strip() for kind in os.environ.get("JOBSERVER_REQUIRE", "").split(",")}
    named.discard("")
    unknown = named - SKIP_KINDS
    if unknown:
        raise pytest.UsageError(
            f"JOBSERVER_REQUIRE names {', '.join(sorted(unknown))}; "
            f"known kinds: {', '.join(sorted(SKIP_KINDS))}"
        )
    return frozenset(named)


def skip_for_want_of(kind: str, reason: str) -> NoReturn:
    """Skip this test because the machine lacks ``kind`` (one of ``SKIP_KINDS``), saying
    why; where ``JOBSERVER_REQUIRE`` names that kind, fail with the same reason instead.
    Every skip in the tests goes through here (tests/test_skips.py checks)."""
    if kind not in SKIP_KINDS:
        raise ValueError(f"unknown skip kind {kind!r}; one of {', '.join(sorted(SKIP_KINDS))}")
    if kind in required_kinds():
        pytest.fail(
            f"{reason} (JOBSERVER_REQUIRE names {kind}: this machine must have it)",
            pytrace=False,
        )
    pytest.skip(reason)


def needs(kind: str, missing: bool, reason: str) -> pytest.MarkDecorator:
    """A decorator: the test runs when nothing is ``missing``; otherwise it goes through
    ``skip_for_want_of(kind, reason)`` as it is set up (``pytest.mark.skipif`` cannot fail)."""
    return pytest.mark.needs(kind=kind, missing=missing, reason=reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(kind, missing, reason): skip or fail for want of kind (see needs())"
    )
    required_kinds()  # a typo in JOBSERVER_REQUIRE stops the run at once


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs"):
        if mark.kwargs["missing"]:
            skip_for_want_of(mark.kwargs["kind"], mark.kwargs["reason"])


# -- PostgreSQL: a fresh database per test ------------------------------------------------

# The server tests create their databases on (any database of it: they connect there
# only to create and drop their own).
POSTGRESQL_SERVER = os.environ.get(
    "JOBSERVER_TEST_POSTGRESQL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


@contextmanager
def postgresql_database(*, migrated: bool = True, server: str | None = None) -> Iterator[str]:
    """The URL of a new database of its own on ``POSTGRESQL_SERVER`` (never an assumption
    that the server is empty), migrated unless told not to, dropped afterwards even while
    connected.  Skips when the server cannot be reached, unless PostgreSQL is required."""
    server = server or POSTGRESQL_SERVER
    try:
        admin = psycopg.connect(server, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        reason = f"PostgreSQL is not reachable at {server}: {exc}".strip()
        skip_for_want_of(
            "postgresql", f"{reason}; set JOBSERVER_TEST_POSTGRESQL to test on PostgreSQL"
        )
    name = f"jobserver_test_{secrets.token_hex(6)}"
    try:
        admin.execute(f"CREATE DATABASE {name}")
        url = sa.engine.make_url(server).set(database=name)
        if migrated:
            postgres.migrate(url.render_as_string(hide_password=False))
        yield url.render_as_string(hide_password=False)
    finally:
        with admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def make_harness(tmp_path: Path) -> Callable[..., AbstractAsyncContextManager[Harness]]:
    """An in-process app (lifespan running, scheduler started) over a real SQLite file,
    running jobs as real child processes, with a fake probe."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def factory(
        probe: FakeProbe | None = None,
        gpu_probe: Any = None,
        wrap_driver: Any = None,
        **overrides: Any,
    ) -> AsyncIterator[Harness]:
        settings = config.load(write_config(tmp_path, **overrides))
        migrate(settings.server.database)
        fake = probe or FakeProbe()
        application = build(settings, probe=fake, gpu_probe=gpu_probe, wrap_driver=wrap_driver)
        transport = httpx.ASGITransport(app=application.app)
        async with (
            application.app.router.lifespan_context(application.app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            yield Harness(application, client, settings, fake)

    return factory


def poll_value(
    condition: Callable[[], Any],
    what: str = "condition",
    timeout: float = 20,
    ignoring: type[BaseException] | tuple[type[BaseException], ...] = Exception,
) -> Any:
    """The first true value ``condition()`` gives, asked every 0.1 s for ``timeout``
    seconds; an exception in ``ignoring`` counts as "not yet" (a server still starting, an
    element re-rendered between find and read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except ignoring:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    config_path: Path
    log_path: Path

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def in_cgroup(procs: Path, argv: list[str]) -> list[str]:
    """``argv`` run inside the cgroup whose ``cgroup.procs`` is ``procs``: a shell joins
    it, then execs the program (no preexec_fn: the test process has threads)."""
    return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *argv]


def start_server(
    config_path: Path, *, wait: bool = True, timeout: float = 30, cgroup_procs: Path | None = None
) -> ServerProcess:
    """``jobserver serve`` on a free port; inside the cgroup of ``cgroup_procs`` if given
    (from its first instruction, so that it reads that cgroup's limits as its own)."""
    port = free_port()
    log_path = config_path.parent / f"server-{port}.log"
    with log_path.open("wb") as log:
        argv = [
            sys.executable,
            "-m",
            "jobserver",
            "serve",
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        process = subprocess.Popen(
            argv if cgroup_procs is None else in_cgroup(cgroup_procs, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", config_path, log_path)
    if wait:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                server.stop(signal.SIGKILL)
                raise AssertionError(f"server did not start:\n{server.log()}")
            time.sleep(0.05)
    return server


@pytest.fixture
def server_factory() -> Iterator[Callable[..., ServerProcess]]:
    """Start real ``jobserver serve`` processes; every one is killed at the end."""
    started: list[ServerProcess] = []

    def factory(config_path: Path, **kwargs: Any) -> ServerProcess:
        server = start_server(config_path, **kwargs)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(timeout=10)


# -- CI artifacts (issue 7): files a test keeps, listed at the end of the run ----------

ARTIFACTS: list[Path] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for path in ARTIFACTS:
        terminalreporter.write_line(f"artifact: {path}")


_T = TypeVar("_T")


class PassThroughDriver:
    """A driver that passes every call to ``inner``: tests subclass it to make some
    writes fail (a full disk, an unreachable database) and leave the rest real."""

    def __init__(self, inner: Driver) -> None:
        self.inner = inner

    @property
    def dialect(self) -> sa.engine.Dialect:
        return self.inner.dialect

    async def read(self, op: Operation[_T], *, quick: bool = False) -> _T:
        return await self.inner.read(op, quick=quick)

    async def write(self, op: Operation[_T], *, batched: bool = True) -> _T:
        return await self.inner.write(op, batched=batched)

    async def insert(self, table: sa.Table, rows: Any) -> None:
        await self.inner.insert(table, rows)

    async def close(self) -> None:
        await self.inner.close()
