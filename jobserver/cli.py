"""The ``jobserver`` command.

``serve``, ``migrate``, ``prune``, ``backup`` and ``token`` work on the local config and
database, ``init`` writes a starter config; the client commands (``submit``, ``status``,
``jobs``, ``show``, ``cancel``, ``retry``, ``logs``, ``artifacts``, ``stats``) speak HTTP
to a running server through ``jobserver.client``, like any other client, and never open
the database.  They print tables for people
and, with ``--json``, the server's JSON documents for scripts.

Exit codes: 0 done (for ``--wait``: the job succeeded); 1 the job failed or was
cancelled; 2 bad usage, bad config or a request the server rejected; 3 the server could
not be reached or failed; 4 no such job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jobserver import __version__
from jobserver.client import Client, ClientError, Job, JobFailed
from jobserver.errors import JobServerError

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}


class CommandFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        code = args.run(args)
    except CommandFailed as failure:
        print(f"jobserver: {failure}", file=sys.stderr)
        code = failure.exit_code
    except ClientError as error:
        print(f"jobserver: {_client_error_text(error)}", file=sys.stderr)
        code = _client_error_exit(error)
    except JobServerError as error:
        print(f"jobserver: {error.message}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobserver", description="Long-running Python functions as an HTTP job service."
    )
    parser.add_argument(
        "--version", action=_Version, help="show the version, Python and SQLite, and exit"
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (migrates the database first)")
    _config_option(serve)
    serve.add_argument("--host", help="address to bind (default: server.host in the config)")
    serve.add_argument("--port", type=int, help="port (default: server.port in the config)")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the database, then exit")
    _config_option(migrate)
    migrate.set_defaults(run=_migrate)

    init = commands.add_parser("init", help="write a commented starter config.toml")
    init.add_argument(
        "path",
        nargs="?",
        default="config.toml",
        help="file (or directory) to write (default: ./config.toml)",
    )
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.set_defaults(run=_init)

    backup = commands.add_parser(
        "backup", help="copy the database to PATH, safely while the server runs"
    )
    backup.add_argument("path", help="file to write, or a directory to put a timestamped copy in")
    backup.add_argument("--force", action="store_true", help="replace an existing file")
    _config_option(backup)
    backup.set_defaults(run=_backup)

    submit = commands.add_parser("submit", help="submit a job: TASK key=value ...")
    submit.add_argument("task")
    submit.add_argument(
        "arguments",
        nargs="*",
        metavar="key=value",
        help="task arguments; values are JSON (3, true, [1,2]) except for str parameters, "
        "which are taken as written",
    )
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--wait", action="store_true", help="wait for the job to finish")
    when = submit.add_mutually_exclusive_group()
    when.add_argument("--delay", type=float, metavar="SECONDS", help="start no sooner than this")
    when.add_argument(
        "--run-at", metavar="TIME", help='start at this ISO 8601 time, e.g. "2030-01-31T03:00Z"'
    )
    submit.add_argument(
        "--depends-on",
        action="append",
        default=[],
        metavar="ID",
        help="wait until job ID has succeeded (repeat for several)",
    )
    submit.add_argument("--max-retries", type=int, help="override the task's max_retries")
    submit.add_argument("--timeout", type=float, metavar="SECONDS", help="override the timeout")
    submit.add_argument(
        "--idempotency-key", metavar="KEY", help="resubmitting with the same key returns the job"
    )
    _client_options(submit)
    submit.set_defaults(run=_submit)

    token = commands.add_parser(
        "token", help="manage bearer tokens (stored as hashes in server.tokens_file)"
    )
    token_commands = token.add_subparsers(required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="create a token; prints its secret once")
    create.add_argument("name", help="who the token is for; its jobs are owned by this name")
    create.add_argument(
        "--scopes",
        required=True,
        help="comma-separated: submit, read, cancel, admin (admin implies all and sees "
        "every client's jobs)",
    )
    _config_option(create)
    create.set_defaults(run=_token_create)
    listing = token_commands.add_parser("list", help="list token names and scopes")
    _config_option(listing)
    listing.set_defaults(run=_token_list)
    revoke = token_commands.add_parser("revoke", help="delete a token")
    revoke.add_argument("name")
    _config_option(revoke)
    revoke.set_defaults(run=_token_revoke)

    _job_command(commands, "status", "show a job", _status)

    # --- lifecycle (issue 4) ---
    _bulk_command(
        commands, "retry", "run a failed or cancelled job again (or every one a filter selects)",
        _retry, ("failed", "cancelled"),
    )  # fmt: skip

    logs = commands.add_parser("logs", help="print a job's log (stdout and stderr)")
    logs.add_argument("job_id")
    logs.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
    logs.add_argument("--tail", type=int, metavar="N", help="only the last N lines")
    _url_option(logs)
    logs.set_defaults(run=_logs)

    artifacts = commands.add_parser(
        "artifacts", help="list a job's artifacts, or download one: JOB [NAME] [-o PATH]"
    )
    artifacts.add_argument("job_id")
    artifacts.add_argument("name", nargs="?", help="the artifact to download")
    artifacts.add_argument(
        "-o", "--output", metavar="PATH", help="file or directory to save to (default: ./NAME)"
    )
    _client_options(artifacts)
    artifacts.set_defaults(run=_artifacts)

    prune = commands.add_parser(
        "prune", help="delete finished jobs past their retention now (safe while serving)"
    )
    _config_option(prune)
    prune.add_argument("--dry-run", action="store_true", help="only list what would go")
    prune.set_defaults(run=_prune)

    # Issue 7: commands for admins and scripts.
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", help="only jobs in this state (queued, running, succeeded…)")
    jobs.add_argument("--task", help="only jobs of this task")
    jobs.add_argument("--limit", type=int, default=20, help="how many (1-1000, default 20)")
    _client_options(jobs)
    jobs.set_defaults(run=_jobs)

    _job_command(commands, "show", "show one job in full (error traceback included)", _show_job)
    _bulk_command(
        commands, "cancel", "cancel a queued or running job (or every one a filter selects)",
        _cancel, ("queued", "running"),
    )  # fmt: skip

    stats = commands.add_parser(
        "stats", help="per task: jobs, success rate, p50/p95 duration, peak memory"
    )
    _client_options(stats)
    stats.set_defaults(run=_stats)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        help="config file (default: $JOBSERVER_CONFIG, else ./config.toml, else config.toml "
        "next to the jobserver binary)",
    )


def _url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("JOBSERVER_URL", DEFAULT_URL),
        help=f"server URL (default: $JOBSERVER_URL, else {DEFAULT_URL})",
    )


def _job_command(commands: Any, name: str, help: str, run: Any) -> argparse.ArgumentParser:
    """A client command that takes one job id."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
    parser.add_argument("job_id")
    _client_options(parser)
    parser.set_defaults(run=run)
    return parser


