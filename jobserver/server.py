"""The composition root: settings → lock → migrate → store → rescue → scheduler → HTTP.

Services start in the Starlette lifespan, before the first request is accepted, and
stop there in reverse order.  Nothing here decides anything about jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from jobserver.api import create_app
from jobserver.cgroups import JobCgroups
from jobserver.config import Settings, apply_changes, load
from jobserver.errors import ConfigError
from jobserver.jobs import utcnow
from jobserver.maintenance import rescue_interrupted
from jobserver.resources import GpuProbe, MachineProbe, NvmlProbe, Probe
from jobserver.runner import Runner
from jobserver.scheduler import Scheduler
from jobserver.store import DatabaseLock, Store, migrate
from jobserver.tasks import Registry

log = logging.getLogger("jobserver")


@dataclass
class Application:
    app: Starlette
    store: Store
    scheduler: Scheduler
    runtime: Runtime | None = None


class Runtime:
    """The settings that may change while the server runs (PATCH /api/v1/system, SIGHUP):
    [scheduler] and the per-task resource keys.  The next scheduler tick uses them."""

    def __init__(self, settings: Settings, registry: Registry, scheduler: Scheduler) -> None:
        self.settings = settings
        self._registry = registry
        self._scheduler = scheduler

    def change(self, changes: Any, origin: str) -> list[str]:
        """Apply a JSON change; ConfigError (nothing changed) if any value is bad."""
        return self._use(apply_changes(self.settings, changes, origin), origin)

    def reload(self) -> list[str]:
        """Reread the config file (SIGHUP).  A bad file is logged and ignored: the running
        settings stay.  Keys that need a restart are logged, not applied."""
        origin = f"SIGHUP (reload of {self.settings.path})"
        try:
            fresh = load(self.settings.path)
        except ConfigError as exc:
            log.error("%s failed; keeping the running settings: %s", origin, exc.message)
            return []
        needs_restart = []
        if fresh.server != self.settings.server or fresh.task_paths != self.settings.task_paths:
            needs_restart.append("[server] / task_paths")
        if set(fresh.tasks) != set(self.settings.tasks):
            needs_restart.append("the set of [tasks.*] tables")
        for name, task in fresh.tasks.items():
            old = self.settings.tasks.get(name)
            if old is not None and (task.function, task.route) != (old.function, old.route):
                needs_restart.append(f"tasks.{name}.function/route")
        if needs_restart:
            log.warning(
                "%s: changes to %s need a restart; they are not applied",
                origin,
                ", ".join(needs_restart),
            )
        kept = {
            name: dataclasses.replace(fresh.tasks[name], function=task.function, route=task.route)
            for name, task in self.settings.tasks.items()
            if name in fresh.tasks
        }
        merged = dataclasses.replace(
            self.settings,
            scheduler=fresh.scheduler,
            tasks=MappingProxyType({**self.settings.tasks, **kept}),
        )
        return self._use(merged, origin)

    def _use(self, new: Settings, origin: str) -> list[str]:
        changed = _differences(self.settings, new)
        self.settings = new
        self._registry.update_settings(new.tasks)
        self._scheduler.reconfigure(new.scheduler)
        log.warning(
            "configuration changed by %s: %s", origin, "; ".join(changed) or "nothing changed"
        )
        return changed


def _differences(old: Settings, new: Settings) -> list[str]:
    changed = []
    for field in dataclasses.fields(old.scheduler):
        before, after = getattr(old.scheduler, field.name), getattr(new.scheduler, field.name)
        if before != after:
            changed.append(f"scheduler.{field.name}: {before!r} -> {after!r}")
    for name, task in new.tasks.items():
        previous = old.tasks.get(name)
        if previous is None:
            continue
        for field in dataclasses.fields(task):
            before, after = getattr(previous, field.name), getattr(task, field.name)
            if before != after:
                changed.append(f"tasks.{name}.{field.name}: {before!r} -> {after!r}")
    return changed


def build(
    settings: Settings,
    probe: Probe | None = None,
    *,
    handle_sighup: bool = False,
    gpu_probe: GpuProbe | None = None,
) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe).

    ``handle_sighup``: reload config.toml on SIGHUP (``serve`` sets it; in-process tests
    do not, so as not to take over the test runner's signals)."""
    registry = Registry.load(settings.tasks, settings.task_paths)
    store = Store.open(settings.server.database)
    scheduler = Scheduler(
        store=store,
        runner=Runner(settings.task_paths, os.environ),
        probe=probe or MachineProbe(),
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=settings.server.jobs_dir,
        cgroups=JobCgroups.detect() if settings.scheduler.job_cgroups else None,
        gpu_probe=gpu_probe or NvmlProbe(),
    )
    runtime = Runtime(settings, registry, scheduler)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        rescued = await rescue_interrupted(store, settings.scheduler.max_rescues, utcnow())
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        await scheduler.start()
        loop = asyncio.get_running_loop()
        if handle_sighup:
            loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        try:
            yield
        finally:
            if handle_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await scheduler.stop()
            await store.close()

    app = create_app(
        store=store,
        registry=registry,
        scheduler=scheduler,
        max_body_size=settings.server.max_body_size,
        lifespan=lifespan,
        reconfigure=runtime.change,
    )
    return Application(app, store, scheduler, runtime)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    logging.basicConfig(
        level=settings.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    lock = DatabaseLock(settings.server.database)
    lock.acquire()
    try:
        migrate(settings.server.database)
        application = build(settings, handle_sighup=True)
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
