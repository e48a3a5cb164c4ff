"""The composition root: settings → lock → migrate → store → rescue → scheduler → HTTP.

Services start in the Starlette lifespan, before the first request is accepted, and
stop there in reverse order.  Nothing here decides anything about jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import Any

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
from jobserver.cgroups import JobCgroups
from jobserver.config import ServerSettings, Settings, apply_changes, load
from jobserver.errors import ConfigError, ValidationError
from jobserver.events import Events, configure_logging
from jobserver.jobs import utcnow
from jobserver.maintenance import (
    CronJob,
    CronService,
    Pruner,
    Reconciler,
    WalCheckpointer,
    rescue_interrupted,
)
from jobserver.metrics import Metrics
from jobserver.resources import GpuProbe, MachineProbe, NvmlProbe, Probe
from jobserver.runner import ChildSettings, Runner, allowed_environment
from jobserver.scheduler import Scheduler
from jobserver.store import DatabaseLock, SqliteDriver, Store, migrate, pending_migrations
from jobserver.store.driver import Driver
from jobserver.tasks import Registry

log = logging.getLogger("jobserver")


@dataclass
class Application:
    app: Starlette
    store: Store
    driver: SqliteDriver  # the store's engine: WAL, checkpoints, pragmas
    scheduler: Scheduler
    events: Events
    metrics: Metrics
    pruner: Pruner | None = None
    cron: CronService | None = None
    checkpointer: WalCheckpointer | None = None
    runtime: Runtime | None = None
    runner: Runner | None = None


def make_runner(settings: Settings) -> Runner:
    """The runner: jobs get only the allowed part of our environment (it may hold secrets).
    Its fork server preloads the modules of the Python tasks our own interpreter runs."""
    server = settings.server
    environment = allowed_environment(os.environ, server.env_allow)
    preload = [
        task.function.partition(":")[0]
        for task in settings.tasks.values()
        if task.command is None and task.python is None
    ]
    return Runner(
        settings.task_paths,
        environment,
        _child_settings(server),
        fork_server=server.fork_server,
        preload=preload,
        jobs_dir=server.jobs_dir,
    )


def load_tasks(settings: Settings, runner: Runner | None = None) -> Registry:
    """Import every task (or ask a task's own interpreter about it) before serving."""
    describe = (runner or make_runner(settings)).describe
    return Registry.load(settings.tasks, settings.task_paths, describe=describe)


class Runtime:
    """The settings that may change while the server runs (PATCH /api/v1/system, SIGHUP):
    [scheduler] and the per-task resource keys.  The next scheduler tick uses them.
    SIGHUP also restarts the fork server, so the next jobs run the task code as it is
    now on disk."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        scheduler: Scheduler,
        runner: Runner | None = None,
    ) -> None:
        self.settings = settings
        self._registry = registry
        self._scheduler = scheduler
        self._runner = runner

    def change(self, changes: Any, origin: str) -> list[str]:
        """Apply a JSON change; ConfigError (nothing changed) if any value is bad."""
        return self._use(apply_changes(self.settings, changes, origin), origin)

    def reload(self) -> list[str]:
        """Reread the config file (SIGHUP).  A bad file is logged and ignored: the running
        settings stay.  Keys that need a restart are logged, not applied."""
        origin = f"SIGHUP (reload of {self.settings.path})"
        if self._runner is not None:
            # Task code is imported once per fork server: a new one imports it afresh.
            self._runner.restart_fork_server()
        try:
            fresh = load(self.settings.path)
        except ConfigError as exc:
            log.error("%s failed; keeping the running settings: %s", origin, exc.message)
            return []
        needs_restart = []
        if fresh.server != self.settings.server or fresh.task_paths != self.settings.task_paths:
            needs_restart.append("[server] / task_paths")
        if fresh.jobs != self.settings.jobs or fresh.schedules != self.settings.schedules:
            needs_restart.append("[jobs] / [schedules.*]")
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
    registry: Registry | None = None,
    *,
    host: str | None = None,
    handle_sighup: bool = False,
    gpu_probe: GpuProbe | None = None,
    wrap_driver: Callable[[SqliteDriver], Driver] | None = None,
) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe).
    ``host`` is the address the server will bind (it decides whether an empty tokens file
    means "open": only on loopback, or with ``allow_anonymous``).  ``handle_sighup``:
    reload config.toml on SIGHUP (``serve`` sets it; in-process tests do not, so as not
    to take over the test runner's signals).  ``wrap_driver``: what the store writes
    through, around the SQLite driver (tests inject faults there)."""
    server_settings = settings.server
    runner = make_runner(settings)
    registry = registry or load_tasks(settings, runner)
    driver = SqliteDriver(server_settings.database, synchronous=server_settings.durability.upper())
    # Tests put a fault-injecting driver between the store and SQLite.
    store = Store(driver if wrap_driver is None else wrap_driver(driver))
    metrics = Metrics()
    events = Events(metrics)
    scheduler = Scheduler(
        store=store,
        runner=runner,
        probe=probe or MachineProbe(),
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=server_settings.jobs_dir,
        jobs_settings=settings.jobs,
        cgroups=JobCgroups.detect() if settings.scheduler.job_cgroups else None,
        gpu_probe=gpu_probe or NvmlProbe(),
        events=events,
    )
    runtime = Runtime(settings, registry, scheduler, runner)
    pruner = build_pruner(settings, store)
    cron = CronService(store, cron_jobs(settings, registry), scheduler.wake, events=events)
    checkpointer = WalCheckpointer(driver, server_settings.wal_max_size)
    reconciler = Reconciler(
        store,
        scheduler.owned_attempts,
        settings.scheduler.max_rescues,
        server_settings.jobs_dir,
        events,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        rescued = await rescue_interrupted(
            store, settings.scheduler.max_rescues, utcnow(), events, server_settings.jobs_dir
        )
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        runner.open()  # the fork server imports the task modules while we start
        await scheduler.start()
        await pruner.start()
        await cron.start()
        await checkpointer.start()
        await reconciler.start()
        loop = asyncio.get_running_loop()
        if handle_sighup:
            loop.add_signal_handler(signal.SIGHUP, runtime.reload)
        try:
            yield
        finally:
            if handle_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            await cron.stop()
            # First: a stop leaves rows running on purpose (for the next start's rescue).
            await reconciler.stop()
            await scheduler.drain(server_settings.shutdown_grace)
            await scheduler.stop()
            await runner.close()
            await pruner.stop()
            await checkpointer.stop()
            await store.close()

    operations = openapi.operations_for(registry)
    bind = host or server_settings.host
    policy = Policy(
        tokens=TokenFile(server_settings.tokens_file),
        # The page's own files are as open as the page (its API calls carry the token).
        rules=rules_for([*openapi.access_rules(operations), ("GET", "/static/{file}", None)]),
        open_without_tokens=is_loopback(bind) or server_settings.allow_anonymous,
        limiter=None
        if server_settings.rate_limit is None
        else RateLimiter(server_settings.rate_limit, server_settings.rate_burst),
        allow_anonymous=server_settings.allow_anonymous,
    )
    # Two descriptions: the one served follows the access state (tokens created or revoked).
    schemas = openapi.submission_schemas(registry, settings.jobs.max_retries_limit)
    documents = {
        guarded: openapi.document(
            operations,
            __version__,
            schemas=schemas,
            guarded=guarded,
            rate_limited=server_settings.rate_limit is not None,
        )
        for guarded in (False, True)
    }
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
        openapi=lambda: documents[not policy.anonymous(policy.tokens.tokens())],
        reconfigure=runtime.change,
        events=events,
        metrics=metrics,
    )
    app.add_middleware(AccessMiddleware, policy=policy)
    return Application(
        app, store, driver, scheduler, events, metrics, pruner, cron, checkpointer, runtime, runner
    )


def build_pruner(settings: Settings, store: Store) -> Pruner:
    """The pruner for these settings (the server runs it; ``jobserver prune`` too)."""
    return Pruner(
        store,
        settings.server.jobs_dir,
        settings.jobs.retention,
        {name: t.retention for name, t in settings.tasks.items() if t.retention is not None},
        interval=settings.jobs.prune_interval,
        idempotency_window=settings.jobs.idempotency_window,
        pruned_memory=settings.jobs.pruned_memory,
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
    """uvicorn's server, with our answer to SIGTERM/SIGINT in ``handle_exit``, the method
    uvicorn's signal handlers call.  The first signal sets ``should_exit`` (uvicorn stops
    serving, then runs the lifespan shutdown, which drains the jobs); a second one shortens
    the wait for running jobs (uvicorn's own answer, ``force_exit``, would skip the
    lifespan shutdown that requeues them).  Each tells waiting readers (long polls, event
    streams) to answer at once, so shutdown does not wait for them."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, events: Events) -> None:
        super().__init__(config)
        self._scheduler = scheduler
        self._events = events

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._events.close()
        # Stop starting jobs now, not once uvicorn has finished closing connections.
        self._scheduler.stop_admitting()
        if self.should_exit:
            log.warning("second signal: terminating running jobs now")
            self._scheduler.hurry()
        self.should_exit = True


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    configure_logging(settings.server.log_level, settings.server.log_format)
    bind = host or settings.server.host
    check_exposure(settings.server, bind)
    lock = DatabaseLock(settings.server.database)
    lock.acquire()
    try:
        # Import the tasks first: a broken task module must not touch the database.
        registry = load_tasks(settings)
        upgrade(settings.server.database)
        application = build(settings, registry=registry, host=bind, handle_sighup=True)
        config = uvicorn.Config(
            application.app,
            host=bind,
            port=settings.server.port if port is None else port,
            access_log=settings.server.access_log,
            log_level=settings.server.log_level,
            # uvicorn's records go through our root handler: one format for every line.
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        server = _Server(config, application.scheduler, application.events)
        config.load()  # uvicorn's protocol modules: imported now, so frozen below
        # Everything built so far lives as long as the server: move it out of the cyclic
        # garbage collector's sight.  Without this every full collection walks the whole
        # start-up heap (SQLAlchemy, alembic, the app): about 50 ms each, one every 0.6 s
        # under a submit load, 8% of the event loop's time (issue 6).
        gc.collect()
        gc.freeze()
        # While uvicorn serves, SIGINT and SIGTERM go to _Server.handle_exit; before and
        # after, to these no-ops: asyncio.run then installs no SIGINT handler of its own
        # (it would cancel the server mid-start), and a signal that comes late, or one
        # uvicorn re-raises once it has shut down, ends in exit 0, not a death by signal.
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
