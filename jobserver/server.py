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

import uvicorn
from starlette.applications import Starlette

from jobserver.api import create_app
from jobserver.backup import backup_before_upgrade
from jobserver.config import Settings
from jobserver.errors import ConfigError, ValidationError
from jobserver.jobs import utcnow
from jobserver.maintenance import CronJob, CronService, Pruner, rescue_interrupted
from jobserver.resources import MachineProbe, Probe
from jobserver.runner import Runner
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


def load_tasks(settings: Settings) -> Registry:
    """Import every task (or ask a task's own interpreter about it) before serving."""
    describe = Runner(settings.task_paths, os.environ).describe
    return Registry.load(settings.tasks, settings.task_paths, describe=describe)


def build(
    settings: Settings, probe: Probe | None = None, registry: Registry | None = None
) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe)."""
    runner = Runner(settings.task_paths, os.environ)
    registry = registry or load_tasks(settings)
    store = Store.open(settings.server.database)
    scheduler = Scheduler(
        store=store,
        runner=runner,
        probe=probe or MachineProbe(),
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=settings.server.jobs_dir,
        jobs_settings=settings.jobs,
    )
    pruner = build_pruner(settings, store)
    cron = CronService(store, cron_jobs(settings, registry), scheduler.wake)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        rescued = await rescue_interrupted(store, settings.scheduler.max_rescues, utcnow())
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        await scheduler.start()
        await pruner.start()
        await cron.start()
        try:
            yield
        finally:
            await cron.stop()
            await pruner.stop()
            await scheduler.stop()
            await store.close()

    app = create_app(
        store=store,
        registry=registry,
        scheduler=scheduler,
        max_body_size=settings.server.max_body_size,
        lifespan=lifespan,
        jobs_dir=settings.server.jobs_dir,
        max_retries_limit=settings.jobs.max_retries_limit,
        idempotency_window=settings.jobs.idempotency_window,
    )
    return Application(app, store, scheduler, pruner, cron)


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


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lock = DatabaseLock(settings.server.database)
    lock.acquire()
    try:
        # Import the tasks first: a broken task module must not touch the database.
        registry = load_tasks(settings)
        upgrade(settings.server.database)
        application = build(settings, registry=registry)
        config = uvicorn.Config(
            application.app,
            host=host or settings.server.host,
            port=settings.server.port if port is None else port,
            access_log=settings.server.access_log,
            log_level=settings.server.log_level,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = uvicorn.Server(config)
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
