"""Settings: config.toml read with ``tomllib`` into frozen dataclasses, one per table.

    Settings                  the whole file: path, task_paths, and the tables below
    ├── ServerSettings        [server]: listen address, database and job files, logging
    ├── SchedulerSettings     [scheduler]: polling, concurrency and resource caps, kill grace
    ├── TaskSettings          [tasks.NAME]: one registered task (import path or command,
    │                         resources, route, retries, retention)
    ├── JobsSettings          [jobs]: lifecycle defaults (backoff, log cap, retention, keys)
    ├── ClusterSettings       [cluster]: this node among several sharing PostgreSQL
    └── ScheduleSettings      [schedules.NAME]: one periodic job (task, cron, args, zone)

Every key has a default except ``tasks.NAME.function`` (or ``command``) and a schedule's
``task`` and ``cron``.  Unknown keys and bad values are
rejected with a ``ConfigError`` naming the dotted key, the file and (best effort) the line.
Relative paths are resolved against the config file's directory, never the working directory.

Only the composition root (``server.py``) reads this module; each component is handed its
own sub-settings object.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import socket
import sys
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from jobserver.errors import ConfigError
from jobserver.jobs import MAX_TIMEOUT

DEFAULT_CONFIG_NAME = "config.toml"
ENV_VAR = "JOBSERVER_CONFIG"

_MIB = 1024**2
T = TypeVar("T")
_N = TypeVar("_N", int, float)
Parser = Callable[[object, str], T]


# --- durations and sizes -------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Bounds on what is stored or timed: any duration (timers and datetime arithmetic
# overflow far beyond it; a job's timeout has its own, MAX_TIMEOUT), and an integer kept
# in a database column (64-bit signed).
MAX_DURATION = 100 * 365 * 86400.0
MAX_STORED_INT = 2**63 - 1
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d))+")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")
_SIZE_UNITS = {"b": 1} | {
    prefix + suffix: base**power
    for power, prefix in enumerate("kmgt", start=1)
    for suffix, base in (("b", 1000), ("ib", 1024))
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_duration(value: object, key: str = "value") -> float:
    """Seconds from a number (>= 0) or a string like "500ms", "30s", "5m", "1h30m", "1d"."""
    expected = (
        f'{key} = {_show(value)}: expected a duration like "30s", "5m", "1h30m" '
        "or a number of seconds"
    )
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int | float):
        seconds = _to_float(value)
    elif isinstance(value, str) and _NUMBER_RE.fullmatch(value.strip()):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value.strip()):
        parts = _DURATION_PART.findall(value)
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    else:
        raise ValueError(expected)
    if not math.isfinite(seconds):
        raise ValueError(expected)
    if seconds < 0:
        raise ValueError(f"{key} = {_show(value)}: a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"{key} = {_show(value)}: at most 100 years ({MAX_DURATION:g} s)")
    return seconds


def parse_size(value: object, key: str = "value") -> int:
    """Bytes from an integer (>= 0) or a string like "512MiB", "1.5GiB", "100MB", "1024"."""
    expected = f'{key} = {_show(value)}: expected a size like "512MiB" or a number of bytes'
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (match := _SIZE_RE.fullmatch(value.strip())):
        number, unit = match.groups()
        exact = Decimal(number) * _SIZE_UNITS[(unit or "b").lower()]
        if exact != exact.to_integral_value():
            raise ValueError(f"{key} = {_show(value)}: not a whole number of bytes")
        size = int(exact)
    else:
        raise ValueError(expected)
    if size < 0:
        raise ValueError(f"{key} = {_show(value)}: a size cannot be negative")
    return size


def format_size(n: int) -> str:
    """Human-readable binary size: "0 B", "512 B", "1.5 KiB", "512.0 MiB", "2.0 GiB"."""
    if abs(n) < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if abs(round(value, 1)) < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --- the settings ----------------------------------------------------------------------

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
DURABILITY = ("full", "normal")
PRESSURE_ACTIONS = ("requeue", "pause", "none")
LOG_FORMATS = ("text", "json")
# Paths the API serves itself; a task's extra route may not shadow them.
RESERVED_ROUTES = (
    "/api/v1/jobs",
    "/api/v1/tasks",
    "/api/v1/system",
    "/api/v1/task-status",
    "/healthz",
    "/readyz",
    "/openapi.json",
    "/",  # the web page
    "/static",  # the web page's files
    "/metrics",
    "/api/v1/stats",
    "/api/v1/timeline",  # the page's timeline
)
# Types a command task's params may declare (see TaskSettings.params).
COMMAND_PARAM_TYPES = ("str", "int", "float", "bool")
_PLACEHOLDER_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TASK_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # A Path: the SQLite file (one server).  A str: a postgresql:// URL (several nodes may
    # share it; see docs/cluster.md).
    database: Path | str = Path("data/jobserver.db")
    jobs_dir: Path = Path("data/jobs")  # per-job log and result files
    max_body_size: int = 1 * _MIB
    access_log: bool = True
    log_level: str = "info"
    # -- reliability and access (issue 5) --
    durability: str = "full"  # "full": SQLite synchronous=FULL; "normal": synchronous=NORMAL
    shutdown_grace: float = 30.0  # on SIGTERM/SIGINT, wait this long for running jobs
    wal_max_size: int = 64 * _MIB  # checkpoint (TRUNCATE) when the WAL grows past this
    tokens_file: Path = Path("tokens.json")  # bearer tokens (hashes), see `jobserver token`
    allow_anonymous: bool = False  # without tokens, allow binding a non-loopback address
    rate_limit: float | None = None  # requests per second per token (None: unlimited)
    rate_burst: int = 50  # requests a token may make at once before the rate applies
    max_queued: int | None = None  # submits answer 503 while this many jobs are queued
    max_json_depth: int = 32
    max_string_length: int = 65536  # characters in one JSON string
    max_array_length: int = 10000  # items in one JSON array (or keys in one object)
    max_args_size: int = 256 * 1024  # a job's args as stored JSON, bytes
    max_result_size: int = 16 * _MIB  # a job's result as JSON, bytes
    env_allow: tuple[str, ...] = (
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LC_*",
        "TZ",
        "TMPDIR",
        "PYTHON*",
        "VIRTUAL_ENV",
    )  # environment variables (fnmatch patterns) a job's process inherits
    run_as: str | None = None  # when started as root: run jobs as this user
    rlimit_nofile: int | None = None  # open files per job process
    rlimit_nproc: int | None = None  # processes for the job's user
    rlimit_core: int | None = None  # core dump size, bytes (0: no core dumps)
    log_format: str = "text"  # "text" (human-readable lines) or "json" (one object per line)
    fork_server: bool = True  # fork Python jobs from a warm process instead of spawning each


@dataclass(frozen=True)
class SchedulerSettings:
    poll_interval: float = 1.0
    max_jobs: int = 64  # hard cap on concurrently running jobs
    max_cpus: float | None = None  # None: what the machine (cgroup) reports
    max_memory: int | None = None  # None: what the machine (cgroup) reports
    reserve_cpus: float = 0.25  # kept free for the OS and the server
    reserve_memory: int = 512 * _MIB
    kill_grace: float = 10.0  # seconds between SIGTERM and SIGKILL
    max_rescues: int = 3  # requeues after the server died under a job, then it is "lost"
    # -- resource-aware scheduling (docs/scheduling.md) --
    default_memory: int = 256 * _MIB  # request of a task that declares none and has no history
    memory_floor: int = 256 * _MIB  # below this much available memory: stop admitting, then act
    memory_pressure_limit: float | None = 20.0  # PSI memory "some avg10" %, None: not watched
    cpu_pressure_limit: float | None = None  # PSI cpu "some avg10" %, None: not watched
    hysteresis: float = 0.1  # fraction: margin before a held resource is admitted again
    starvation_after: float | None = 300.0  # a job waiting this long reserves what it needs
    pressure_action: str = "requeue"  # requeue | pause | none
    max_pressure_requeues: int = 3  # per job; past it the job fails instead
    learn_percentile: float = 95.0  # of recent peak RSS per task
    learn_margin: float = 1.2  # learned request = percentile x margin
    learn_window: int = 20  # recent finished runs per task that count
    job_cgroups: bool = True  # a cgroup per job where writable: exact peak, memory_limit
    gpu_may_appear: bool = False  # without NVML, GPU jobs wait instead of being rejected


@dataclass(frozen=True)
class TaskSettings:
    name: str
    function: str  # "package.module:function"
    cpus: float = 1.0
    memory: int | None = None  # None: learned from past runs, else scheduler.default_memory
    max_retries: int = 0
    timeout: float | None = None
    route: str | None = None  # extra submit path besides /api/v1/jobs
    # --- lifecycle (issue 4) ---
    retry_base: float | None = None  # None: [jobs] retry_base
    retry_cap: float | None = None  # None: [jobs] retry_cap
    retry_on_timeout: bool = False  # a timed-out attempt counts as a retryable failure
    retention: float | None = None  # None: [jobs] retention
    command: tuple[str, ...] | None = None  # a program to run instead of ``function``
    params: Mapping[str, str] = dataclasses.field(default_factory=dict)  # command params
    allow_leading_dash: tuple[str, ...] = ()  # command params whose value may start with "-"

    python: Path | None = None  # the task's own interpreter (a venv's bin/python); None: ours
    # -- resource-aware scheduling (docs/scheduling.md) --
    memory_limit: int | None = None  # the job is killed past this (kernel cgroup or sampling)
    max_concurrency: int | None = None  # at most this many of the task's jobs run at once
    exclusive: bool = False  # runs alone: nothing else starts while it runs
    gpus: int = 0  # GPUs the job gets to itself (CUDA_VISIBLE_DEVICES)
    gpu_memory: int | None = None  # free memory each of its GPUs needs; implies gpus >= 1


@dataclass(frozen=True)
class JobsSettings:
    """[jobs]: lifecycle defaults for every task."""

    retry_base: float = 1.0  # first retry delay; doubles per failure
    retry_cap: float = 300.0  # longest retry delay
    max_retries_limit: int = 10  # the most max_retries a submit may ask for
    max_log_size: int = 10 * _MIB  # per job, all attempts together
    retention: float = 7 * 86400.0  # finished jobs older than this are pruned
    prune_interval: float = 60.0
    idempotency_window: float = 86400.0  # how long an Idempotency-Key is remembered
    # How long a pruned job's id answers 410 Gone (then 404, like an id never issued).
    pruned_memory: float = 30 * 86400.0
    progress_interval: float = 1.0  # at most one stored progress update per job per interval


@dataclass(frozen=True)
class ScheduleSettings:
    """[schedules.NAME]: submit ``task`` with ``args`` at every ``cron`` slot."""

    name: str
    task: str
    cron: str
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    timezone: str = "UTC"
    catch_up: float = 3600.0  # missed slots younger than this fire once after a restart
    priority: int = 0


@dataclass(frozen=True)
class ClusterSettings:
    """[cluster]: this node among several ``jobserver serve`` processes sharing one
    PostgreSQL database (docs/cluster.md).  Only meaningful on PostgreSQL."""

    node: str = dataclasses.field(default_factory=socket.gethostname)  # this node's name
    url: str | None = None  # where other nodes (and operators) reach this node's API
    heartbeat_interval: float = 2.0  # seconds between this node's heartbeats
    # A node whose last heartbeat is older than this is declared dead by the leader (its
    # running jobs requeued); a node that could not heartbeat for most of it kills its
    # own jobs first.
    node_timeout: float = 30.0
    shared_jobs_dir: Path | None = None  # a jobs directory every node mounts, if any
    token: str | None = None  # for node-to-node calls (not used yet: see docs/cluster.md)
    # LISTEN for the other nodes' notifications (wake at once); off behind a pooler in
    # transaction mode, where LISTEN cannot work: polling alone, slower.
    listen: bool = True


@dataclass(frozen=True)
class Settings:
    path: Path  # the config file, absolute
    task_paths: tuple[Path, ...]  # directories put on sys.path to import task functions
    server: ServerSettings
    scheduler: SchedulerSettings
    tasks: Mapping[str, TaskSettings]  # read-only (MappingProxyType)
    jobs: JobsSettings = JobsSettings()
    schedules: Mapping[str, ScheduleSettings] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    # On PostgreSQL, this node's [cluster] settings (defaults without the table); None on
    # SQLite, where one server owns the file.
    cluster: ClusterSettings | None = None


def resolve_path(cli_value: str | None, *, beside: Path | None = None) -> Path:
    """The config file to read: ``--config``, else $JOBSERVER_CONFIG, else ./config.toml,
    else config.toml in ``beside`` (default: the single-file binary's directory, so a
    binary copied next to its config needs no option, whatever the working directory).
    When neither of the last two exists: ./config.toml, whose absence ``load`` reports."""
    chosen = cli_value or os.environ.get(ENV_VAR)
    if chosen:
        return Path(os.path.abspath(Path(chosen).expanduser()))
    here = Path(os.path.abspath(DEFAULT_CONFIG_NAME))
    if beside is None and getattr(sys, "frozen", False):
        beside = Path(sys.executable).parent
    if not here.is_file() and beside is not None and (beside / DEFAULT_CONFIG_NAME).is_file():
        return Path(os.path.abspath(beside / DEFAULT_CONFIG_NAME))
    return here


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file; raise ``ConfigError`` naming what is wrong and where."""
    file = Path(os.path.abspath(Path(path).expanduser()))
    not_found = (
        f"config file not found: {file}; pass --config PATH or set {ENV_VAR} "
        "(`jobserver init` writes a starter config.toml)"
    )
    details: dict[str, object] = {"file": str(file), "line": None, "key": None}
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(not_found, details) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read config file {file}: {reason}", details) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _syntax_error_line(str(exc), text)
        details["line"] = line
        raise ConfigError(f"{file}:{line}: invalid TOML: {exc}", details) from None

    source = _Source(file, _locate_keys(text))
    base = file.parent
    root = _Table(
        source,
        (),
        data,
        ("task_paths", "server", "scheduler", "tasks", "jobs", "schedules", "cluster"),
    )
    tasks = _tasks(source, data.get("tasks"), base)
    server = _server(_Table(source, ("server",), data.get("server"), _fields(ServerSettings)), base)
    cluster: ClusterSettings | None = _cluster(
        _Table(source, ("cluster",), data.get("cluster"), _fields(ClusterSettings)), base
    )
    if isinstance(server.database, Path):
        if "cluster" in data:
            raise source.error(
                ("cluster",),
                "[cluster] needs a database that several nodes share: set server.database "
                'to a PostgreSQL URL like "postgresql://user@host/dbname", or remove '
                "[cluster] (a SQLite file serves one node)",
            )
        cluster = None
    return Settings(
        path=file,
        task_paths=root.get("task_paths", _path_list(base), (base,)),
        server=server,
        scheduler=_scheduler(
            _Table(source, ("scheduler",), data.get("scheduler"), _fields(SchedulerSettings))
        ),
        tasks=tasks,
        jobs=_jobs(_Table(source, ("jobs",), data.get("jobs"), _fields(JobsSettings))),
        schedules=_schedules(source, data.get("schedules"), tasks),
        cluster=cluster,
    )


