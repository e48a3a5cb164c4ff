"""Settings: config.toml read with ``tomllib`` into frozen dataclasses, one per table.

    Settings                  the whole file: path, task_paths, and the tables below
    ├── ServerSettings        [server]: listen address, database and job files, logging
    ├── SchedulerSettings     [scheduler]: polling, concurrency and resource caps, kill grace
    └── TaskSettings          [tasks.NAME]: one registered task (import path, resources, route)

Every key has a default except ``tasks.NAME.function``.  Unknown keys and bad values are
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
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from jobserver.errors import ConfigError

DEFAULT_CONFIG_NAME = "config.toml"
ENV_VAR = "JOBSERVER_CONFIG"

_MIB = 1024**2
T = TypeVar("T")
_N = TypeVar("_N", int, float)
Parser = Callable[[object, str], T]


# --- durations and sizes -------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
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
LOG_FORMATS = ("text", "json")
# Paths the API serves itself; a task's extra route may not shadow them.
RESERVED_ROUTES = (
    "/api/v1/jobs",
    "/api/v1/tasks",
    "/api/v1/system",
    "/api/v1/task-status",
    "/healthz",
    "/",  # the web page
    "/static",  # the web page's files
    "/metrics",
    "/api/v1/stats",
)
_TASK_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    database: Path = Path("data/jobserver.db")
    jobs_dir: Path = Path("data/jobs")  # per-job log and result files
    max_body_size: int = 1 * _MIB
    access_log: bool = True
    log_level: str = "info"
    log_format: str = "text"  # "text" (human-readable lines) or "json" (one object per line)


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


@dataclass(frozen=True)
class TaskSettings:
    name: str
    function: str  # "package.module:function"
    cpus: float = 1.0
    memory: int = 256 * _MIB
    max_retries: int = 0
    timeout: float | None = None
    route: str | None = None  # extra submit path besides /api/v1/jobs


@dataclass(frozen=True)
class Settings:
    path: Path  # the config file, absolute
    task_paths: tuple[Path, ...]  # directories put on sys.path to import task functions
    server: ServerSettings
    scheduler: SchedulerSettings
    tasks: Mapping[str, TaskSettings]  # read-only (MappingProxyType)


def resolve_path(cli_value: str | None) -> Path:
    """The config file to read: ``--config``, else $JOBSERVER_CONFIG, else ./config.toml."""
    chosen = cli_value or os.environ.get(ENV_VAR) or DEFAULT_CONFIG_NAME
    return Path(os.path.abspath(Path(chosen).expanduser()))


def load(path: str | os.PathLike[str]) -> Settings:
    """Read and validate a config file; raise ``ConfigError`` naming what is wrong and where."""
    file = Path(os.path.abspath(Path(path).expanduser()))
    not_found = f"config file not found: {file}; pass --config PATH or set {ENV_VAR}"
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
    root = _Table(source, (), data, ("task_paths", "server", "scheduler", "tasks"))
    return Settings(
        path=file,
        task_paths=root.get("task_paths", _path_list(base), (base,)),
        server=_server(
            _Table(source, ("server",), data.get("server"), _fields(ServerSettings)), base
        ),
        scheduler=_scheduler(
            _Table(source, ("scheduler",), data.get("scheduler"), _fields(SchedulerSettings))
        ),
        tasks=_tasks(source, data.get("tasks")),
    )


def _server(table: _Table, base: Path) -> ServerSettings:
    default = ServerSettings()
    return ServerSettings(
        host=table.get("host", _string, default.host),
        port=table.get("port", _integer(0, 65535), default.port),
        database=table.get("database", _path(base), base / default.database),
        jobs_dir=table.get("jobs_dir", _path(base), base / default.jobs_dir),
        max_body_size=table.get("max_body_size", _positive(parse_size), default.max_body_size),
        access_log=table.get("access_log", _boolean, default.access_log),
        log_level=table.get("log_level", _choice(LOG_LEVELS), default.log_level),
        log_format=table.get("log_format", _choice(LOG_FORMATS), default.log_format),
    )


def _scheduler(table: _Table) -> SchedulerSettings:
    default = SchedulerSettings()
    return SchedulerSettings(
        poll_interval=table.get("poll_interval", _positive(parse_duration), default.poll_interval),
        max_jobs=table.get("max_jobs", _integer(1), default.max_jobs),
        max_cpus=table.get("max_cpus", _number(0, above=True), default.max_cpus),
        max_memory=table.get("max_memory", _positive(parse_size), default.max_memory),
        reserve_cpus=table.get("reserve_cpus", _number(0), default.reserve_cpus),
        reserve_memory=table.get("reserve_memory", parse_size, default.reserve_memory),
        kill_grace=table.get("kill_grace", parse_duration, default.kill_grace),
        max_rescues=table.get("max_rescues", _integer(0), default.max_rescues),
    )


def _tasks(source: _Source, value: object) -> Mapping[str, TaskSettings]:
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
        task = TaskSettings(
            name=name,
            function=table.require("function", _function, 'function = "package.module:function"'),
            cpus=table.get("cpus", _number(0, above=True), default.cpus),
            memory=table.get("memory", _positive(parse_size), default.memory),
            max_retries=table.get("max_retries", _integer(0), default.max_retries),
            timeout=table.get("timeout", _positive(parse_duration), default.timeout),
            route=table.get("route", _route, default.route),
        )
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


def _boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} = {_show(value)}: expected true or false")
    return value


def _integer(minimum: int, maximum: int | None = None) -> Parser[int]:
    wanted = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"

    def parse(value: object, key: str) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < minimum
            or (maximum is not None and value > maximum)
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
