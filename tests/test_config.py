from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from jobserver.config import (
    ClusterSettings,
    JobsSettings,
    SchedulerSettings,
    ServerSettings,
    Settings,
    TaskSettings,
    format_size,
    load,
    parse_duration,
    parse_size,
    resolve_path,
)
from jobserver.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "config.toml"
MiB = 1024**2


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    return info.value


TASK = '[tasks.t]\nfunction = "pkg.mod:fn"\n'


# --- durations and sizes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (10, 10.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1.5h", 5400.0),
        ("2m30s500ms", 150.5),
        ("45", 45.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", [True, False, -1, -0.5, "-5s", "", "abc", "5x", "h", "1h30", "1e3", None, [1]]
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^scheduler\.kill_grace = "):
        parse_duration(value, "scheduler.kill_grace")


def test_parse_duration_rejects_more_than_a_hundred_years() -> None:
    assert parse_duration("36500d") == 36500 * 86400.0
    with pytest.raises(ValueError, match=r"at most 100 years"):
        parse_duration("36501d", "jobs.retention")
    with pytest.raises(ValueError, match=r"at most 100 years"):
        parse_duration(1e300, "jobs.retention")


def test_parse_duration_rejects_non_finite() -> None:
    with pytest.raises(ValueError):
        parse_duration(float("inf"))
    with pytest.raises(ValueError):
        parse_duration(float("nan"))


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("1024", 1024),
        ("1KB", 1000),
        ("1kb", 1000),
        ("64KiB", 64 * 1024),
        ("512MiB", 512 * MiB),
        ("512 MiB", 512 * MiB),
        ("512mib", 512 * MiB),
        ("2GiB", 2 * 1024**3),
        ("1.5GiB", 1536 * MiB),
        ("100MB", 100_000_000),
        ("3GB", 3_000_000_000),
        ("1TiB", 1024**4),
        ("1TB", 10**12),
        ("7B", 7),
        (4096.0, 4096),
    ],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    "value", [True, -1, "-1MiB", "", "lots", "5 XB", "1.5B", "1.5", "MiB", 1.5, None, {}]
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError, match=r"^task\.memory = "):
        parse_size(value, "task.memory")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (512 * MiB, "512.0 MiB"),
        (2 * 1024**3, "2.0 GiB"),
        (MiB - 1, "1.0 MiB"),
        (3 * 1024**4, "3.0 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text


# --- loading ---------------------------------------------------------------------------


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    settings = load(write(tmp_path, ""))
    assert settings.path == tmp_path / "config.toml"
    assert settings.task_paths == (tmp_path,)
    assert settings.server == dataclasses.replace(
        ServerSettings(),
        database=tmp_path / "data" / "jobserver.db",
        jobs_dir=tmp_path / "data" / "jobs",
        tokens_file=tmp_path / "tokens.json",
    )
    assert settings.scheduler == SchedulerSettings()
    assert dict(settings.tasks) == {}


def test_empty_tables_give_defaults(tmp_path: Path) -> None:
    settings = load(write(tmp_path, "[server]\n[scheduler]\n[tasks]\n"))
    assert settings.server.port == 8000
    assert settings.scheduler == SchedulerSettings()
    assert dict(settings.tasks) == {}


def test_defaults() -> None:
    assert ServerSettings().max_body_size == MiB
    assert SchedulerSettings().reserve_memory == 512 * MiB
    # A task without a memory request is scheduled with what its runs used (learned), or
    # scheduler.default_memory before it has any history.
    assert TaskSettings(name="t", function="m:f").memory is None
    assert SchedulerSettings().default_memory == 256 * MiB


def test_shipped_config_loads() -> None:
    settings = load(SHIPPED)
    assert settings.server.host == "127.0.0.1"
    assert settings.server.port == 8000
    assert settings.task_paths == (SHIPPED.parent,)
    task = settings.tasks["run_long_analysis"]
    assert task.function == "jobserver.demo:run_long_analysis"
    assert task.route == "/api/v1/start-analysis"
    assert task.cpus == 0.1
    assert task.memory == 64 * MiB
    assert task.max_retries == 0
    assert task.timeout is None


def test_shipped_config_shows_every_key() -> None:
    text = SHIPPED.read_text(encoding="utf-8")
    for cls in (
        Settings,
        ServerSettings,
        SchedulerSettings,
        TaskSettings,
        JobsSettings,
        ClusterSettings,
    ):
        for field in dataclasses.fields(cls):
            if field.name in {"path", "server", "scheduler", "tasks", "name", "cluster"}:
                continue
            assert re.search(rf"^[# ]*{field.name}\b", text, re.MULTILINE), field.name


def test_shipped_config_commented_defaults_are_the_defaults(tmp_path: Path) -> None:
    # Uncommenting the `# key = value` lines of [server] and [scheduler] changes nothing
    # (max_cpus/max_memory show examples: their default is "absent").
    text = SHIPPED.read_text(encoding="utf-8").split("[tasks.")[0]
    text = re.sub(r"^# (?!max_cpus|max_memory)(\w+ = .*)$", r"\1", text, flags=re.MULTILINE)
    settings = load(write(tmp_path, text))
    assert settings.scheduler == SchedulerSettings()
    assert settings.server == dataclasses.replace(
        ServerSettings(),
        database=tmp_path / "data" / "jobserver.db",
        jobs_dir=tmp_path / "data" / "jobs",
        tokens_file=tmp_path / "tokens.json",
    )


def test_full_config(tmp_path: Path) -> None:
    settings = load(
        write(
            tmp_path,
            """
task_paths = [".", "lib", "/opt/tasks"]

[server]
host = "0.0.0.0"
port = 9000
database = "/var/lib/jobserver/jobs.db"
jobs_dir = "../jobs"
max_body_size = "10MiB"
access_log = false
log_level = "debug"
durability = "normal"
shutdown_grace = "1m"
wal_max_size = "8MiB"
tokens_file = "secrets/tokens.json"
allow_anonymous = true
rate_limit = 2.5
rate_burst = 10
max_queued = 500
max_json_depth = 8
max_string_length = 100
max_array_length = 50
max_args_size = "4KiB"
max_result_size = "1MiB"
env_allow = ["PATH", "LC_*"]
run_as = "nobody"
rlimit_nofile = 256
rlimit_nproc = 100
rlimit_core = 0

[scheduler]
poll_interval = "500ms"
max_jobs = 4
max_cpus = 3
max_memory = "8GiB"
reserve_cpus = 0
reserve_memory = 0
kill_grace = 5
max_rescues = 0

[tasks.fit]
function = "models.train:fit"
cpus = 0.25
memory = "1.5GiB"
max_retries = 2
timeout = "1h30m"
route = "/fit"

[tasks."other-task.v2"]
function = "a.b.c:Klass.method"
""",
        )
    )
    assert settings.task_paths == (tmp_path, tmp_path / "lib", Path("/opt/tasks"))
    assert settings.server == ServerSettings(
        host="0.0.0.0",
        port=9000,
        database=Path("/var/lib/jobserver/jobs.db"),
        jobs_dir=tmp_path.parent / "jobs",
        max_body_size=10 * MiB,
        access_log=False,
        log_level="debug",
        durability="normal",
        shutdown_grace=60.0,
        wal_max_size=8 * MiB,
        tokens_file=tmp_path / "secrets" / "tokens.json",
        allow_anonymous=True,
        rate_limit=2.5,
        rate_burst=10,
        max_queued=500,
        max_json_depth=8,
        max_string_length=100,
        max_array_length=50,
        max_args_size=4096,
        max_result_size=MiB,
        env_allow=("PATH", "LC_*"),
        run_as="nobody",
        rlimit_nofile=256,
        rlimit_nproc=100,
        rlimit_core=0,
    )
    assert settings.scheduler == SchedulerSettings(
        poll_interval=0.5,
        max_jobs=4,
        max_cpus=3.0,
        max_memory=8 * 1024**3,
        reserve_cpus=0.0,
        reserve_memory=0,
        kill_grace=5.0,
        max_rescues=0,
    )
    assert isinstance(settings.scheduler.max_cpus, float)
    assert settings.tasks["fit"] == TaskSettings(
        name="fit",
        function="models.train:fit",
        cpus=0.25,
        memory=1536 * MiB,
        max_retries=2,
        timeout=5400.0,
        route="/fit",
    )
    assert settings.tasks["other-task.v2"].function == "a.b.c:Klass.method"
    with pytest.raises(TypeError):
        settings.tasks["new"] = settings.tasks["fit"]  # type: ignore[index]


def test_relative_paths_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    write(conf_dir, '[server]\ndatabase = "db/x.db"\n')
    settings = load(Path("..") / "etc" / "config.toml")
    assert settings.path == conf_dir / "config.toml"
    assert settings.server.database == conf_dir / "db" / "x.db"
    assert settings.server.jobs_dir == conf_dir / "data" / "jobs"
    assert settings.task_paths == (conf_dir,)


# --- errors ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.message == (
        f"config file not found: {path}; pass --config PATH or set JOBSERVER_CONFIG "
        "(`jobserver init` writes a starter config.toml)"
    )
    assert info.value.details == {"file": str(path), "line": None, "key": None}


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path)  # a directory


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nport = 8000\nhost = 127.0.0.1\n")
    assert error.message.startswith(f"{tmp_path / 'config.toml'}:3: invalid TOML")
    assert error.details["line"] == 3