_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _cluster(table: _Table, base: Path) -> ClusterSettings:
    default = ClusterSettings()
    cluster = ClusterSettings(
        node=table.get("node", _node_name, default.node),
        url=table.get("url", _http_url, default.url),
        heartbeat_interval=table.get(
            "heartbeat_interval", _positive(parse_duration), default.heartbeat_interval
        ),
        node_timeout=table.get("node_timeout", _positive(parse_duration), default.node_timeout),
        shared_jobs_dir=table.get("shared_jobs_dir", _path(base), default.shared_jobs_dir),
        token=table.get("token", _token, default.token),
        listen=table.get("listen", _boolean, default.listen),
    )
    if not _NODE_NAME_RE.fullmatch(cluster.node):
        raise table.source.error(
            ("cluster", "node"),
            f"this machine's hostname {cluster.node!r} is not a node name: set cluster.node",
        )
    if cluster.node_timeout < 3 * cluster.heartbeat_interval:
        raise table.source.error(
            ("cluster", "node_timeout"),
            f"cluster.node_timeout = {cluster.node_timeout:g} s: must be at least 3 times "
            f"cluster.heartbeat_interval ({cluster.heartbeat_interval:g} s), so that a "
            "missed heartbeat or two never declares a live node dead",
        )
    return cluster


