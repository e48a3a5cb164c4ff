"""The composition root: settings → lock → migrate → store → rescue → scheduler → HTTP.

Services start in the Starlette lifespan, before the first request is accepted, and
stop there in reverse order.  A SIGTERM first drains (``Drain``) while uvicorn still
serves; only then does uvicorn stop listening.  Nothing here decides anything about jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any

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
from jobserver.api import InputLimits, Shutdown, create_app
from jobserver.backup import backup_before_upgrade
from jobserver.cgroups import JobCgroups
from jobserver.config import ServerSettings, Settings, apply_changes, error_at, load
from jobserver.errors import ConfigError, StorageUnavailable, ValidationError
from jobserver.events import Events, Wakeups, configure_logging
from jobserver.jobs import utcnow
from jobserver.maintenance import (
    CronJob,
    CronService,
    NodeLife,
    Pruner,
    Reconciler,
    WalCheckpointer,
    rescue_interrupted,
)
from jobserver.metrics import Metrics
from jobserver.resources import GpuProbe, MachineProbe, NvmlProbe, Probe
from jobserver.runner import ChildSettings, Runner, allowed_environment
from jobserver.scheduler import Scheduler, SystemView, admission_problems
from jobserver.store import (
    DatabaseLock,
    SqliteDriver,
    Store,
    migrate,
    open_driver,
    pending_migrations,
)
from jobserver.store.driver import Driver
from jobserver.tasks import Registry

if TYPE_CHECKING:
    from jobserver.store.postgres import Listener

log = logging.getLogger("jobserver")


class Drain:
    """Graceful shutdown's first half, run once.  The first SIGTERM/SIGINT begins it
    (``begin`` only sets flags: safe in a signal handler) and ``_Server`` runs it while
    uvicorn still serves; the lifespan's shutdown awaits the same run (or runs it, when
    the server stops without a signal).  From the beginning the API refuses new work
    (503) and no job starts; then ``stop_first`` (cron, the reconciler) stop and running
    jobs get ``grace`` seconds to finish by themselves.  ``Scheduler.hurry`` (a second
    signal) ends the wait."""

    def __init__(
        self,
        shutdown: Shutdown,
        scheduler: Scheduler,
        stop_first: Sequence[Callable[[], Awaitable[None]]],
        grace: float,
    ) -> None:
        self._shutdown = shutdown
        self._scheduler = scheduler
        self._stop_first = stop_first
        self._grace = grace
        self._began: float | None = None  # time.monotonic()
        self._run: asyncio.Future[None] | None = None

    @property
    def begun(self) -> bool:
        return self._began is not None

    def begin(self) -> None:
        if self._began is None:
            self._began = time.monotonic()
        self._shutdown.begin(self._grace)
        self._scheduler.stop_admitting()

    async def run(self) -> None:
        """Drain; a later call waits for the first one's end."""
        if self._run is None:
            self.begin()
            self._run = asyncio.ensure_future(self._steps())
        await self._run

    async def _steps(self) -> None:
        for stop in self._stop_first:
            await stop()
        assert self._began is not None
        # The grace counts from the signal (the time Shutdown shows), not from here.
        await self._scheduler.drain(max(0.0, self._began + self._grace - time.monotonic()))


@dataclass
class Application:
    app: Starlette
    store: Store
    driver: Driver  # the store's engine (SqliteDriver: WAL, checkpoints, pragmas)
    scheduler: Scheduler
    events: Events
    metrics: Metrics
    drain: Drain
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
        return self._use(apply_changes(self.settings, changes, origin), origin, origin)

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
        try:
            return self._use(merged, origin, self.settings.path)
        except ConfigError as exc:
            log.error("%s failed; keeping the running settings: %s", origin, exc.message)
            return []

    def _use(self, new: Settings, origin: str, where: str | Path) -> list[str]:
        check_admission(self._scheduler.admission_problems(new.scheduler), where)
        changed = _differences(self.settings, new)
        self.settings = new
        self._registry.update_settings(new.tasks)
        self._scheduler.reconfigure(new.scheduler)
        log.warning(
            "configuration changed by %s: %s", origin, "; ".join(changed) or "nothing changed"
        )
        return changed