@pytest.mark.parametrize(
    ("text", "key", "line", "suggestion"),
    [
        ("# hi\ntask_path = ['.']\n", "task_path", 2, "task_paths"),
        ("[schedular]\nmax_jobs = 1\n", "schedular", 1, "scheduler"),
        ("\n[server]\nhost = 'x'\nprot = 1\n", "server.prot", 4, "server.port"),
        ("[scheduler]\nmax_job = 1\n", "scheduler.max_job", 2, "scheduler.max_jobs"),
        ("scheduler.max_job = 1\n", "scheduler.max_job", 1, "scheduler.max_jobs"),
        (
            '\n[tasks.run_long_analysis]\nfunction = "a:b"\ncpu = 1\n',
            "tasks.run_long_analysis.cpu",
            4,
            "tasks.run_long_analysis.cpus",
        ),
        (
            '[ tasks . "run" ]\nfunction = "a:b"\n"memroy" = 1\n',
            "tasks.run.memroy",
            3,
            "tasks.run.memory",
        ),
    ],
)
def test_unknown_key(tmp_path: Path, text: str, key: str, line: int, suggestion: str) -> None:
    error = load_error(tmp_path, text)
    assert error.message == (
        f"{tmp_path / 'config.toml'}:{line}: unknown key {key}; did you mean {suggestion}?"
    )
    assert error.details == {"file": str(tmp_path / "config.toml"), "line": line, "key": key}