def _node_name(value: object, key: str) -> str:
    if not isinstance(value, str) or not _NODE_NAME_RE.fullmatch(value):
        raise ValueError(
            f"{key} = {_show(value)}: expected a node name of up to 64 letters, digits, "
            '".", "_" or "-" (set cluster.node when the hostname is not one)'
        )
    return value


def _http_url(value: object, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f'{key} = {_show(value)}: expected a URL like "http://10.0.0.5:8000"')
    return value.rstrip("/")


def _token(value: object, key: str) -> str:
    if not isinstance(value, str) or len(value) < 16 or value != value.strip():
        raise ValueError(
            f"{key}: expected a secret of at least 16 characters (the same on every node)"
        )
    return value


def _server(table: _Table, base: Path) -> ServerSettings:
    default = ServerSettings()
    return ServerSettings(
        host=table.get("host", _string, default.host),
        port=table.get("port", _integer(0, 65535), default.port),
        database=table.get("database", _database(base), _default_database(base, default)),
        jobs_dir=table.get("jobs_dir", _path(base), base / default.jobs_dir),
        max_body_size=table.get("max_body_size", _positive(parse_size), default.max_body_size),
        access_log=table.get("access_log", _boolean, default.access_log),
        log_level=table.get("log_level", _choice(LOG_LEVELS), default.log_level),
        durability=table.get("durability", _choice(DURABILITY), default.durability),
        shutdown_grace=table.get("shutdown_grace", parse_duration, default.shutdown_grace),
        wal_max_size=table.get("wal_max_size", _positive(parse_size), default.wal_max_size),
        tokens_file=table.get("tokens_file", _path(base), base / default.tokens_file),
        allow_anonymous=table.get("allow_anonymous", _boolean, default.allow_anonymous),
        rate_limit=table.get("rate_limit", _number(0, above=True), default.rate_limit),
        rate_burst=table.get("rate_burst", _integer(1), default.rate_burst),
        max_queued=table.get("max_queued", _integer(1), default.max_queued),
        max_json_depth=table.get("max_json_depth", _integer(1), default.max_json_depth),
        max_string_length=table.get("max_string_length", _integer(1), default.max_string_length),
        max_array_length=table.get("max_array_length", _integer(1), default.max_array_length),
        max_args_size=table.get("max_args_size", _positive(parse_size), default.max_args_size),
        max_result_size=table.get(
            "max_result_size", _positive(parse_size), default.max_result_size
        ),
        env_allow=table.get("env_allow", _string_list, default.env_allow),
        run_as=table.get("run_as", _string, default.run_as),
        rlimit_nofile=table.get("rlimit_nofile", _integer(0), default.rlimit_nofile),
        rlimit_nproc=table.get("rlimit_nproc", _integer(0), default.rlimit_nproc),
        rlimit_core=table.get("rlimit_core", parse_size, default.rlimit_core),
        log_format=table.get("log_format", _choice(LOG_FORMATS), default.log_format),
        fork_server=table.get("fork_server", _boolean, default.fork_server),
    )