def check_admission(problems: Sequence[tuple[str, str]], where: str | Path) -> None:
    """ConfigError (naming the key, and its line in the file ``where``) for the first of
    ``admission_problems``: settings that could never admit anything on this machine."""
    for key, message in problems:
        raise error_at(where, key, message)


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


# With LISTEN, a waiting reader re-reads its job every this many poll intervals all the
# same (a notice lost on the way); without, every poll interval.
LISTEN_RECHECK = 10


def _wakeups(
    settings: Settings, store: Store, events: Events, scheduler: Scheduler
) -> Listener | None:
    """On a shared database: tell the other nodes what changes here (NOTIFY), and, unless
    ``[cluster] listen = false``, listen to theirs (the listener to start).  SQLite: None."""
    if not store.shared:
        return None
    wakeups = Wakeups(
        store.notify,
        wake_readers=events.wake_readers,
        wake_all=events.wake_all_readers,
        wake_scheduler=scheduler.wake,
        job_changed=scheduler.changed_elsewhere,
    )
    events.wakeups = wakeups
    listen = settings.cluster is None or settings.cluster.listen
    poll = settings.scheduler.poll_interval
    events.recheck = poll * LISTEN_RECHECK if listen else poll
    if not listen:
        return None
    from jobserver.store.postgres import Listener  # psycopg: only for PostgreSQL

    return Listener(str(settings.server.database), wakeups.received, wakeups.reconnected)


def build(
    settings: Settings,
    probe: Probe | None = None,
    registry: Registry | None = None,
    *,
    host: str | None = None,
    handle_sighup: bool = False,
    gpu_probe: GpuProbe | None = None,
    wrap_driver: Callable[[Driver], Driver] | None = None,
) -> Application:
    """Wire the parts for an already migrated database (tests call this with a fake probe).
    ``host`` is the address the server will bind (it decides whether an empty tokens file
    means "open": only on loopback, or with ``allow_anonymous``).  ``handle_sighup``:
    reload config.toml on SIGHUP (``serve`` sets it; in-process tests do not, so as not
    to take over the test runner's signals).  ``wrap_driver``: what the store writes
    through, around the database's driver (tests inject faults there)."""
    server_settings = settings.server
    probe = probe or MachineProbe()
    check_admission(admission_problems(settings.scheduler, probe.snapshot()), settings.path)
    runner = make_runner(settings)
    registry = registry or load_tasks(settings, runner)
    cluster = settings.cluster
    driver = open_driver(
        server_settings.database,
        synchronous=server_settings.durability.upper(),
        # A node frozen mid-transaction: PostgreSQL ends it before the node is declared
        # dead, so that its row locks do not hold up the rescue.
        idle_timeout=None if cluster is None else cluster.node_timeout / 2,
    )
    # Tests put a fault-injecting driver between the store and the database.  On
    # PostgreSQL the node registers an incarnation of its own at start (``NodeLife``),
    # which scopes its claims, its fenced writes and its start-up rescue.
    node = {} if cluster is None else {"node": cluster.node}
    store = Store(driver if wrap_driver is None else wrap_driver(driver), **node)
    metrics = Metrics()
    events = Events(metrics)
    life = (
        None
        if cluster is None
        else NodeLife(
            store,
            heartbeat_interval=cluster.heartbeat_interval,
            node_timeout=cluster.node_timeout,
            url=cluster.url,
            definitions=node_definitions(settings),
            resources=lambda: node_resources(scheduler.view()),
            max_rescues=settings.scheduler.max_rescues,
            fence=lambda note: scheduler.fence(note),
            wake=lambda: scheduler.wake(),
            events=events,
        )
    )
    scheduler = Scheduler(
        store=store,
        runner=runner,
        probe=probe,
        registry=registry,
        settings=settings.scheduler,
        jobs_dir=server_settings.jobs_dir,
        jobs_settings=settings.jobs,
        cgroups=JobCgroups.detect() if settings.scheduler.job_cgroups else None,
        gpu_probe=gpu_probe or NvmlProbe(),
        events=events,
        may_claim=None if life is None else life.healthy,
    )
    listener = _wakeups(settings, store, events, scheduler)
    runtime = Runtime(settings, registry, scheduler, runner)
    # Several nodes: only the leader prunes and fires cron (a slot fires once anyway).
    leading = None if life is None else life.leading
    pruner = build_pruner(settings, store, leading)
    cron = CronService(
        store, cron_jobs(settings, registry), scheduler.wake, events=events, leading=leading
    )
    # PostgreSQL manages its own WAL.
    checkpointer = (
        WalCheckpointer(driver, server_settings.wal_max_size)
        if isinstance(driver, SqliteDriver)
        else None
    )
    reconciler = Reconciler(
        store,
        scheduler.owned_attempts,
        settings.scheduler.max_rescues,
        server_settings.jobs_dir,
        events,
    )
    shutdown = Shutdown()
    # A stop leaves rows running on purpose (for the next start's rescue): the reconciler
    # goes before it, and cron adds no work to a server that will not run it.
    drain = Drain(shutdown, scheduler, (cron.stop, reconciler.stop), server_settings.shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if life is not None:
            # Before anything is claimed: the claims carry the new incarnation.
            try:
                await life.register()
            except ConfigError as exc:  # the traceback that follows buries the message
                log.error("%s", exc.message)
                raise
            await life.start()
        rescued = await rescue_interrupted(
            store, settings.scheduler.max_rescues, utcnow(), events, server_settings.jobs_dir
        )
        if rescued:
            log.warning("rescued %d job(s) left running by a previous server", len(rescued))
        runner.open()  # the fork server imports the task modules while we start
        if listener is not None:
            await listener.start()
        await scheduler.start()
        await pruner.start()
        await cron.start()
        if checkpointer is not None:
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
            await drain.run()
            await scheduler.stop()
            if life is not None:
                await life.stop()
                try:
                    await store.retire_node()
                except StorageUnavailable as exc:  # the leader declares it dead later
                    log.warning("could not mark this node stopped: %s", exc)
            await runner.close()
            await pruner.stop()
            if listener is not None:
                await listener.stop()
            if events.wakeups is not None:
                await events.wakeups.drain()
            if checkpointer is not None:
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
    schemas = {
        **openapi.submission_schemas(registry, settings.jobs.max_retries_limit),
        **openapi.system_change_schemas(registry),
    }
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
        shutdown=shutdown,
        node_timeout=None if cluster is None else cluster.node_timeout,
    )
    app.add_middleware(AccessMiddleware, policy=policy)
    return Application(
        app,
        store,
        driver,
        scheduler,
        events,
        metrics,
        drain,
        pruner,
        cron,
        checkpointer,
        runtime,
        runner,
    )


