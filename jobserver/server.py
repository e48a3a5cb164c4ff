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
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from jobserver.api import create_app
from jobserver.config import Settings
from jobserver.events import Events, configure_logging
from jobserver.jobs import utcnow
from jobserver.maintenance import rescue_interrupted
from jobserver.metrics import Metrics
from jobserver.resources import MachineProbe, Probe
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
    events: Events
    metrics: Metrics


def build(settings: Settings, probe: Probe | None = None) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe)."""
    registry = Registry.load(settings.tasks, settings.task_paths)
    store = Store.open(settings.server.database)
    metrics = Metrics()
    events = Events(metrics)
    scheduler = Scheduler(
        store=store,
        runner=Runner(settings.task_paths, os.environ),
        probe=probe or MachineProbe(),
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=settings.server.jobs_dir,
        events=events,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        rescued = await rescue_interrupted(store, settings.scheduler.max_rescues, utcnow(), events)
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        await scheduler.start()
        try:
            yield
        finally:
            await scheduler.stop()
            await store.close()

    app = create_app(
        store=store,
        registry=registry,
        scheduler=scheduler,
        max_body_size=settings.server.max_body_size,
        lifespan=lifespan,
        events=events,
        metrics=metrics,
    )
    return Application(app, store, scheduler, events, metrics)


class _Server(uvicorn.Server):
    """uvicorn's server, telling waiting readers (long polls, event streams) to answer at
    once when a stop signal comes, so shutdown does not wait for them."""

    def __init__(self, config: uvicorn.Config, events: Events) -> None:
        super().__init__(config)
        self._events = events

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._events.close()
        super().handle_exit(sig, frame)


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    configure_logging(settings.server.log_level, settings.server.log_format)
    lock = DatabaseLock(settings.server.database)
    lock.acquire()
    try:
        migrate(settings.server.database)
        application = build(settings)
        config = uvicorn.Config(
            application.app,
            host=host or settings.server.host,
            port=settings.server.port if port is None else port,
            access_log=settings.server.access_log,
            log_level=settings.server.log_level,
            # JSON logs: uvicorn's records go through our root handler instead of its own.
            log_config=None
            if settings.server.log_format == "json"
            else uvicorn.config.LOGGING_CONFIG,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = _Server(config, application.events)
        # uvicorn re-raises the signal that stopped it once it has shut down; our own
        # no-op handlers make that a clean exit 0 instead of a death by signal.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        asyncio.run(server.serve())
        return 0 if server.started else 1
    finally:
        lock.release()