def _scheduler(table: _Table, default: SchedulerSettings | None = None) -> SchedulerSettings:
    default = default or SchedulerSettings()
    return SchedulerSettings(
        poll_interval=table.get("poll_interval", _positive(parse_duration), default.poll_interval),
        max_jobs=table.get("max_jobs", _integer(1), default.max_jobs),
        max_cpus=table.get("max_cpus", _number(0, above=True), default.max_cpus),
        max_memory=table.get("max_memory", _positive(parse_size), default.max_memory),
        reserve_cpus=table.get("reserve_cpus", _number(0), default.reserve_cpus),
        reserve_memory=table.get("reserve_memory", parse_size, default.reserve_memory),
        kill_grace=table.get("kill_grace", parse_duration, default.kill_grace),
        max_rescues=table.get("max_rescues", _integer(0), default.max_rescues),
        **_scheduling(table, default),
    )


def _scheduling(table: _Table, default: SchedulerSettings) -> dict[str, Any]:
    """The resource-aware scheduling keys of [scheduler]."""
    percent = _between(0.0, 100.0)
    return {
        "default_memory": table.get(
            "default_memory", _positive(parse_size), default.default_memory
        ),
        "memory_floor": table.get("memory_floor", parse_size, default.memory_floor),
        "memory_pressure_limit": table.get(
            "memory_pressure_limit", _or_off(percent), default.memory_pressure_limit
        ),
        "cpu_pressure_limit": table.get(
            "cpu_pressure_limit", _or_off(percent), default.cpu_pressure_limit
        ),
        "hysteresis": table.get("hysteresis", _between(0.0, 1.0), default.hysteresis),
        "starvation_after": table.get(
            "starvation_after", _or_off(_positive(parse_duration)), default.starvation_after
        ),
        "pressure_action": table.get(
            "pressure_action", _choice(PRESSURE_ACTIONS), default.pressure_action
        ),
        "max_pressure_requeues": table.get(
            "max_pressure_requeues", _integer(0), default.max_pressure_requeues
        ),
        "learn_percentile": table.get(
            "learn_percentile", _between(1.0, 100.0), default.learn_percentile
        ),
        "learn_margin": table.get("learn_margin", _between(1.0, 10.0), default.learn_margin),
        "learn_window": table.get("learn_window", _integer(1, 10_000), default.learn_window),
        "job_cgroups": table.get("job_cgroups", _boolean, default.job_cgroups),
        "gpu_may_appear": table.get("gpu_may_appear", _boolean, default.gpu_may_appear),
    }


