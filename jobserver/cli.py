"""The ``jobserver`` command.

``serve`` and ``migrate`` work on the local config and database; the client commands
(``submit``, ``status``, ``jobs``, ``show``, ``cancel``, ``stats``) speak HTTP to a running
server like any other client, and never open the database.  They print tables for people
and, with ``--json``, the server's JSON documents for scripts.

Exit codes: 0 done (for ``--wait``: the job succeeded); 1 the job failed or was
cancelled; 2 bad usage, bad config or a request the server rejected; 3 the server could
not be reached or failed; 4 no such job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from jobserver import __version__
from jobserver.client import Client, ClientError, Job, JobFailed
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
    except ClientError as error:
        print(f"jobserver: {_client_error_text(error)}", file=sys.stderr)
        code = _client_error_exit(error)
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

    status = commands.add_parser("status", help="show a job")
    status.add_argument("job_id")
    _client_options(status)
    status.set_defaults(run=_status)

    # Issue 7: commands for admins and scripts.
    jobs = commands.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", help="only jobs in this state (queued, running, succeeded…)")
    jobs.add_argument("--task", help="only jobs of this task")
    jobs.add_argument("--limit", type=int, default=20, help="how many (1-1000, default 20)")
    _client_options(jobs)
    jobs.set_defaults(run=_jobs)

    show = commands.add_parser("show", help="show one job in full (error traceback included)")
    show.add_argument("job_id")
    _client_options(show)
    show.set_defaults(run=_show_job)

    cancel = commands.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    _client_options(cancel)
    cancel.set_defaults(run=_cancel)

    stats = commands.add_parser(
        "stats", help="per task: jobs, success rate, p50/p95 duration, peak memory"
    )
    _client_options(stats)
    stats.set_defaults(run=_stats)
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


# -- client commands ------------------------------------------------------------------


def _request(method: str, url: str, **kwargs: Any) -> Any:
    try:
        response = httpx.request(method, url, timeout=30, **kwargs)
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
    tasks = _request("GET", f"{base}/api/v1/tasks")["tasks"]
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
    bar = ProgressBar(sys.stderr)
    with _client(args) as client:
        waiting = Job.from_document(client, job)
        bar.update(waiting)
        try:
            waiting.wait(on_change=bar.update)
        except JobFailed:
            pass  # reported below, like a success, from the final document
        finally:
            bar.close()
        job = waiting.document
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
    if error.status == 404:
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
    with _client(args) as client:
        job = client.job(args.job_id).cancel()
    if args.json:
        _print_json(job.document)
    elif job.state == "cancelled":
        print(f"{job.id}: cancelled")
    else:
        print(f"{job.id}: cancel requested; its process is being stopped")
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
        row += [_size(entry.get("memory_request"))]
        rows.append(row)
    print(table(headers, rows))
    return EXIT_OK


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


def _path(text: str) -> Path:
    return Path(text)