def test_unknown_key_without_suggestion_lists_valid_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[server]\nzzz = 1\n")
    assert "unknown key server.zzz; valid keys here: host, port, database" in error.message


@pytest.mark.parametrize(
    ("text", "key", "line", "expected"),
    [
        (
            '[scheduler]\nmax_jobs = 2\n\nreserve_memory = "lots"\n',
            "scheduler.reserve_memory",
            4,
            'scheduler.reserve_memory = "lots": expected a size like "512MiB" or a number of bytes',
        ),
        ("[server]\nport = 70000\n", "server.port", 2, "between 0 and 65535"),
        ("[server]\nport = true\n", "server.port", 2, "server.port = true: expected an integer"),
        ("[server]\nport = '80'\n", "server.port", 2, "expected an integer"),
        ("[server]\naccess_log = 1\n", "server.access_log", 2, "expected true or false"),
        ('[server]\nfork_server = "yes"\n', "server.fork_server", 2, "expected true or false"),
        ("[server]\nlog_level = 'loud'\n", "server.log_level", 2, "expected one of critical"),
        ("[server]\nhost = 1\n", "server.host", 2, "expected a string"),
        ("[server]\ndatabase = ''\n", "server.database", 2, "expected a path"),
        ("[server]\nmax_body_size = 0\n", "server.max_body_size", 2, "greater than 0"),
        ("[scheduler]\npoll_interval = 0\n", "scheduler.poll_interval", 2, "greater than 0"),
        ("[scheduler]\nkill_grace = '-1s'\n", "scheduler.kill_grace", 2, "a duration like"),
        ("[scheduler]\nkill_grace = -1\n", "scheduler.kill_grace", 2, "cannot be negative"),
        ("[scheduler]\nmax_jobs = 0\n", "scheduler.max_jobs", 2, "expected an integer >= 1"),
        ("[scheduler]\nmax_cpus = 0\n", "scheduler.max_cpus", 2, "expected a number > 0"),
        ("[scheduler]\nmax_cpus = false\n", "scheduler.max_cpus", 2, "expected a number"),
        ("[scheduler]\nreserve_cpus = -0.5\n", "scheduler.reserve_cpus", 2, ">= 0"),
        ("[scheduler]\nmax_rescues = -1\n", "scheduler.max_rescues", 2, ">= 0"),
        ("[scheduler]\nmax_rescues = 1.0\n", "scheduler.max_rescues", 2, "an integer"),
        ("task_paths = '.'\n", "task_paths", 1, "expected a list of directories"),
        ("task_paths = ['.', 3]\n", "task_paths", 1, "expected a path"),
        ("server = 3\n", "server", 1, "server = 3: expected a table"),
        ("tasks = 3\n", "tasks", 1, "expected tables [tasks.NAME]"),
        ("[tasks]\nt = 3\n", "tasks.t", 2, "tasks.t = 3: expected a table"),
        (TASK + "cpus = 0\n", "tasks.t.cpus", 3, "expected a number > 0"),
        (TASK + "memory = 0\n", "tasks.t.memory", 3, "greater than 0"),
        (TASK + "max_retries = -1\n", "tasks.t.max_retries", 3, ">= 0"),
        (TASK + "timeout = '0s'\n", "tasks.t.timeout", 3, "greater than 0"),
        (TASK + "route = 'start'\n", "tasks.t.route", 3, "starting with /"),
        (TASK + "route = '/a b'\n", "tasks.t.route", 3, "no spaces"),
        ('[tasks.1bad]\nfunction = "a:b"\n', "tasks.1bad", 1, "a task name must"),
        ('\n[tasks."my task"]\nfunction = "a:b"\n', 'tasks."my task"', 2, "a task name must"),
        # A value in an inline table is reported at the line of the table's key.
        ('\n[tasks]\nt = {function = "a:b", cpus = -1}\n', "tasks.t.cpus", 3, "> 0"),
    ],
)
def test_bad_value_names_key_file_and_line(
    tmp_path: Path, text: str, key: str, line: int, expected: str
) -> None:
    error = load_error(tmp_path, text)
    assert error.message.startswith(f"{tmp_path / 'config.toml'}:{line}: ")
    assert expected in error.message
    assert error.details == {"file": str(tmp_path / "config.toml"), "line": line, "key": key}