def _task_limits(table: _Table, default: TaskSettings) -> dict[str, Any]:
    """The resource-aware scheduling keys of [tasks.NAME]."""
    return {
        "memory_limit": table.get("memory_limit", _positive(parse_size), default.memory_limit),
        "max_concurrency": table.get("max_concurrency", _integer(1), default.max_concurrency),
        "exclusive": table.get("exclusive", _boolean, default.exclusive),
        "gpus": table.get("gpus", _integer(0, 64), default.gpus),
        "gpu_memory": table.get("gpu_memory", _positive(parse_size), default.gpu_memory),
    }


def _tasks(source: _Source, value: object, base: Path) -> Mapping[str, TaskSettings]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise source.error(("tasks",), f"tasks = {_show(value)}: expected tables [tasks.NAME]")
    tasks: dict[str, TaskSettings] = {}
    routes: dict[str, str] = {}
    for name, raw in value.items():
        key = ("tasks", name)
        if not _TASK_NAME_RE.fullmatch(name):
            raise source.error(
                key,
                f"{_dotted(key)}: a task name must start with a letter or _ and contain only "
                "letters, digits, _, . and -",
            )
        table = _Table(source, key, raw, [f for f in _fields(TaskSettings) if f != "name"])
        default = TaskSettings(name=name, function="")
        command = table.get("command", _command, None)
        if command is None:
            function = table.require("function", _function, 'function = "package.module:function"')
        elif "function" in table.data:
            raise source.error(
                (*key, "command"),
                f"{_dotted(key)}: set either function or command, not both",
            )
        else:
            function = ""
        task = TaskSettings(
            name=name,
            function=function,
            cpus=table.get("cpus", _number(0, above=True), default.cpus),
            memory=table.get("memory", _positive(parse_size), default.memory),
            max_retries=table.get("max_retries", _integer(0), default.max_retries),
            timeout=table.get("timeout", _job_timeout, default.timeout),
            route=table.get("route", _route, default.route),
            retry_base=table.get("retry_base", _positive(parse_duration), None),
            retry_cap=table.get("retry_cap", _positive(parse_duration), None),
            retry_on_timeout=table.get("retry_on_timeout", _boolean, False),
            retention=table.get("retention", _positive(parse_duration), None),
            command=command,
            params=MappingProxyType(table.get("params", _command_params, {})),
            allow_leading_dash=tuple(table.get("allow_leading_dash", _name_list, [])),
            python=table.get("python", _path(base), default.python),
            **_task_limits(table, default),
        )
        _check_command(source, key, task)
        if task.route is not None:
            if task.route in routes:
                raise source.error(
                    (*key, "route"),
                    f"{_dotted((*key, 'route'))} = {_show(task.route)}: already used by "
                    f"{_dotted(('tasks', routes[task.route]))}; each route must be unique",
                )
            routes[task.route] = name
        tasks[name] = task
    return MappingProxyType(tasks)


def _jobs(table: _Table) -> JobsSettings:
    default = JobsSettings()
    return JobsSettings(
        retry_base=table.get("retry_base", _positive(parse_duration), default.retry_base),
        retry_cap=table.get("retry_cap", _positive(parse_duration), default.retry_cap),
        max_retries_limit=table.get(
            "max_retries_limit", _integer(0, 1000), default.max_retries_limit
        ),
        max_log_size=table.get("max_log_size", _positive(parse_size), default.max_log_size),
        retention=table.get("retention", _positive(parse_duration), default.retention),
        prune_interval=table.get(
            "prune_interval", _positive(parse_duration), default.prune_interval
        ),
        idempotency_window=table.get(
            "idempotency_window", _positive(parse_duration), default.idempotency_window
        ),
        pruned_memory=table.get("pruned_memory", _positive(parse_duration), default.pruned_memory),
        progress_interval=table.get("progress_interval", parse_duration, default.progress_interval),
    )


def _check_command(source: _Source, key: tuple[str, ...], task: TaskSettings) -> None:
    """A command's placeholders and params must match one to one."""
    if task.command is None:
        if task.params or task.allow_leading_dash:
            raise source.error(
                (*key, "params"),
                f"{_dotted(key)}: params and allow_leading_dash apply to command tasks only",
            )
        return
    used = {name for part in task.command for name in _PLACEHOLDER_RE.findall(part)}
    for name in sorted(used - set(task.params)):
        raise source.error(
            (*key, "command"),
            f"{_dotted((*key, 'command'))}: placeholder {{{name}}} has no type in "
            f'{_dotted((*key, "params"))}; add {name} = "str" (or int, float, bool)',
        )
    for name in sorted(set(task.params) - used):
        raise source.error(
            (*key, "params"),
            f"{_dotted((*key, 'params', name))}: no {{{name}}} placeholder in command",
        )
    for name in task.allow_leading_dash:
        if name not in task.params:
            raise source.error(
                (*key, "allow_leading_dash"),
                f"{_dotted((*key, 'allow_leading_dash'))}: {name!r} is not a param",
            )


