"""The ``jobserver`` command.

``serve`` and ``migrate`` work on the local config and database; the client commands
(``submit``, ``status``) speak HTTP to a running server like any other client.

Exit codes: 0 done (for ``--wait``: the job succeeded); 1 the job failed or was
cancelled; 2 bad usage, bad config or a request the server rejected; 3 the server could
not be reached or failed; 4 no such job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from jobserver import __version__
from jobserver.errors import JobServerError

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_SERVER, EXIT_NOT_FOUND = 0, 1, 2, 3, 4
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
    except JobServerError as error:
        print(f"jobserver: {error.message}", file=sys.stderr)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobserver", description="Long-running Python functions as an HTTP job service."
    )
    parser.add_argument("--version", action="version", version=f"jobserver {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server (migrates the database first)")
    _config_option(serve)
    serve.add_argument("--host", help="address to bind (default: server.host in the config)")
    serve.add_argument("--port", type=int, help="port (default: server.port in the config)")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create or upgrade the database, then exit")
    _config_option(migrate)
    migrate.set_defaults(run=_migrate)

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

    status = commands.add_parser("status", help="show a job")
    status.add_argument("job_id")
    _client_options(status)
    status.set_defaults(run=_status)
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $JOBSERVER_CONFIG, else ./config.toml)"
    )


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("JOBSERVER_URL", DEFAULT_URL),
        help=f"server URL (default: $JOBSERVER_URL, else {DEFAULT_URL})",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")


# -- local commands -------------------------------------------------------------------


def _load_settings(args: argparse.Namespace) -> Any:
    from jobserver import config

    return config.load(config.resolve_path(args.config))


def _serve(args: argparse.Namespace) -> int:
    from jobserver.server import serve

    return serve(_load_settings(args), host=args.host, port=args.port)


def _migrate(args: argparse.Namespace) -> int:
    from jobserver.store import migrate

    database = _load_settings(args).server.database
    migrate(database)
    print(f"database {database} is up to date")
    return EXIT_OK


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


def _request(method: str, url: str, **kwargs: Any) -> Any:
    token = os.environ.get("JOBSERVER_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url, timeout=30, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        raise CommandFailed(
            f"cannot reach {url}: {exc}; is the server running?", EXIT_SERVER
        ) from None
    try:
        body = response.json()
    except ValueError:
        raise CommandFailed(
            f"{method} {url} answered {response.status_code} without JSON", EXIT_SERVER
        ) from None
    if response.is_success:
        return body
    error = body.get("error", {}) if isinstance(body, dict) else {}
    message = error.get("message", response.reason_phrase)
    for problem in error.get("details") or [] if isinstance(error.get("details"), list) else []:
        message += f"\n  {problem.get('field')}: {problem.get('message')}"
    code = {404: EXIT_NOT_FOUND}.get(response.status_code, EXIT_SERVER)
    if 400 <= response.status_code < 500 and response.status_code != 404:
        code = EXIT_USAGE
    raise CommandFailed(message, code)


def parse_arguments(pairs: Sequence[str], params: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``key=value`` pairs to task arguments: JSON values, except that a parameter declared
    ``str`` takes the text as written (so ``dataset_id=007`` stays a string)."""
    types = {param["name"]: param["type"] for param in params}
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, equals, text = pair.partition("=")
        if not equals or not key:
            raise CommandFailed(f"expected key=value, got {pair!r}", EXIT_USAGE)
        if types.get(key) == "str":
            arguments[key] = text
            continue
        try:
            arguments[key] = json.loads(text)
        except ValueError:
            arguments[key] = text
    return arguments


def _submit(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    try:
        tasks = _request("GET", f"{base}/api/v1/tasks")["tasks"]
    except CommandFailed:
        # A submit-only token may not read the task list: then every value is JSON-parsed,
        # and the submit itself reports any real problem (an unreachable server included).
        tasks = []
    params: list[dict[str, Any]] = next(
        (task["params"] for task in tasks if task["name"] == args.task), []
    )
    body = {
        "task": args.task,
        "args": parse_arguments(args.arguments, params),
        "priority": args.priority,
    }
    job = _request("POST", f"{base}/api/v1/jobs", json=body)
    if not args.wait:
        _show(job, args.json)
        return EXIT_OK
    print(f"submitted {job['id']}; waiting…", file=sys.stderr)
    last_state = job["state"]
    while job["state"] not in TERMINAL:
        time.sleep(0.5)
        job = _request("GET", f"{base}/api/v1/jobs/{job['id']}")
        if job["state"] != last_state:
            last_state = job["state"]
            print(f"{job['id']}: {last_state}", file=sys.stderr)
    if args.json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
    elif job["state"] == "succeeded":
        print(json.dumps(job["result"], indent=2, ensure_ascii=False))
    else:
        error = job.get("error") or {}
        print(f"{job['state']}: {error.get('message') or job.get('reason')}", file=sys.stderr)
    return EXIT_OK if job["state"] == "succeeded" else EXIT_JOB_FAILED


def _status(args: argparse.Namespace) -> int:
    job = _request("GET", f"{args.url.rstrip('/')}/api/v1/jobs/{args.job_id}")
    _show(job, args.json)
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
    width = max(len(name) for name in fields) + 1
    for name in fields:
        if job.get(name) is not None:
            print(f"{name + ':':<{width}} {job[name]}")
    print(f"{'args:':<{width}} {json.dumps(job['args'], ensure_ascii=False)}")
    if job.get("result") is not None:
        print(f"{'result:':<{width}} {json.dumps(job['result'], ensure_ascii=False)}")
    if job.get("error"):
        print(f"{'error:':<{width}} {job['error']['type']}: {job['error']['message']}")


def _path(text: str) -> Path:
    return Path(text)