def build_pruner(
    settings: Settings, store: Store, leading: Callable[[], bool] | None = None
) -> Pruner:
    """The pruner for these settings (the server runs it; ``jobserver prune`` too);
    ``leading``: it prunes only while that says this node leads."""
    return Pruner(
        store,
        settings.server.jobs_dir,
        settings.jobs.retention,
        {name: t.retention for name, t in settings.tasks.items() if t.retention is not None},
        interval=settings.jobs.prune_interval,
        idempotency_window=settings.jobs.idempotency_window,
        pruned_memory=settings.jobs.pruned_memory,
        leading=leading,
    )


def node_definitions(settings: Settings) -> dict[str, Any]:
    """What must mean the same on every live node, as JSON: each task's code, arguments
    and cluster-wide limits, and each schedule.  Resources and per-machine paths (a
    task's own interpreter) may differ between nodes."""
    tasks = {
        name: {
            "function": task.function,
            "command": None if task.command is None else list(task.command),
            "params": dict(task.params),
            "max_retries": task.max_retries,
            "timeout": task.timeout,
            "max_concurrency": task.max_concurrency,
            "exclusive": task.exclusive,
        }
        for name, task in settings.tasks.items()
    }
    schedules = {
        name: {
            "task": schedule.task,
            "cron": schedule.cron,
            "args": dict(schedule.args),
            "timezone": schedule.timezone,
            "priority": schedule.priority,
        }
        for name, schedule in settings.schedules.items()
    }
    # As stored: what a live node's row gives back compares equal.
    found: dict[str, Any] = json.loads(json.dumps({"tasks": tasks, "schedules": schedules}))
    return found