def _schedules(
    source: _Source, value: object, tasks: Mapping[str, TaskSettings]
) -> Mapping[str, ScheduleSettings]:
    # Lazy: only a config with schedules needs the cron library and the zone database.
    import zoneinfo

    from croniter import croniter

    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise source.error(
            ("schedules",), f"schedules = {_show(value)}: expected tables [schedules.NAME]"
        )
    schedules: dict[str, ScheduleSettings] = {}
    for name, raw in value.items():
        key = ("schedules", name)
        if not _TASK_NAME_RE.fullmatch(name):
            raise source.error(
                key,
                f"{_dotted(key)}: a schedule name must start with a letter or _ and contain "
                "only letters, digits, _, . and -",
            )
        table = _Table(source, key, raw, [f for f in _fields(ScheduleSettings) if f != "name"])
        task = table.require("task", _string, 'task = "NAME of a [tasks.NAME] table"')
        if task not in tasks:
            raise source.error(
                (*key, "task"),
                f"{_dotted((*key, 'task'))} = {_show(task)}: no [tasks.{task}] table; "
                f"known tasks: {', '.join(sorted(tasks)) or 'none'}",
            )
        cron = table.require("cron", _string, 'cron = "0 3 * * *"')
        if len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise source.error(
                (*key, "cron"),
                f"{_dotted((*key, 'cron'))} = {_show(cron)}: expected a 5-field cron "
                'expression like "0 3 * * *" (minute hour day month weekday)',
            )
        zone = table.get("timezone", _string, "UTC")
        try:
            zoneinfo.ZoneInfo(zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise source.error(
                (*key, "timezone"),
                f"{_dotted((*key, 'timezone'))} = {_show(zone)}: unknown time zone; use an "
                'IANA name like "Europe/Paris" or "UTC"',
            ) from None
        args: dict[str, Any] = table.get("args", _args_table, {})
        schedules[name] = ScheduleSettings(
            name=name,
            task=task,
            cron=cron,
            args=MappingProxyType(args),
            timezone=zone,
            catch_up=table.get("catch_up", parse_duration, 3600.0),
            priority=table.get("priority", _integer(-1000, 1000), 0),
        )
    return MappingProxyType(schedules)


# --- changes at run time (PATCH /api/v1/system, SIGHUP) -------------------------------

# Per-task keys that may change while the server runs; the others (function, route)
# shape the HTTP routes and imports, so they need a restart.
RUNTIME_TASK_KEYS = (
    "cpus",
    "memory",
    "memory_limit",
    "max_concurrency",
    "exclusive",
    "timeout",
    "max_retries",
    "gpus",
    "gpu_memory",
)
# Keys whose "absent" value (None) a JSON change may ask for with null.
_NULLABLE = frozenset(
    {
        "max_cpus",
        "max_memory",
        "memory_pressure_limit",
        "cpu_pressure_limit",
        "starvation_after",
        "memory",
        "memory_limit",
        "max_concurrency",
        "timeout",
        "gpu_memory",
    }
)


def apply_changes(settings: Settings, changes: object, origin: str) -> Settings:
    """``settings`` with ``changes`` applied: ``{"scheduler": {key: value},
    "tasks": {NAME: {key: value}}}``, values written as in config.toml (``null`` for
    "absent" where a key allows it).  Validated exactly like the file; a ``ConfigError``
    names the key and ``origin`` (e.g. "PATCH /api/v1/system").  Nothing is half-applied:
    the result is a new object, or an error."""
    source = _Source(Path(origin), {})
    if not isinstance(changes, dict):
        raise ConfigError(
            f'{origin}: expected an object like {{"scheduler": {{"max_jobs": 4}}, '
            f'"tasks": {{"NAME": {{"memory": "1GiB"}}}}}}, got {_show(changes)}',
            {"file": origin, "line": None, "key": None},
        )
    root = _Table(source, (), changes, ("scheduler", "tasks"))
    scheduler = settings.scheduler
    if "scheduler" in root.data:
        table = _nullable_table(source, ("scheduler",), root.data["scheduler"], SchedulerSettings)
        scheduler = _scheduler(table, settings.scheduler)
        for name in table.nulls:
            nulled: dict[str, Any] = {name: None}
            scheduler = dataclasses.replace(scheduler, **nulled)
    tasks = dict(settings.tasks)
    raw_tasks = root.data.get("tasks", {})
    if not isinstance(raw_tasks, dict):
        raise source.error(("tasks",), f"tasks = {_show(raw_tasks)}: expected an object")
    for name, raw in raw_tasks.items():
        if name not in tasks:
            known = ", ".join(sorted(tasks)) or "none"
            raise source.error(
                ("tasks", name),
                f"no task named {name!r} (tasks: {known}); new tasks need config.toml and a "
                "restart",
            )
        key = ("tasks", name)
        table = _nullable_table(source, key, raw, None)
        current = tasks[name]
        task = dataclasses.replace(
            current,
            cpus=table.get("cpus", _number(0, above=True), current.cpus),
            memory=table.get("memory", _positive(parse_size), current.memory),
            max_retries=table.get("max_retries", _integer(0), current.max_retries),
            timeout=table.get("timeout", _job_timeout, current.timeout),
            **_task_limits(table, current),
        )
        for field in table.nulls:
            cleared: dict[str, Any] = {field: None}
            task = dataclasses.replace(task, **cleared)
        tasks[name] = task
    return dataclasses.replace(settings, scheduler=scheduler, tasks=MappingProxyType(tasks))


class _NullableTable:
    """A ``_Table`` of changes: null values are set aside in ``nulls`` where allowed."""

    def __init__(self, table: _Table, nulls: list[str]) -> None:
        self.table = table
        self.nulls = nulls

    def get(self, name: str, parse: Parser[T], default: T) -> T:
        return self.table.get(name, parse, default)


def _nullable_table(
    source: _Source, key: tuple[str, ...], value: object, cls: type[Any] | None
) -> Any:
    fields = _fields(cls) if cls is not None else list(RUNTIME_TASK_KEYS)
    if isinstance(value, dict):
        nulls = [name for name, item in value.items() if item is None and name in fields]
        for name in nulls:
            if name in fields and name not in _NULLABLE:
                raise source.error(
                    (*key, name), f"{_dotted((*key, name))} = null: this key needs a value"
                )
        value = {name: item for name, item in value.items() if name not in nulls}
    else:
        nulls = []
    table = _Table(source, key, value, fields)
    return _NullableTable(table, nulls)


def error_at(origin: str | os.PathLike[str], key: str, message: str) -> ConfigError:
    """A ``ConfigError`` about the dotted ``key`` (``"scheduler.memory_floor"``) of the
    config file ``origin``, at its line (best effort), or of a change from ``origin``
    (``"PATCH /api/v1/system"``, no file to read)."""
    path = Path(origin)
    try:
        lines = _locate_keys(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        lines = {}
    return _Source(path, lines).error(_split_key(key), message)


# --- reading one table ---------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """The file being loaded and the line where each dotted key first appears."""

    file: Path
    lines: Mapping[tuple[str, ...], int]

    def error(self, key: tuple[str, ...], message: str) -> ConfigError:
        # A key with no line of its own (a missing key, a value in an inline table) is
        # reported at its nearest enclosing key or table header.
        line = next(
            (self.lines[key[:n]] for n in range(len(key), 0, -1) if key[:n] in self.lines), None
        )
        where = f"{self.file}:{line}" if line is not None else str(self.file)
        details = {"file": str(self.file), "line": line, "key": _dotted(key)}
        return ConfigError(f"{where}: {message}", details)


class _Table:
    """One TOML table: unknown keys are rejected up front, then values are read by name."""

    def __init__(
        self, source: _Source, key: tuple[str, ...], value: object, fields: Iterable[str]
    ) -> None:
        if value is None:  # TOML has no null: the table is absent
            value = {}
        if not isinstance(value, dict):
            raise source.error(key, f"{_dotted(key)} = {_show(value)}: expected a table")
        valid = list(fields)
        for name in value:
            if name not in valid:
                unknown = _dotted((*key, name))
                close = difflib.get_close_matches(name, valid, n=1)
                hint = (
                    f"did you mean {_dotted((*key, close[0]))}?"
                    if close
                    else f"valid keys here: {', '.join(valid)}"
                )
                raise source.error((*key, name), f"unknown key {unknown}; {hint}")
        self.source = source
        self.key = key
        self.data: dict[str, object] = value

    def get(self, name: str, parse: Parser[T], default: T) -> T:
        if name not in self.data:
            return default
        return self._parse(name, parse)

    def require(self, name: str, parse: Parser[T], example: str) -> T:
        if name not in self.data:
            where = f"[{_dotted(self.key)}]"
            raise self.source.error(
                (*self.key, name), f"{where} is missing the required key {name!r} ({example})"
            )
        return self._parse(name, parse)

    def _parse(self, name: str, parse: Parser[T]) -> T:
        key = (*self.key, name)
        try:
            return parse(self.data[name], _dotted(key))
        except ValueError as exc:
            raise self.source.error(key, str(exc)) from None


# --- value parsers: (value, dotted key) -> value, raising ValueError ---------------------


def _string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{key} = {_show(value)}: expected a string")
    return value


def _string_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'{key} = {_show(value)}: expected a list of strings like ["PATH"]')
    return tuple(value)


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {_show(value)}: expected true or false")
    return value


def _integer(minimum: int, maximum: int | None = None) -> Parser[int]:
    wanted = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
    ceiling = MAX_STORED_INT if maximum is None else maximum

    def parse(value: object, key: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or value > ceiling
        ):
            raise ValueError(f"{key} = {_show(value)}: expected an integer {wanted}")
        return value

    return parse


def _number(minimum: float, *, above: bool = False) -> Parser[float]:
    wanted = f"> {minimum}" if above else f">= {minimum}"

    def parse(value: object, key: str) -> float:
        number = math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _to_float(value)
        if not (math.isfinite(number) and (number > minimum if above else number >= minimum)):
            raise ValueError(f"{key} = {_show(value)}: expected a number {wanted}")
        return number

    return parse


def _between(minimum: float, maximum: float) -> Parser[float]:
    def parse(value: object, key: str) -> float:
        number = math.nan
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _to_float(value)
        if not minimum <= number <= maximum:
            raise ValueError(
                f"{key} = {_show(value)}: expected a number from {minimum:g} to {maximum:g}"
            )
        return number

    return parse


def _or_off(parse: Parser[T]) -> Parser[T | None]:
    """A value, or the string "off" (TOML has no null) for a check that is switched off."""

    def parse_or_off(value: object, key: str) -> T | None:
        if value == "off":
            return None
        try:
            return parse(value, key)
        except ValueError as exc:
            raise ValueError(f'{exc} (or "off")') from None

    return parse_or_off


def _job_timeout(value: object, key: str) -> float:
    seconds = _positive(parse_duration)(value, key)
    if seconds > MAX_TIMEOUT:
        raise ValueError(f"{key} = {_show(value)}: at most 366 days ({MAX_TIMEOUT:g} s)")
    return seconds


def _positive(parse: Parser[_N]) -> Parser[_N]:
    """A duration or size that must be greater than zero."""

    def positive(value: object, key: str) -> _N:
        result = parse(value, key)
        if result <= 0:
            raise ValueError(f"{key} = {_show(value)}: must be greater than 0")
        return result

    return positive


def _choice(options: tuple[str, ...]) -> Parser[str]:
    def parse(value: object, key: str) -> str:
        if value not in options:
            raise ValueError(f"{key} = {_show(value)}: expected one of {', '.join(options)}")
        return str(value)

    return parse


def _path(base: Path) -> Parser[Path]:
    def parse(value: object, key: str) -> Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{key} = {_show(value)}: expected a path (relative to {base})")
        return Path(os.path.normpath(base / Path(value).expanduser()))

    return parse


def _default_database(base: Path, default: ServerSettings) -> Path | str:
    return base / default.database if isinstance(default.database, Path) else default.database


POSTGRESQL_SCHEMES = ("postgresql://", "postgres://", "postgresql+psycopg://")


def _database(base: Path) -> Parser[Path | str]:
    """A SQLite file's path, or a PostgreSQL URL (kept as written)."""
    path = _path(base)

    def parse(value: object, key: str) -> Path | str:
        if isinstance(value, str) and value.startswith(POSTGRESQL_SCHEMES):
            return value
        if isinstance(value, str) and "://" in value:
            raise ValueError(
                f"{key} = {_show(value)}: expected a SQLite file path or a PostgreSQL URL "
                'like "postgresql://user@host/dbname"'
            )
        return path(value, key)

    return parse


def _path_list(base: Path) -> Parser[tuple[Path, ...]]:
    def parse(value: object, key: str) -> tuple[Path, ...]:
        if not isinstance(value, list):
            raise ValueError(f'{key} = {_show(value)}: expected a list of directories like ["."]')
        return tuple(_path(base)(item, key) for item in value)

    return parse


def _function(value: object, key: str) -> str:
    module, colon, attribute = value.partition(":") if isinstance(value, str) else ("", "", "")
    if not (
        colon
        and all(part.isidentifier() for part in module.split("."))
        and all(part.isidentifier() for part in attribute.split("."))
    ):
        raise ValueError(f'{key} = {_show(value)}: expected "package.module:function"')
    return str(value)


def _command(value: object, key: str) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(part, str) and part for part in value)
    ):
        raise ValueError(
            f"{key} = {_show(value)}: expected a list of non-empty strings like "
            '["convert", "{src}", "-resize", "{size}", "{dst}"] (no shell is used)'
        )
    for part in value:
        leftover = _PLACEHOLDER_RE.sub("", part)
        if "{" in leftover or "}" in leftover:
            raise ValueError(f"{key}: {_show(part)} has a brace that is not a {{name}} placeholder")
    return tuple(value)


