"""The HTTP API: JSON in, JSON out, every error in one envelope.

Handlers only change stored state and wake the scheduler; they never start or signal a
process (the scheduler does, from the stored state).  Every error, on every route, is
``{"error": {"code", "message", "details"}}`` with a status code from ``STATUS``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from jobserver import __version__, dashboard
from jobserver.errors import (
    InvalidTransition,
    JobServerError,
    NotFound,
    StorageUnavailable,
    ValidationError,
)
from jobserver.events import Events
from jobserver.jobs import CELERY_STATUS, Job, JobState, format_timestamp, new_job_id, utcnow
from jobserver.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jobserver.metrics import Metrics
from jobserver.store import MAX_PAGE, NewJob, Store, TaskStats
from jobserver.tasks import Registry, Task

log = logging.getLogger("jobserver.api")

MAX_PRIORITY = 1000
MAX_WAIT_SECONDS = 60  # longest ?wait= a long-polling reader may ask for
SSE_KEEPALIVE_SECONDS = 15
SUBMIT_FIELDS = ("task", "args", "priority")


class SchedulerPort(Protocol):
    """What the API may ask of the scheduler: nothing that starts or stops a process."""

    def wake(self) -> None: ...

    def waiting_reason(self, job: Job, now: datetime) -> str | None: ...

    def view(self) -> dict[str, Any]: ...


class ApiError(JobServerError):
    """An HTTP-level problem with the request itself (not with its content)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message, details, code=code)
        self.status = status


STATUS: dict[type[JobServerError], int] = {
    ValidationError: 422,
    NotFound: 404,
    InvalidTransition: 409,
    StorageUnavailable: 503,
}