def _bulk_command(commands: Any, name: str, help: str, run: Any, states: tuple[str, ...]) -> None:
    """A client command on one job id, or on every job its filter options select."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
    parser.add_argument("job_id", nargs="?", help="one job; or leave it out and filter")
    parser.add_argument("--task", help="every job of this task")
    parser.add_argument(
        "--state", action="append", choices=states, help="every job in this state (repeatable)"
    )
    parser.add_argument(
        "--older-than", type=float, metavar="SECONDS", help="submitted more than this ago"
    )
    parser.add_argument(
        "--before", metavar="TIME", help='submitted before, e.g. "2030-01-31T03:00Z"'
    )
    parser.add_argument("--all", action="store_true", help="every job (when no filter is given)")
    _client_options(parser)
    parser.set_defaults(run=run)


def _client_options(parser: argparse.ArgumentParser) -> None:
    _url_option(parser)
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")


# -- local commands -------------------------------------------------------------------


def _load_settings(args: argparse.Namespace) -> Any:
    from jobserver import config

    return config.load(config.resolve_path(args.config))


def _serve(args: argparse.Namespace) -> int:
    from jobserver.server import serve

    return serve(_load_settings(args), host=args.host, port=args.port)


def _migrate(args: argparse.Namespace) -> int:
    from jobserver.server import upgrade
    from jobserver.store import DatabaseLock

    database = _load_settings(args).server.database
    if not isinstance(database, Path):
        # Nodes may run meanwhile: migrations are additive and taken under an advisory lock.
        upgrade(database)
        print("the PostgreSQL database is up to date")
        return EXIT_OK
    lock = DatabaseLock(database)
    lock.acquire()  # never change the schema under a running server
    try:
        copy = upgrade(database)
    finally:
        lock.release()
    if copy is not None:
        print(f"backed up the database to {copy} before migrating")
    print(f"database {database} is up to date")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    from importlib import resources

    target = Path(args.path)
    if target.is_dir():
        target = target / "config.toml"
    if target.exists() and not args.force:
        raise CommandFailed(f"{target} already exists; pass --force to replace it", EXIT_USAGE)
    text = resources.files("jobserver").joinpath("config.toml").read_text(encoding="utf-8")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}; edit it, then run: jobserver serve --config {target}")
    return EXIT_OK


def _backup(args: argparse.Namespace) -> int:
    from jobserver.backup import backup

    settings = _load_settings(args)
    if not isinstance(settings.server.database, Path):
        raise CommandFailed(
            "server.database is PostgreSQL: back it up with PostgreSQL's own tools "
            "(pg_dump --format=custom, or continuous archiving); see docs/cluster.md",
            EXIT_USAGE,
        )
    written = backup(settings.server.database, Path(args.path), overwrite=args.force)
    print(f"backed up {settings.server.database} to {written}")
    return EXIT_OK


class _Version(argparse.Action):
    # argparse's own version action rewraps the text onto one line.
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(version_text())
        parser.exit()


def version_text() -> str:
    """The version, and the Python and SQLite inside this build (the binary's own)."""
    kind = "single-file binary" if getattr(sys, "frozen", False) else sys.executable
    return (
        f"jobserver {__version__}\n"
        f"Python {platform.python_version()} ({kind})\n"
        f"SQLite {sqlite3.sqlite_version}"
    )


def _tokens_file(args: argparse.Namespace) -> Path:
    path: Path = _load_settings(args).server.tokens_file
    return path


def _token_create(args: argparse.Namespace) -> int:
    from jobserver import access

    path = _tokens_file(args)
    secret = access.create_token(path, args.name, access.parse_scopes(args.scopes))
    print(secret)
    print(
        f"token {args.name!r} created in {path}; this secret is shown only once. "
        "Clients send it as 'Authorization: Bearer <secret>' (or set JOBSERVER_TOKEN).",
        file=sys.stderr,
    )
    return EXIT_OK


def _token_list(args: argparse.Namespace) -> int:
    from jobserver import access

    for token in access.read_tokens(_tokens_file(args)):
        print(f"{token.name}\t{','.join(token.scopes)}\t{token.created_at}")
    return EXIT_OK


def _token_revoke(args: argparse.Namespace) -> int:
    from jobserver import access

    path = _tokens_file(args)
    access.revoke_token(path, args.name)
    print(f"token {args.name!r} revoked", file=sys.stderr)
    return EXIT_OK


# -- client commands ------------------------------------------------------------------


def parse_arguments(pairs: Sequence[str], params: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``key=value`` pairs to task arguments: JSON values, except that a parameter declared
    ``str`` takes the text as written (so ``dataset_id=007`` stays a string)."""
    types = {param["name"]: param["type"] for param in params}
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            raise CommandFailed(f"expected key=value, got {pair!r}", EXIT_USAGE)
        if "str" in types.get(key, "").replace(" ", "").split("|"):
            arguments[key] = text
            continue
        try:
            arguments[key] = json.loads(text)
        except ValueError:
            arguments[key] = text
    return arguments


def _submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            tasks = client.tasks()
        except ClientError as refused:
            if refused.status is None:
                raise
            # A submit-only token may not read the task list: then every value is
            # JSON-parsed, and the submit itself reports any real problem.
            tasks = []
        params: list[dict[str, Any]] = next(
            (task["params"] for task in tasks if task["name"] == args.task), []
        )
        job = client.submit_job(
            args.task,
            parse_arguments(args.arguments, params),
            priority=args.priority,
            delay=args.delay,
            run_at=args.run_at,
            depends_on=args.depends_on,
            max_retries=args.max_retries,
            timeout=args.timeout,
            idempotency_key=args.idempotency_key,
        )
        if not args.wait:
            _show(job.document, args.json)
            return EXIT_OK
        print(f"submitted {job.id}; waiting…", file=sys.stderr)
        bar = ProgressBar(sys.stderr)
        bar.update(job)
        try:
            # The job keeps the submit answer's ETag: the first long poll returns at the
            # job's first change (running), not at the one after it.
            job.wait(on_change=bar.update)
        except JobFailed:
            pass  # reported below, like a success, from the final document
        except KeyboardInterrupt:
            bar.close()
            print(
                f"stopped waiting; job {job.id} keeps running on the server.\n"
                f"  follow it:  jobserver status {job.id}\n"
                f"  cancel it:  jobserver cancel {job.id}",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        finally:
            bar.close()
    document = job.document
    if args.json:
        print(json.dumps(document, indent=2, ensure_ascii=False))
    elif document["state"] == "succeeded":
        print(json.dumps(document["result"], indent=2, ensure_ascii=False))
    else:
        error = document.get("error") or {}
        message = error.get("message") or document.get("reason")
        print(f"{document['state']}: {message}", file=sys.stderr)
    return EXIT_OK if document["state"] == "succeeded" else EXIT_JOB_FAILED


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _show(client.job(args.job_id).document, args.json)
    return EXIT_OK


def _retry(args: argparse.Namespace) -> int:
    if _filtered(args):
        return _bulk(args, "retry")
    with _client(args) as client:
        _show(client.job(args.job_id).retry().document, args.json)
    return EXIT_OK


def _logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
        if not args.follow:
            sys.stdout.write(job.logs(tail=args.tail))
            return EXIT_OK
        for text in job.follow_logs(tail=args.tail):
            sys.stdout.write(text)
            sys.stdout.flush()
    return EXIT_OK


def _artifacts(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id)
        if args.name is None:
            if args.json:
                _print_json(job.artifacts)
            elif not job.artifacts:
                print(f"job {job.id} has no artifacts", file=sys.stderr)
            else:
                rows = [[a["name"], _size(a["size"]), a["sha256"]] for a in job.artifacts]
                print(table(["NAME", "SIZE", "SHA-256"], rows))
            return EXIT_OK
        target = Path(args.output or Path(args.name).name)
        if target.is_dir():
            target /= Path(args.name).name
        saved = job.download(args.name, target)
    print(f"saved {args.name} to {saved} ({_size(saved.stat().st_size)})", file=sys.stderr)
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    """Open the database file directly, like ``migrate``: safe beside a running server
    (WAL lets both read, and writes wait on the busy timeout)."""
    import asyncio
    from datetime import UTC, datetime

    from jobserver.server import build_pruner
    from jobserver.store import open_store

    settings = _load_settings(args)
    database = settings.server.database
    if isinstance(database, Path) and not database.exists():
        raise CommandFailed(f"no database at {database}; nothing to prune", EXIT_USAGE)

    async def run() -> list[str]:
        store = open_store(database)
        try:
            pruner = build_pruner(settings, store)
            now = datetime.now(UTC)
            if args.dry_run:
                return await pruner.due(now)
            return await pruner.run_until_done(now)
        finally:
            await store.close()

    ids = asyncio.run(run())
    for job_id in ids:
        print(job_id)
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{verb} {len(ids)} finished job(s)", file=sys.stderr)
    return EXIT_OK


def _show(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
        return
    fields = [
        "id",
        "task",
        "state",
        "priority",
        "attempts",
        "created_at",
        "started_at",
        "finished_at",
        "waiting_reason",
        "reason",
    ]
    if job.get("progress"):
        fraction = job["progress"].get("fraction")
        done = "" if fraction is None else f"{fraction:.0%} "
        job = {**job, "progress_text": f"{done}{job['progress'].get('message') or ''}".strip()}
        fields.append("progress_text")
    width = max(len(name) for name in fields) + 1
    for name in fields:
        if job.get(name) is not None:
            print(f"{name + ':':<{width}} {job[name]}")
    print(f"{'args:':<{width}} {json.dumps(job['args'], ensure_ascii=False)}")
    if job.get("result") is not None:
        print(f"{'result:':<{width}} {json.dumps(job['result'], ensure_ascii=False)}")
    if job.get("error"):
        print(f"{'error:':<{width}} {job['error']['type']}: {job['error']['message']}")
    if job.get("depends_on"):
        print(f"{'depends_on:':<{width}} {', '.join(job['depends_on'])}")
    for artifact in job.get("artifacts") or []:
        print(f"{'artifact:':<{width}} {artifact['name']} ({artifact['size']} bytes)")
    for entry in job.get("history") or []:
        error = entry.get("error") or {}
        detail = f" ({error.get('type')}: {error.get('message')})" if error else ""
        print(
            f"{'attempt ' + str(entry['attempt']) + ':':<{width}} {entry['started_at']} "
            f"{entry.get('outcome') or 'running'}{detail}"
        )


def _client(args: argparse.Namespace) -> Client:
    # The token variable is read here so that these commands work against a server that
    # requires one; the CLI's token options belong to the authentication work.
    return Client(args.url, token=os.environ.get("JOBSERVER_TOKEN") or None)


def _client_error_text(error: ClientError) -> str:
    message = error.message
    if isinstance(error.details, list):
        for problem in error.details:
            if isinstance(problem, dict):
                message += f"\n  {problem.get('field')}: {problem.get('message')}"
    return message


def _client_error_exit(error: ClientError) -> int:
    if error.status in (404, 410):  # never issued, or pruned since
        return EXIT_NOT_FOUND
    if error.status is not None and 400 <= error.status < 500:
        return EXIT_USAGE
    return EXIT_SERVER


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _size(value: int | None) -> str:
    from jobserver.config import format_size

    return "-" if value is None else format_size(value)


def _elapsed(start: str | None, end: str | None) -> float | None:
    from datetime import UTC, datetime

    if start is None:
        return None
    begin = datetime.fromisoformat(start.replace("Z", "+00:00"))
    finish = datetime.fromisoformat(end.replace("Z", "+00:00")) if end else datetime.now(UTC)
    return max(0.0, (finish - begin).total_seconds())


def _shorten(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _jobs(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise CommandFailed(f"--limit {args.limit}: expected 1 to 1000", EXIT_USAGE)
    with _client(args) as client:
        found = client.jobs(state=args.state, task=args.task, limit=args.limit)
    if args.json:
        _print_json([job.document for job in found])
        return EXIT_OK
    if not found:
        print("no jobs", file=sys.stderr)
        return EXIT_OK
    rows = []
    for job in found:
        d = job.document
        took = _elapsed(d["started_at"], d["finished_at"])
        note = d.get("waiting_reason") or (d["error"] or {}).get("message") or d.get("reason")
        rows.append(
            [
                d["id"],
                d["task"],
                d["state"],
                d["created_at"][:19].replace("T", " "),
                format_seconds(took),
                str(d["attempts"]),
                _shorten(note),
            ]
        )
    print(table(["ID", "TASK", "STATE", "CREATED (UTC)", "DURATION", "TRIES", "NOTE"], rows))
    return EXIT_OK


def _show_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.job(args.job_id).document
    if args.json:
        _print_json(job)
        return EXIT_OK
    _show(job, False)
    extra = {
        "duration": format_seconds(_elapsed(job["started_at"], job["finished_at"])),
        "peak memory": _size(job.get("peak_rss")),
        "cpu time": format_seconds(job.get("cpu_seconds")),
        "exit code": job.get("exit_code"),
    }
    progress = job.get("progress")
    if progress:
        extra["progress"] = ProgressBar.describe(progress)
    for name, value in extra.items():
        if value not in (None, "-"):
            print(f"{name + ':':<15} {value}")
    error = job.get("error") or {}
    if error.get("traceback"):
        print("traceback:")
        print(error["traceback"].rstrip())
    return EXIT_OK


def _cancel(args: argparse.Namespace) -> int:
    if _filtered(args):
        return _bulk(args, "cancel")
    with _client(args) as client:
        job = client.job(args.job_id).cancel()
    if args.json:
        _print_json(job.document)
    elif job.state == "cancelled":
        print(f"{job.id}: cancelled")
    else:
        print(f"{job.id}: cancel requested; its process is being stopped")
    return EXIT_OK


def _filtered(args: argparse.Namespace) -> bool:
    """Whether ``cancel``/``retry`` act on a filter rather than one job id (never both:
    an id with a filter would silently ignore the filter)."""
    criteria = [args.task, args.state, args.older_than, args.before]
    given = any(value is not None for value in criteria) or args.all
    if given and args.job_id is not None:
        raise CommandFailed(
            "give a job id or a filter (--task, --state, ...), not both", EXIT_USAGE
        )
    return args.job_id is None


def _bulk(args: argparse.Namespace, verb: str) -> int:
    """``cancel``/``retry`` without a job id: every job the filter options select."""
    criteria = [args.task, args.state, args.older_than, args.before]
    if all(value is None for value in criteria) and not args.all:
        raise CommandFailed(
            f"{verb} what? give a job id, or a filter (--task, --state, --older-than, "
            "--before), or --all for every job",
            EXIT_USAGE,
        )
    with _client(args) as client:
        operation = client.cancel_jobs if verb == "cancel" else client.retry_jobs
        answer = operation(
            task=args.task,
            state=args.state,
            older_than=args.older_than,
            before=args.before,
            all=args.all,
        )
    if args.json:
        _print_json(answer)
        return EXIT_OK
    for job_id in answer["ids"]:
        print(job_id)
    more = " (more than listed)" if answer["truncated"] else ""
    done = "cancelled or asked to stop" if verb == "cancel" else "queued again"
    cascaded = f"; {answer['cascaded']} dependent(s) cancelled" if answer["cascaded"] else ""
    print(f"{answer['count']} job(s) {done}{more}{cascaded}", file=sys.stderr)
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        tasks = client.stats()
    if args.json:
        _print_json({"tasks": tasks})
        return EXIT_OK
    learned = any(entry.get("learned_memory") is not None for entry in tasks)
    headers = ["TASK", "JOBS", "RUNNING", "QUEUED", "SUCCESS", "P50", "P95", "PEAK MEM p95"]
    headers += ["LEARNED MEM"] if learned else []
    headers += ["REQUEST"]
    rows = []
    for entry in tasks:
        rate = entry["success_rate"]
        row = [
            entry["task"],
            str(entry["count"]),
            str(entry["states"]["running"]),
            str(entry["states"]["queued"]),
            "-" if rate is None else f"{rate * 100:.1f}%",
            format_seconds(entry["duration_p50"]),
            format_seconds(entry["duration_p95"]),
            _size(entry["peak_rss_p95"]),
        ]
        row += [_size(entry.get("learned_memory"))] if learned else []
        row += [_reserved(entry)]
        rows.append(row)
    print(table(headers, rows))
    return EXIT_OK


def _reserved(entry: dict[str, Any]) -> str:
    """The memory admission reserves for the task's jobs (declared, learned, or the
    scheduler's default_memory), and where it comes from when not the config."""
    scheduled = entry.get("scheduled_with")
    if not scheduled:  # a task no longer configured
        return _size(entry.get("memory_request"))
    source = scheduled["source"]
    where = "" if source == "declared" else f" ({source.replace('_memory', '')})"
    return _size(scheduled["memory"]) + where


class ProgressBar:
    """A live line on a terminal (redrawn in place), one line per change elsewhere."""

    WIDTH = 24

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._live = bool(getattr(stream, "isatty", lambda: False)())
        self._last = ""

    @staticmethod
    def describe(progress: dict[str, Any]) -> str:
        fraction = progress.get("fraction")
        text = "" if fraction is None else f"{fraction * 100:3.0f}%"
        if progress.get("message"):
            text += f" {progress['message']}"
        return text.strip()

    def render(self, job: Job) -> str:
        progress = job.progress
        fraction = progress.get("fraction") if progress else None
        if fraction is None and job.state == "succeeded":
            fraction = 1.0
        if fraction is None:
            bar = "[" + " " * self.WIDTH + "]"
        else:
            filled = round(max(0.0, min(1.0, float(fraction))) * self.WIDTH)
            bar = "[" + "#" * filled + "-" * (self.WIDTH - filled) + "]"
        text = f"{job.id} {job.state:<9} {bar}"
        if progress:
            text += f" {self.describe(progress)}"
        elif job.document.get("waiting_reason"):
            text += f" {job.document['waiting_reason']}"
        return text

    def update(self, job: Job) -> None:
        line = self.render(job)
        if line == self._last:
            return
        self._last = line
        if self._live:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._live and self._last:
            self._stream.write("\n")
            self._stream.flush()
        self._live = False  # closed: a second close writes nothing


def _path(text: str) -> Path:
    return Path(text)