def _command_params(value: object, key: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f'{key} = {_show(value)}: expected a table like {{ src = "str" }}')
    for name, kind in value.items():
        if not _PLACEHOLDER_RE.fullmatch("{" + name + "}"):
            raise ValueError(f"{key}.{name}: a param name must be an identifier")
        if kind not in COMMAND_PARAM_TYPES:
            raise ValueError(
                f"{key}.{name} = {_show(kind)}: expected one of {', '.join(COMMAND_PARAM_TYPES)}"
            )
    return {str(name): str(kind) for name, kind in value.items()}


def _name_list(value: object, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f'{key} = {_show(value)}: expected a list of names like ["offset"]')
    return list(value)


def _args_table(value: object, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{key} = {_show(value)}: expected a table of task arguments")
    try:
        # TOML dates have no JSON form: the args must be what a client could submit.
        return dict(json.loads(json.dumps(value, allow_nan=False)))
    except (TypeError, ValueError):
        raise ValueError(
            f"{key}: arguments must be JSON values (no TOML dates or times, no nan/inf)"
        ) from None


def _route(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/") or re.search(r"[\s{}?#]", value):
        raise ValueError(
            f'{key} = {_show(value)}: expected a path like "/api/v1/start-analysis" '
            "(starting with /, no spaces, braces, ? or #)"
        )
    for reserved in RESERVED_ROUTES:
        if value == reserved or value.startswith(reserved + "/"):
            raise ValueError(
                f"{key} = {_show(value)}: {reserved} is reserved for jobserver's own API; "
                "choose another path"
            )
    return value


# --- small helpers ---------------------------------------------------------------------


def _fields(cls: type[Any]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _to_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _show(value: object) -> str:
    """A value as it would appear in TOML, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_show(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{...}"
    return str(value)


_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(key: tuple[str, ...]) -> str:
    return ".".join(part if _BARE_KEY_RE.fullmatch(part) else json.dumps(part) for part in key)


# Best-effort line finding: tomllib reports no positions for keys, so scan the text for
# table headers and `key =` lines.  Keys inside multi-line strings may confuse it; then a
# line number is merely missing or early, never fatal.
_KEY_PART = r"""[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
_DOTTED_KEY = rf"(?:{_KEY_PART})(?:\s*\.\s*(?:{_KEY_PART}))*"
_HEADER_RE = re.compile(rf"\s*\[\[?\s*({_DOTTED_KEY})\s*\]\]?\s*(?:#.*)?")
_ASSIGN_RE = re.compile(rf"\s*({_DOTTED_KEY})\s*=")


def _locate_keys(text: str) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), start=1):
        if header := _HEADER_RE.fullmatch(line):
            table = _split_key(header.group(1))
            lines.setdefault(table, number)
        elif assign := _ASSIGN_RE.match(line):
            key = table + _split_key(assign.group(1))
            for n in range(len(table) + 1, len(key) + 1):  # a.b = 1 also defines table a
                lines.setdefault(key[:n], number)
    return lines


def _split_key(dotted: str) -> tuple[str, ...]:
    return tuple(_unquote(part) for part in re.findall(_KEY_PART, dotted))


def _unquote(part: str) -> str:
    if part.startswith("'"):
        return part[1:-1]
    if part.startswith('"'):
        try:
            return str(tomllib.loads(f"k = {part}")["k"])
        except tomllib.TOMLDecodeError:
            return part[1:-1]
    return part


def _syntax_error_line(message: str, text: str) -> int:
    if match := re.search(r"at line (\d+)", message):
        return int(match.group(1))
    return max(1, len(text.splitlines()))  # "at end of document"