def node_resources(view: SystemView) -> dict[str, Any]:
    """What a node publishes with each heartbeat (GET /api/v1/system's ``nodes``)."""
    return {
        "capacity": dataclasses.asdict(view.capacity),
        "free": dataclasses.asdict(view.free),
        "max_jobs": view.max_jobs,
    }


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
    uvicorn's signal handlers call.  The first signal begins the drain and runs it while
    uvicorn goes on serving (reads are answered, new work gets 503); once the running jobs
    have settled (or the grace is over) waiting readers (long polls, event streams) are
    answered at once and ``should_exit`` is set: uvicorn stops listening, then runs the
    lifespan shutdown, which requeues what still runs.  A second signal shortens the wait
    for running jobs (uvicorn's own answer, ``force_exit``, would skip the lifespan
    shutdown that requeues them)."""

    def __init__(
        self, config: uvicorn.Config, drain: Drain, scheduler: Scheduler, events: Events
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._scheduler = scheduler
        self._events = events
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # What serves, in the log: an install that lacks an extra shows here.
        log.info(
            "event loop %s, HTTP protocol %s",
            _qualified_name(type(self._loop)),
            _qualified_name(self.config.http_protocol_class),
        )
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit or self._drain.begun:
            log.warning("second signal: terminating running jobs now")
            self._scheduler.hurry()
            return
        # Refuse new work and start no job from now on, not from the next loop pass.
        self._drain.begin()
        if not self.started or self._loop is None:
            # Still starting: nothing to serve meanwhile; the lifespan's shutdown drains.
            self._events.close()
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        log.warning("shutting down: new work is refused; reads are served until running jobs end")
        self._draining = asyncio.create_task(self._drain_then_exit(), name="jobserver-drain")

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain.run()
        finally:
            # Answer long polls and end event streams now: uvicorn waits for open requests.
            self._events.close()
            self.should_exit = True


def _qualified_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit code."""
    configure_logging(settings.server.log_level, settings.server.log_format)
    bind = host or settings.server.host
    check_exposure(settings.server, bind)
    database = settings.server.database
    # One server per SQLite file.  PostgreSQL is shared by nodes on purpose: each claims
    # with row locks and fences its writes (docs/cluster.md).
    lock = DatabaseLock(database) if isinstance(database, Path) else None
    if lock is not None:
        lock.acquire()
    try:
        # Import the tasks first: a broken task module must not touch the database.
        registry = load_tasks(settings)
        upgrade(database)
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
            # Named, not "auto": a missing extra fails the start instead of quietly
            # serving at a fraction of the speed (uvicorn[standard] installs both).
            loop="uvloop",
            http="httptools",
            # No WebSocket routes here: upgrade requests stay plain HTTP, as they were
            # before the standard extra brought the websockets package.
            ws="none",
        )
        server = _Server(config, application.drain, application.scheduler, application.events)
        config.load()  # uvicorn's protocol modules: imported now, so frozen below
        # Everything built so far lives as long as the server: move it out of the cyclic
        # garbage collector's sight.  Without this every full collection walks the whole
        # start-up heap (SQLAlchemy, alembic, the app): about 50 ms each, one every 0.6 s
        # under a submit load, 8% of the event loop's time (issue 6).
        gc.collect()
        gc.freeze()
        # While uvicorn serves, SIGINT and SIGTERM go to _Server.handle_exit; before and
        # after, to these no-ops: asyncio's runner then installs no SIGINT handler of its
        # own (it would cancel the server mid-start), and a signal that comes late, or one
        # uvicorn re-raises once it has shut down, ends in exit 0, not a death by signal.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        server.run()  # on the configured loop (asyncio.run would ignore config.loop)
        return 0 if server.started else 1
    finally:
        if lock is not None:
            lock.release()


def upgrade(database: Path | str) -> Path | None:
    """Migrate ``database``, first copying an existing SQLite file that has migrations
    pending into ``backups/`` beside it; return that copy's path, if one was taken.  A
    PostgreSQL database is migrated under a transaction-scoped advisory lock (nodes
    starting at once migrate once) and not copied: back it up with ``pg_dump``."""
    if not isinstance(database, Path):
        from jobserver.store import postgres

        postgres.migrate(database)
        return None
    pending = pending_migrations(database)
    copy = backup_before_upgrade(database, pending)
    if copy is not None:
        log.warning("backed up %s to %s before applying %s", database, copy, ", ".join(pending))
    migrate(database)
    return copy