class JSONDocument(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(
    status: int, error: JobServerError, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONDocument({"error": error.to_dict()}, status_code=status, headers=headers)


def create_app(
    *,
    store: Store,
    registry: Registry,
    scheduler: SchedulerPort,
    max_body_size: int,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    events: Events | None = None,
    metrics: Metrics | None = None,
) -> Starlette:
    events = events or Events()

    def document(job: Job) -> dict[str, Any]:
        return job_document(job, scheduler.waiting_reason(job, utcnow()))

    async def read_json(request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise ApiError(
                415,
                "unsupported_media_type",
                "send the body as JSON with 'Content-Type: application/json'",
                {"content_type": content_type or None},
            )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_size:
            raise _too_large(max_body_size)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_size:
                raise _too_large(max_body_size)
        try:
            return json.loads(body, parse_constant=_reject_constant)
        except RecursionError:
            raise ApiError(400, "malformed_json", "the body's JSON is nested too deeply") from None
        except UnicodeDecodeError as exc:
            raise ApiError(400, "malformed_json", "the body is not valid UTF-8", str(exc)) from None
        except json.JSONDecodeError as exc:
            raise ApiError(
                400,
                "malformed_json",
                f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                {"line": exc.lineno, "column": exc.colno},
            ) from None

    async def submit(task: Task, args: Any, priority: int) -> Job:
        validated = task.validate(args)
        new = NewJob(task.name, validated, priority, task.settings.max_retries)
        job = await store.insert(new, new_job_id(), utcnow())
        scheduler.wake()
        events.transition(job, None)
        return job

    async def submit_job(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise ValidationError(
                "the body must be a JSON object like "
                '{"task": "NAME", "args": {...}, "priority": 0}',
                [{"field": "body", "message": f"expected an object, got {_json_type(body)}"}],
            )
        problems = [
            {"field": key, "message": f"unknown field; allowed: {', '.join(SUBMIT_FIELDS)}"}
            for key in body
            if key not in SUBMIT_FIELDS
        ]
        name = body.get("task")
        if not isinstance(name, str):
            problems.append({"field": "task", "message": "required: the name of a task"})
        priority = body.get("priority", 0)
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or abs(priority) > MAX_PRIORITY
        ):
            problems.append(
                {
                    "field": "priority",
                    "message": f"expected an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}",
                }
            )
        if problems:
            raise ValidationError("invalid job submission", problems)
        assert isinstance(name, str)
        job = await submit(registry.get(name), body.get("args", {}), priority)
        return JSONDocument(
            document(job), status_code=202, headers=_location(job) | _poll_headers(job)
        )

    def tutorial_route(task: Task) -> Callable[[Request], Any]:
        async def start(request: Request) -> Response:
            job = await submit(task, await read_json(request), 0)
            return JSONDocument(
                {"message": "task accepted; processing in the background", "task_id": job.id},
                status_code=202,
                headers=_location(job) | {"Retry-After": _poll_headers(job)["Retry-After"]},
            )

        return start

    async def get_job(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        wait = _wait_seconds(request)
        if wait is None:
            job = await store.get(job_id)
        else:
            job = await long_poll(job_id, request.headers.get("if-none-match"), wait)
        return JSONDocument(document(job), headers=_poll_headers(job))

    async def long_poll(job_id: str, baseline: str | None, wait: float) -> Job:
        """The job as soon as its version differs from ``baseline`` (the client's
        If-None-Match, else the version when the request came), when it is finished, or
        after ``wait`` seconds.  Reads the row only when the job's events say it changed."""
        deadline = time.monotonic() + wait
        while True:
            with events.subscription(job_id) as changed:
                job = await store.get(job_id)  # after subscribing: no change is missed
                tag = job_version(job)
                baseline = baseline or tag
                remaining = deadline - time.monotonic()
                if tag != baseline or job.state.terminal or remaining <= 0 or events.closing:
                    return job
                try:
                    await asyncio.wait_for(changed, remaining)
                except TimeoutError:
                    return job

    async def list_jobs(request: Request) -> Response:
        params = request.query_params
        unknown = sorted(set(params) - {"state", "task", "limit", "cursor"})
        problems = [{"field": key, "message": "unknown query parameter"} for key in unknown]
        state = None
        if "state" in params:
            try:
                state = JobState(params["state"])
            except ValueError:
                allowed = ", ".join(s.value for s in JobState)
                problems.append({"field": "state", "message": f"expected one of {allowed}"})
        limit = 50
        if "limit" in params:
            text = params["limit"]
            if text.isdigit() and 1 <= int(text) <= MAX_PAGE:
                limit = int(text)
            else:
                problems.append(
                    {"field": "limit", "message": f"expected an integer from 1 to {MAX_PAGE}"}
                )
        cursor = params.get("cursor") or None
        if cursor is not None and not _looks_like_job_id(cursor):
            problems.append({"field": "cursor", "message": "not a cursor this server issued"})
        if problems:
            raise ValidationError("invalid query", problems)
        found = await store.page(
            state=state, task=params.get("task"), limit=limit + 1, before=cursor
        )
        page = found[:limit]
        next_cursor = page[-1].id if len(found) > limit else None
        return JSONDocument({"jobs": [document(job) for job in page], "next_cursor": next_cursor})

    async def cancel_job(request: Request) -> Response:
        job = await store.request_cancel(request.path_params["job_id"], utcnow())
        scheduler.wake()
        if job.state is JobState.CANCELLED:
            events.transition(job, JobState.QUEUED, reason=job.reason)
        else:
            events.changed(job.id)
            log.info("job %s (%s): cancel requested while %s", job.id, job.task, job.state.value)
        return JSONDocument(
            document(job),
            status_code=200 if job.state.terminal else 202,
            headers=_poll_headers(job),
        )

    async def task_status(request: Request) -> Response:
        job = await store.get(request.path_params["task_id"])
        return JSONDocument(
            celery_document(job, scheduler.waiting_reason(job, utcnow())),
            headers=_poll_headers(job),
        )

    async def job_events(request: Request) -> Response:
        """Server-Sent Events: the job document now and at every change, then ``end``."""
        job_id = request.path_params["job_id"]
        await store.get(job_id)  # a 404 before the stream starts

        async def stream() -> Any:
            yield "retry: 2000\n\n"
            sent = None
            while True:
                with events.subscription(job_id) as changed:
                    try:
                        job = await store.get(job_id)
                    except NotFound:
                        return
                    tag = job_version(job)
                    if tag != sent:
                        sent = tag
                        data = json.dumps(document(job), ensure_ascii=False)
                        yield f"event: job\nid: {tag}\ndata: {data}\n\n"
                    if job.state.terminal:
                        yield "event: end\ndata: {}\n\n"
                        return
                    if events.closing:  # the server stops; EventSource reconnects
                        return
                    try:
                        await asyncio.wait_for(changed, SSE_KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield ": keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def stats(request: Request) -> Response:
        found = {entry.task: entry for entry in await store.task_stats()}
        names = sorted(set(found) | {task.name for task in registry})
        return JSONDocument(
            {"tasks": [stats_document(name, found.get(name), registry) for name in names]}
        )

    async def metrics_endpoint(request: Request) -> Response:
        assert metrics is not None
        body = metrics.render(scheduler.view(), await store.state_counts())
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    async def list_tasks(request: Request) -> Response:
        return JSONDocument({"tasks": [task.describe() for task in registry]})

    async def system(request: Request) -> Response:
        view = scheduler.view()
        view["jobs"] = await store.active_counts()
        return JSONDocument(view)

    async def healthz(request: Request) -> Response:
        await store.active_counts()
        return JSONDocument({"status": "ok", "version": __version__})

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/api/v1/jobs", submit_job, methods=["POST"]),
        Route("/api/v1/jobs", list_jobs, methods=["GET"]),
        Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
        Route("/api/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/api/v1/task-status/{task_id}", task_status, methods=["GET"]),
        Route("/api/v1/tasks", list_tasks, methods=["GET"]),
        Route("/api/v1/system", system, methods=["GET"]),
    ]
    # Issue 7: long polling's stream twin, statistics, metrics and the web page.
    routes += [
        Route("/api/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/api/v1/stats", stats, methods=["GET"]),
    ]
    if metrics is not None:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    routes += dashboard.routes()
    routes += [
        Route(path, tutorial_route(task), methods=["POST"])
        for path, task in registry.by_route().items()
    ]
    return Starlette(
        routes=routes,
        exception_handlers={
            JobServerError: _on_jobserver_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected_error,
        },
        lifespan=lifespan,
    )


def job_document(job: Job, waiting_reason: str | None) -> dict[str, Any]:
    return {
        "id": job.id,
        "task": job.task,
        "args": job.args,
        "state": job.state.value,
        "priority": job.priority,
        "created_at": format_timestamp(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "attempts": job.attempts,
        "max_retries": job.max_retries,
        "result": job.result,
        "error": job.error.to_dict() if job.error else None,
        "reason": job.reason,
        "waiting_reason": waiting_reason,
        "run_after": _time(job.run_after),
        "cancel_requested": job.cancel_requested,
        "exit_code": job.exit_code,
        "peak_rss": job.peak_rss,
        "cpu_seconds": job.cpu_seconds,
    }


def job_version(job: Job) -> str:
    """A short tag that changes whenever the job document does (state, progress, flags,
    attempts…), except ``waiting_reason``, which the scheduler rewrites without an event.
    Sent as the ETag; a long-polling client sends it back in If-None-Match."""
    fields = job_document(job, None)
    digest = hashlib.blake2b(
        json.dumps(fields, sort_keys=True, default=str).encode(), digest_size=8
    ).hexdigest()
    return f'"{digest}"'


def _poll_headers(job: Job) -> dict[str, str]:
    """ETag always; Retry-After (seconds) while the job is not finished: when a queued
    retry is due, else 1."""
    headers = {"ETag": job_version(job)}
    if not job.state.terminal:
        delay = 1
        if job.run_after is not None:
            due = (job.run_after - utcnow()).total_seconds()
            delay = int(min(MAX_WAIT_SECONDS, max(1, due)))
        headers["Retry-After"] = str(delay)
    return headers


def _wait_seconds(request: Request) -> float | None:
    text = request.query_params.get("wait")
    if text is None:
        return None
    try:
        wait = float(text)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_SECONDS:  # also rejects nan
        raise ValidationError(
            "invalid query",
            [
                {
                    "field": "wait",
                    "message": f"expected a number of seconds from 0 to {MAX_WAIT_SECONDS}",
                }
            ],
        )
    return wait


def stats_document(name: str, stats: TaskStats | None, registry: Registry) -> dict[str, Any]:
    """One task's entry in ``GET /api/v1/stats``."""
    task = registry.get(name) if name in registry else None
    return {
        "task": name,
        "registered": task is not None,
        "count": stats.count if stats else 0,
        "states": stats.states if stats else {state.value: 0 for state in JobState},
        "success_rate": stats.success_rate if stats else None,
        "duration_p50": stats.duration_p50 if stats else None,
        "duration_p95": stats.duration_p95 if stats else None,
        "peak_rss_p95": stats.peak_rss_p95 if stats else None,
        "peak_rss_max": stats.peak_rss_max if stats else None,
        "samples": stats.samples if stats else 0,
        "memory_request": task.settings.memory if task else None,
        "cpus_request": task.settings.cpus if task else None,
    }


def celery_document(job: Job, waiting_reason: str | None) -> dict[str, Any]:
    """The tutorial's ``/task-status`` shape (Celery's AsyncResult names)."""
    body: dict[str, Any] = {"task_id": job.id, "status": CELERY_STATUS[job.state]}
    if job.state is JobState.SUCCEEDED:
        body["result"] = job.result
    elif job.state is JobState.FAILED:
        body["error"] = job.error.message if job.error else job.reason
    elif job.state is JobState.CANCELLED:
        body["error"] = job.reason
    elif job.state is JobState.QUEUED:
        body["waiting_reason"] = waiting_reason
    return body


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else format_timestamp(moment)


def _location(job: Job) -> dict[str, str]:
    return {"Location": f"/api/v1/jobs/{job.id}"}


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "body_too_large",
        f"the body is larger than the limit of {limit} bytes",
        {"limit": limit},
    )


def _json_type(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON (and the stored JSON columns) do not.
    raise json.JSONDecodeError(f"{name} is not valid JSON", name, 0)


def _looks_like_job_id(text: str) -> bool:
    return len(text) == 26 and text.isascii() and text.isalnum()


async def _on_jobserver_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, JobServerError)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    if status == 503:
        log.error("storage error on %s %s: %s", request.method, request.url.path, exc.details)
        return error_response(status, exc, {"Retry-After": "5"})
    return error_response(status, exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {
        404: f"no route for {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    error = JobServerError(
        message.get(exc.status_code, str(exc.detail)), code=codes.get(exc.status_code, "http_error")
    )
    return error_response(exc.status_code, error, exc.headers)


async def _on_unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        500, JobServerError("internal error; see the server log", code="internal_error")
    )