def test_missing_function(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[tasks.t]\ncpus = 1\n")
    assert error.message == (
        f"{tmp_path / 'config.toml'}:1: [tasks.t] is missing the required key 'function' "
        '(function = "package.module:function")'
    )
    assert error.details["key"] == "tasks.t.function"


@pytest.mark.parametrize(
    "function",
    ["pkg.mod", "pkg.mod:", ":fn", "pkg..mod:fn", "pkg.mod:fn()", "pkg-x:fn", "a:b:c", "a:1b"],
)
def test_bad_function_shape(tmp_path: Path, function: str) -> None:
    error = load_error(tmp_path, f'[tasks.t]\nfunction = "{function}"\n')
    assert 'expected "package.module:function"' in error.message
    assert error.details["line"] == 2
    assert error.details["key"] == "tasks.t.function"


def test_duplicate_routes(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        '[tasks.a]\nfunction = "m:a"\nroute = "/go"\n\n'
        '[tasks.b]\nfunction = "m:b"\nroute = "/go"\n',
    )
    assert 'tasks.b.route = "/go": already used by tasks.a' in error.message
    assert error.details["line"] == 7


@pytest.mark.parametrize(
    "route",
    [
        "/api/v1/jobs",
        "/api/v1/jobs/run",
        "/api/v1/tasks",
        "/api/v1/system/x",
        "/api/v1/task-status/1",
        "/healthz",
        "/readyz",
    ],
)
def test_reserved_route(tmp_path: Path, route: str) -> None:
    error = load_error(tmp_path, TASK + f'route = "{route}"\n')
    assert "is reserved for jobserver's own API" in error.message
    assert error.details["key"] == "tasks.t.route"


def test_route_next_to_reserved_is_fine(tmp_path: Path) -> None:
    settings = load(write(tmp_path, TASK + 'route = "/api/v1/jobs-extra"\n'))
    assert settings.tasks["t"].route == "/api/v1/jobs-extra"


# --- which file ------------------------------------------------------------------------


def test_resolve_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("JOBSERVER_CONFIG", raising=False)
    assert resolve_path(None) == tmp_path / "config.toml"

    monkeypatch.setenv("JOBSERVER_CONFIG", str(tmp_path / "env.toml"))
    assert resolve_path(None) == tmp_path / "env.toml"

    assert resolve_path(str(tmp_path / "cli.toml")) == tmp_path / "cli.toml"
    assert resolve_path("rel.toml") == tmp_path / "rel.toml"  # relative to the cwd


def test_resolve_path_does_not_check_existence(tmp_path: Path) -> None:
    assert not resolve_path(str(tmp_path / "missing.toml")).exists()


# --- the database: a SQLite file or a PostgreSQL URL ------------------------------------


def test_database_url_is_postgresql(tmp_path: Path) -> None:
    url = "postgresql://jobs@db.internal:5432/jobserver"
    settings = load(write(tmp_path, f'[server]\ndatabase = "{url}"\n'))
    assert settings.server.database == url
    settings = load(write(tmp_path, '[server]\ndatabase = "jobs.db"\n'))
    assert settings.server.database == tmp_path / "jobs.db"


def test_database_url_of_another_engine_names_the_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[server]\n\ndatabase = "mysql://u@h/db"\n')
    assert error.details["key"] == "server.database" and error.details["line"] == 3
    assert "PostgreSQL URL" in error.message


PG = '[server]\ndatabase = "postgresql://u@h/db"\n'


def test_cluster_defaults_on_postgresql_and_none_on_sqlite(tmp_path: Path) -> None:
    import socket

    assert load(write(tmp_path, "")).cluster is None
    cluster = load(write(tmp_path, PG)).cluster
    assert cluster == ClusterSettings(node=socket.gethostname())
    assert cluster.heartbeat_interval == 2.0 and cluster.node_timeout == 30.0


def test_cluster_table(tmp_path: Path) -> None:
    text = PG + (
        '[cluster]\nnode = "worker-1"\nurl = "http://10.0.0.5:8000/"\n'
        'heartbeat_interval = "500ms"\nnode_timeout = "5s"\nshared_jobs_dir = "shared"\n'
        'token = "0123456789abcdef"\nlisten = false\n'
    )
    cluster = load(write(tmp_path, text)).cluster
    assert cluster == ClusterSettings(
        node="worker-1",
        url="http://10.0.0.5:8000",
        heartbeat_interval=0.5,
        node_timeout=5.0,
        shared_jobs_dir=tmp_path / "shared",
        token="0123456789abcdef",
        listen=False,
    )


def test_cluster_on_sqlite_is_refused(tmp_path: Path) -> None:
    error = load_error(tmp_path, '[cluster]\nnode = "a"\n')
    assert error.details["key"] == "cluster" and error.details["line"] == 1
    assert "PostgreSQL URL" in error.message


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('node = "a b"', "cluster.node", "node name"),
        ('url = "10.0.0.5:8000"', "cluster.url", "expected a URL"),
        ('token = "short"', "cluster.token", "at least 16"),
        ('heartbeat_interval = "0s"', "cluster.heartbeat_interval", "greater than 0"),
        ('node_timeout = "5s"', "cluster.node_timeout", "at least 3 times"),
        ("nodes = 3", "cluster.nodes", "did you mean cluster.node"),
        ('listen = "no"', "cluster.listen", "true or false"),
    ],
)
def test_cluster_errors_name_the_key(tmp_path: Path, line: str, key: str, words: str) -> None:
    error = load_error(tmp_path, PG + f"[cluster]\n{line}\n")
    assert error.details["key"] == key
    assert words in error.message
