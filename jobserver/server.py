"""The composition root: settings → lock → migrate → store → rescue → scheduler → HTTP.

Services start in the Starlette lifespan, before the first request is accepted, and
stop there in reverse order.  Nothing here decides anything about jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from jobserver import __version__, openapi
from jobserver.access import (
    AccessMiddleware,
    Policy,
    RateLimiter,
    TokenFile,
    is_loopback,
    rules_for,
)
from jobserver.api import InputLimits, create_app
from jobserver.backup import backup_before_upgrade
from jobserver.config import ServerSettings, Settings
from jobserver.errors import ConfigError, ValidationError
from jobserver.jobs import utcnow
from jobserver.maintenance import (
    CronJob,
    CronService,
    Pruner,
    WalCheckpointer,
    rescue_interrupted,
)
from jobserver.resources import MachineProbe, Probe
from jobserver.runner import ChildSettings, Runner, allowed_environment
from jobserver.scheduler import Scheduler
from jobserver.store import DatabaseLock, Store, migrate, pending_migrations
from jobserver.tasks import Registry

log = logging.getLogger("jobserver")


@dataclass
class Application:
    app: Starlette
    store: Store
    scheduler: Scheduler
    pruner: Pruner | None = None
    cron: CronService | None = None
    checkpointer: WalCheckpointer | None = None


def make_runner(settings: Settings) -> Runner:
    """The runner: jobs get only the allowed part of our environment (it may hold secrets)."""
    server = settings.server
    environment = allowed_environment(os.environ, server.env_allow)
    return Runner(settings.task_paths, environment, _child_settings(server))


def load_tasks(settings: Settings) -> Registry:
    """Import every task (or ask a task's own interpreter about it) before serving."""
    describe = make_runner(settings).describe
    return Registry.load(settings.tasks, settings.task_paths, describe=describe)


def build(
    settings: Settings,
    probe: Probe | None = None,
    registry: Registry | None = None,
    *,
    host: str | None = None,
) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe).
    ``host`` is the address the server will bind (it decides whether an empty tokens file
    means "open": only on loopback, or with ``allow_anonymous``)."""
    server_settings = settings.server
    runner = make_runner(settings)
    registry = registry or load_tasks(settings)
    store = Store.open(server_settings.database, synchronous=server_settings.durability.upper())
    scheduler = Scheduler(
        store=store,
        runner=runner,
        probe=probe or MachineProbe(),
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=server_settings.jobs_dir,
        jobs_settings=settings.jobs,
    )
    pruner = build_pruner(settings, store)
    cron = CronService(store, cron_jobs(settings, registry), scheduler.wake)
    checkpointer = WalCheckpointer(store, server_settings.wal_max_size)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        rescued = await rescue_interrupted(store, settings.scheduler.max_rescues, utcnow())
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        await scheduler.start()
        await pruner.start()
        await cron.start()
        await checkpointer.start()
        try:
            yield
        finally:
            await cron.stop()
            await scheduler.drain(server_settings.shutdown_grace)
            await scheduler.stop()
            await pruner.stop()
            await checkpointer.stop()
            await store.close()

    operations = openapi.operations_for(registry)
    app = create_app(
        store=store,
        registry=registry,
        scheduler=scheduler,
        max_body_size=server_settings.max_body_size,
        lifespan=lifespan,
        jobs_dir=server_settings.jobs_dir,
        max_retries_limit=settings.jobs.max_retries_limit,
        idempotency_window=settings.jobs.idempotency_window,
        limits=InputLimits(
            max_json_depth=server_settings.max_json_depth,
            max_string_length=server_settings.max_string_length,
            max_array_length=server_settings.max_array_length,
            max_args_size=server_settings.max_args_size,
            max_queued=server_settings.max_queued,
        ),
        openapi=openapi.document(operations, __version__),
    )
    bind = host or server_settings.host
    app.add_middleware(
        AccessMiddleware,
        policy=Policy(
            tokens=TokenFile(server_settings.tokens_file),
            rules=rules_for(openapi.access_rules(operations)),
            open_without_tokens=is_loopback(bind) or server_settings.allow_anonymous,
            limiter=None
            if server_settings.rate_limit is None
            else RateLimiter(server_settings.rate_limit, server_settings.rate_burst),
        ),
    )
    return Application(app, store, scheduler, pruner, cron, checkpointer)


def build_pruner(settings: Settings, store: Store) -> Pruner:
    """The pruner for these settings (the server runs it; ``jobserver prune`` too)."""
    return Pruner(
        store,
        settings.server.jobs_dir,
        settings.jobs.retention,
        {name: t.retention for name, t in settings.tasks.items() if t.retention is not None},
        interval=settings.jobs.prune_interval,
        idempotency_window=settings.jobs.idempotency_window,
    )


def cron_jobs(settings: Settings, registry: Registry) -> dict[str, CronJob]:
    """The configured schedules, their args checked against their task now, at start."""
    found = {}
    for name, schedule in settings.schedules.items():
        task = registry.get(schedule.task)
        try:
            task.validate(dict(schedule.args))
        except ValidationError as exc:
            problems = "; ".join(f"{d['field']}: {d['message']}" for d in exc.details or [])
            raise ConfigError(
                f"{settings.path}: schedules.{name}.args do not fit task {task.name!r}: {problems}",
                {"file": str(settings.path), "key": f"schedules.{name}.args"},
            ) from None
        found[name] = CronJob(
            name=name,
            task=schedule.task,
            cron=schedule.cron,
            args=dict(schedule.args),
            timezone=schedule.timezone,
            catch_up=schedule.catch_up,
            priority=schedule.priority,
            max_retries=task.settings.max_retries,
        )
    return found


def _child_settings(server: ServerSettings) -> ChildSettings:
    if server.run_as is not None:
        import pwd

        if os.geteuid() != 0:
            raise ConfigError(
                f"server.run_as = {server.run_as!r} needs the server to start as root; "
                "remove it or start the server as root",
                {"key": "server.run_as"},
            )
        try:
            pwd.getpwnam(server.run_as)
        except KeyError:
            raise ConfigError(
                f"server.run_as = {server.run_as!r}: no such user on this machine",
                {"key": "server.run_as"},
            ) from None
    rlimits = {
        name: value
        for name, value in (
            ("nofile", server.rlimit_nofile),
            ("nproc", server.rlimit_nproc),
            ("core", server.rlimit_core),
        )
        if value is not None
    }
    return ChildSettings(server.run_as, rlimits, server.max_result_size)


def check_exposure(settings: ServerSettings, host: str) -> None:
    """Safe by default: without tokens, listen on loopback only, unless the config says
    ``allow_anonymous = true``."""
    if is_loopback(host) or settings.allow_anonymous:
        return
    if not TokenFile(settings.tokens_file).tokens():
        raise ConfigError(
            f"refusing to listen on {host} without authentication: no tokens in "
            f"{settings.tokens_file}. Create one with `jobserver token create NAME --scopes "
            "submit,read,cancel`, or set server.allow_anonymous = true to serve anyone "
            "who can reach this address",
            {"host": host, "tokens_file": str(settings.tokens_file)},
        )


class _Server(uvicorn.Server):
    """uvicorn's server, with our answer to a second SIGTERM/SIGINT: shorten the wait for
    running jobs (uvicorn's own answer, "force exit", would skip the lifespan shutdown
    that requeues them)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self._scheduler = scheduler

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._captured_signals.append(sig)
        # Stop starting jobs now, not once uvicorn has finished closing connections.
        self._scheduler.stop_admitting()
        if self.should_exit:
            log.warning("second signal: terminating running jobs now")
            self._scheduler.hurry()
        self.should_exit = True


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    bind = host or settings.server.host
    check_exposure(settings.server, bind)
    lock = DatabaseLock(settings.server.database)
    lock.acquire()
    try:
        # Import the tasks first: a broken task module must not touch the database.
        registry = load_tasks(settings)
        upgrade(settings.server.database)
        application = build(settings, registry=registry, host=bind)
        config = uvicorn.Config(
            application.app,
            host=bind,
            port=settings.server.port if port is None else port,
            access_log=settings.server.access_log,
            log_level=settings.server.log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = _Server(config, application.scheduler)
        # uvicorn re-raises the signal that stopped it once it has shut down; our own
        # no-op handlers make that a clean exit 0 instead of a death by signal.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        asyncio.run(server.serve())
        return 0 if server.started else 1
    finally:
        lock.release()


def upgrade(database: Path) -> Path | None:
    """Migrate ``database``, first copying an existing file that has migrations pending
    into ``backups/`` beside it; return that copy's path, if one was taken."""
    pending = pending_migrations(database)
    copy = backup_before_upgrade(database, pending)
    if copy is not None:
        log.warning("backed up %s to %s before applying %s", database, copy, ", ".join(pending))
    migrate(database)
    return copy
