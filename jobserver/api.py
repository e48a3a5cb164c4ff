"""The HTTP API: JSON in, JSON out, every error in one envelope.

Handlers only change stored state and wake the scheduler; they never start or signal a
process (the scheduler does, from the stored state).  Every error, on every route, is
``{"error": {"code", "message", "details"}}`` with a status code from ``STATUS``.

Authentication and scopes are not handled here: ``access.AccessMiddleware`` answers
401/403/429 before a handler runs and leaves the caller in the request; handlers only use
it to record a job's owner and to restrict a client token to its own jobs.  Request
bounds (``InputLimits``) are checked before anything is stored.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import mimetypes
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Match, Route

from jobserver import __version__, dashboard
from jobserver.access import principal_of
from jobserver.errors import (
    ConfigError,
    Conflict,
    Gone,
    InvalidTransition,
    JobServerError,
    NotFound,
    StorageUnavailable,
    ValidationError,
)
from jobserver.events import Events
from jobserver.jobs import (
    ARTIFACTS_DIR_NAME,
    CELERY_STATUS,
    JOB_LOG_NAME,
    MAX_PRIORITY,
    MAX_TIMEOUT,
    Job,
    JobState,
    format_timestamp,
    new_job_id,
    utcnow,
)
from jobserver.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jobserver.metrics import Metrics
from jobserver.scheduler import (
    HISTORY_INTERVAL,
    HISTORY_WINDOW,
    MachineSample,
    SystemView,
)
from jobserver.store import (
    MAX_PAGE,
    AttemptSpan,
    Changed,
    IdempotencyKey,
    JobFilter,
    NewJob,
    NodeRecord,
    Store,
    TaskBucket,
    TaskStats,
    dump_json,
)
from jobserver.tasks import Registry, Task

log = logging.getLogger("jobserver.api")

SUBMIT_FIELDS = (
    "task",
    "args",
    "priority",
    # --- lifecycle (issue 4) ---
    "max_retries",
    "timeout",
    "run_at",
    "delay",
    "depends_on",
)
MAX_DELAY = 366 * 86400.0  # seconds: the furthest a job may be scheduled ahead
MAX_DEPENDENCIES = 100
MAX_TAIL = 100_000
IDEMPOTENCY_HEADER = "idempotency-key"
BULK_FIELDS = ("task", "state", "older_than", "before", "all")
MAX_BULK_IDS = 1000  # ids a bulk answer lists; its count counts them all
ANONYMOUS_SCOPE = "anonymous"  # the Idempotency-Key scope of requests without a token
FOLLOW_POLL = 0.2  # seconds between two looks at a followed log
MAX_WAIT_SECONDS = 60  # longest ?wait= a long-polling reader may ask for
RENDERED_JOBS = 256  # jobs whose rendered document the API keeps (see ``_rendering``)
RENDERED_BYTES = 16 * 1024  # the largest rendered document it keeps
SSE_KEEPALIVE_SECONDS = 15
# Seconds a 503 asks the client to wait (storage trouble, a full queue, a draining server).
RETRY_LATER = "5"


class SchedulerPort(Protocol):
    """What the API may ask of the scheduler: nothing that starts or stops a process."""

    def wake(self) -> None: ...

    def cancel_requested(self) -> None: ...

    def waiting_reason(self, job: Job, now: datetime) -> str | None: ...

    def view(self) -> SystemView: ...

    async def starts_settled(self) -> None: ...

    async def task_figures(self) -> dict[str, dict[str, Any]]: ...

    def gpu_problem(self, task: Task) -> str | None: ...

    def history(self) -> Sequence[MachineSample]: ...


class Shutdown:
    """Whether the server is draining: from the first SIGTERM/SIGINT until it stops
    listening (server.py begins it; the endpoints read it).  Meanwhile reads are answered
    as usual and a request that would add work is refused (``refuse_new_work``)."""

    def __init__(self) -> None:
        self.since: datetime | None = None
        self.grace_ends: datetime | None = None  # running jobs still running then: requeued

    def begin(self, grace: float) -> None:
        """Safe in a signal handler (it only sets attributes); a second call changes
        nothing."""
        if self.since is None:
            now = utcnow()
            self.grace_ends = now + timedelta(seconds=grace)
            self.since = now

    def document(self) -> dict[str, str] | None:
        """``draining`` in ``GET /api/v1/system`` and in the 503: None while serving."""
        if self.since is None or self.grace_ends is None:
            return None
        return {
            "since": format_timestamp(self.since),
            "grace_ends": format_timestamp(self.grace_ends),
        }


# Applies a runtime change ({"scheduler": {...}, "tasks": {...}}) and returns what changed;
# raises ConfigError on a bad change, which then changes nothing.
Reconfigure = Callable[[Any, str], list[str]]


class ApiError(JobServerError):
    """An HTTP-level problem with the request itself (not with its content)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, details, code=code)
        self.status = status
        self.headers = headers


@dataclass(frozen=True)
class InputLimits:
    """Bounds on what a request may carry (server.max_* in the config); each refusal
    names the limit it hit."""

    max_json_depth: int = 32
    max_string_length: int = 65536
    max_array_length: int = 10000
    max_args_size: int = 256 * 1024
    max_queued: int | None = None


STATUS: dict[type[JobServerError], int] = {
    ValidationError: 422,
    Gone: 410,  # before NotFound, of which it is a kind
    NotFound: 404,
    InvalidTransition: 409,
    Conflict: 409,
    StorageUnavailable: 503,
}


# Built once: json.dumps/loads with any option build a new encoder/decoder per call, which
# the issue 6 profiles showed on every request.
_RENDER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


class JSONDocument(JSONResponse):
    def render(self, content: Any) -> bytes:
        return _RENDER.encode(content).encode()


def error_response(
    status: int, error: JobServerError, headers: Mapping[str, str] | None = None
) -> Response:
    return JSONDocument({"error": error.to_dict()}, status_code=status, headers=headers)


@dataclass(frozen=True)
class Api:
    """What the endpoints work with: built once by ``create_app``; an endpoint finds it
    as ``request.app.api``."""

    store: Store
    registry: Registry
    scheduler: SchedulerPort
    events: Events
    metrics: Metrics
    limits: InputLimits
    max_body_size: int
    jobs_dir: Path | None
    max_retries_limit: int
    idempotency_window: float
    reconfigure: Reconfigure | None
    # The /openapi.json document as the server is configured now (it describes security
    # only while the server asks for tokens, which `jobserver token create` can change).
    openapi: Callable[[], Mapping[str, Any]]
    shutdown: Shutdown
    # Several nodes sharing PostgreSQL: how long a node may be silent before it counts as
    # dead; None on SQLite (one server, shown as one node).
    node_timeout: float | None = None
    # Recently answered jobs, rendered (see ``_rendering``).
    rendered: dict[str, tuple[Job, bytes, bytes, str]] = field(default_factory=dict)


class App(Starlette):
    """The app, carrying its ``Api``.  An attribute rather than ``app.state.api``: State's
    lookup (``__getattr__`` after a failed one) took 0.5 us a request, 2% of a poll."""

    def __init__(self, api: Api, **options: Any) -> None:
        super().__init__(**options)
        self.api = api


def create_app(
    *,
    store: Store,
    registry: Registry,
    scheduler: SchedulerPort,
    max_body_size: int,
    openapi: Callable[[], Mapping[str, Any]],
    metrics: Metrics,
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
    jobs_dir: Path | None = None,
    max_retries_limit: int = 10,
    idempotency_window: float = 86400.0,
    limits: InputLimits | None = None,
    reconfigure: Reconfigure | None = None,
    events: Events | None = None,
    shutdown: Shutdown | None = None,
    node_timeout: float | None = None,
) -> App:
    api = Api(
        store=store,
        registry=registry,
        scheduler=scheduler,
        events=events or Events(),
        metrics=metrics,
        limits=limits or InputLimits(),
        max_body_size=max_body_size,
        jobs_dir=jobs_dir,
        max_retries_limit=max_retries_limit,
        idempotency_window=idempotency_window,
        reconfigure=reconfigure,
        openapi=openapi,
        shutdown=shutdown or Shutdown(),
        node_timeout=node_timeout,
    )
    return App(
        api,
        # The tasks' own submit routes first: each route passed costs a regex match.
        routes=[*tutorial_routes(registry), *routes],
        exception_handlers={
            JobServerError: _on_jobserver_error,
            HTTPException: _on_http_error,
            Exception: _on_unexpected_error,
        },
        lifespan=lifespan,
    )


# -- endpoints -------------------------------------------------------------------------


async def healthz(request: Request) -> Response:
    await request.app.api.store.active_counts()
    return JSONDocument({"status": "ok", "version": __version__})


async def readyz(request: Request) -> Response:
    """Readiness: as ``healthz``, but 503 while the server drains, so that a load balancer
    sends new work elsewhere (``healthz``, liveness, stays 200: the server still serves)."""
    refuse_new_work(request.app.api)
    return await healthz(request)


async def submit_job(request: Request) -> Response:
    api: Api = request.app.api
    refuse_new_work(api)
    body = await _read_json(api, request)
    problems = _unknown_fields(
        body, SUBMIT_FIELDS, '{"task": "NAME", "args": {...}, "priority": 0}'
    )
    name = body.get("task")
    if not isinstance(name, str):
        problems.append({"field": "task", "message": "required: the name of a task"})
    priority = body.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
        problems.append(
            {
                "field": "priority",
                "message": f"expected an integer from -{MAX_PRIORITY} to {MAX_PRIORITY}",
            }
        )
    options = submit_options(body, problems, api.max_retries_limit)
    if problems:
        raise ValidationError("invalid job submission", problems)
    assert isinstance(name, str)
    job, created = await _submit(
        api, request, api.registry.get(name), body.get("args", {}), priority, options, body
    )
    # A new job is not polled through this Job object: nothing to remember.
    return _answer(api, job, 202 if created else 200, _location(job), remember=False)


async def list_jobs(request: Request) -> Response:
    api: Api = request.app.api
    params = request.query_params
    problems = _unknown_query(params, ("state", "task", "limit", "cursor"))
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
    found = await api.store.page(
        state=state,
        task=params.get("task"),
        limit=limit + 1,
        before=cursor,
        owner=_owner(request),
    )
    page = found[:limit]
    next_cursor = page[-1].id if len(found) > limit else None
    return JSONDocument({"jobs": [_document(api, job) for job in page], "next_cursor": next_cursor})


async def get_job(request: Request) -> Response:
    api: Api = request.app.api
    job_id = request.path_params["job_id"]
    wait = _wait_seconds(request)
    if wait is None:
        job = await api.store.get(job_id, owner=_owner(request))
    else:
        job = await _long_poll(
            api, job_id, request.headers.get("if-none-match"), wait, _owner(request)
        )
    return _answer(api, job)


async def cancel_job(request: Request) -> Response:
    api: Api = request.app.api
    change = await api.store.request_cancel(
        request.path_params["job_id"], utcnow(), owner=_owner(request)
    )
    job = change.job
    api.scheduler.cancel_requested()
    if job.state is JobState.CANCELLED:
        api.events.transition(job, change.source, reason=job.reason)
        for dependent in change.cascaded:
            api.events.transition(dependent, JobState.QUEUED, reason=dependent.reason)
    else:
        api.events.changed(job.id)
        log.info("job %s (%s): cancel requested while %s", job.id, job.task, job.state.value)
    return _answer(api, job, 200 if job.state.terminal else 202)


async def task_status(request: Request) -> Response:
    api: Api = request.app.api
    job = await api.store.get(request.path_params["task_id"], owner=_owner(request))
    return JSONDocument(
        celery_document(job, api.scheduler.waiting_reason(job, utcnow())),
        headers=_poll_headers(job, _rendering(api, job)[2]),
    )


async def list_tasks(request: Request) -> Response:
    api: Api = request.app.api
    figures = await api.scheduler.task_figures()
    described = []
    for task in api.registry:
        document = task.describe()
        document.update(figures.get(task.name, {}))
        described.append(document)
    return JSONDocument({"tasks": described})


async def system(request: Request) -> Response:
    return JSONDocument(await _system(request.app.api))


async def change_system(request: Request) -> Response:
    # Changes how the whole server behaves: the admin scope guards it (openapi.OPERATIONS).
    api: Api = request.app.api
    body = await _read_json(api, request)
    if api.reconfigure is None:
        raise ApiError(405, "method_not_allowed", "this server cannot be changed at run time")
    try:
        changed = api.reconfigure(body, "PATCH /api/v1/system")
    except ConfigError as exc:
        raise ValidationError(exc.message, exc.details) from None
    api.scheduler.wake()
    api.events.settings_changed()
    return JSONDocument({"changed": changed, "system": await _system(api)})


# --- lifecycle (issue 4) ---


async def retry_job(request: Request) -> Response:
    api: Api = request.app.api
    refuse_new_work(api)
    job_id, owner = request.path_params["job_id"], _owner(request)
    change = await api.store.retry(job_id, utcnow(), owner=owner)
    job = change.job
    api.scheduler.wake()
    api.events.transition(job, change.source, reason=job.reason)
    return JSONDocument(_document(api, job), status_code=202, headers=_location(job))


async def cancel_jobs(request: Request) -> Response:
    api: Api = request.app.api
    match = await _bulk_filter(api, request, (JobState.QUEUED, JobState.RUNNING))
    changes = await api.store.cancel_matching(match, utcnow())
    flagged = False
    for change in changes:
        job = change.job
        if job.state is JobState.CANCELLED:
            api.events.transition(job, change.source, reason=job.reason)
            for dependent in change.cascaded:
                api.events.transition(dependent, JobState.QUEUED, reason=dependent.reason)
        else:
            flagged = True
            api.events.changed(job.id)
    if flagged:
        api.scheduler.cancel_requested()
    log.info("bulk cancel: %d jobs changed", len(changes))
    return JSONDocument(_bulk_answer(changes))


async def retry_jobs(request: Request) -> Response:
    api: Api = request.app.api
    refuse_new_work(api)
    match = await _bulk_filter(api, request, (JobState.FAILED, JobState.CANCELLED))
    changes = await api.store.retry_matching(match, utcnow())
    for change in changes:
        api.events.transition(change.job, change.source, reason=change.job.reason)
    if changes:
        api.scheduler.wake()
    log.info("bulk retry: %d jobs requeued", len(changes))
    return JSONDocument(_bulk_answer(changes))


async def _bulk_filter(api: Api, request: Request, allowed: tuple[JobState, ...]) -> JobFilter:
    """The filter of a bulk cancel or retry body, checked: at least one criterion, or
    ``"all": true``, so that an empty body never touches every job by accident."""
    body = await _read_json(api, request)
    problems = _unknown_fields(body, BULK_FIELDS, '{"task": "NAME", "state": "queued"}')
    task = body.get("task")
    # "task": null is no criterion: refused, so it never selects every job
    if "task" in body and not (isinstance(task, str) and task in api.registry):
        problems.append({"field": "task", "message": "expected the name of a registered task"})
    states: tuple[JobState, ...] = ()
    if "state" in body:
        given = body["state"] if isinstance(body["state"], list) else [body["state"]]
        names = [state.value for state in allowed]
        if given and all(isinstance(name, str) and name in names for name in given):
            states = tuple(JobState(name) for name in given)
        else:
            problems.append(
                {"field": "state", "message": f"expected one or a list of {', '.join(names)}"}
            )
    cutoffs: list[datetime] = []
    if "older_than" in body:
        value = body["older_than"]
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 1e10:
            cutoffs.append(utcnow() - timedelta(seconds=value))
        else:
            problems.append({"field": "older_than", "message": "expected seconds, >= 0"})
    if "before" in body:
        moment = _parse_run_at(body["before"])
        if moment is None:
            problems.append(
                {"field": "before", "message": "expected an ISO 8601 time with a UTC offset"}
            )
        else:
            cutoffs.append(moment)
    everything = body.get("all", False)
    if not isinstance(everything, bool):
        problems.append({"field": "all", "message": "expected true or false"})
    elif not everything and not problems and not (set(body) - {"all"}):
        problems.append(
            {
                "field": "body",
                "message": "give at least one of task, state, older_than, before; "
                'or "all": true to mean every job',
            }
        )
    if problems:
        raise ValidationError("invalid filter", problems)
    return JobFilter(
        task=task,
        states=states,
        created_before=min(cutoffs) if cutoffs else None,
        owner=_owner(request),
    )


def _unknown_fields(body: Any, allowed: tuple[str, ...], example: str) -> list[dict[str, str]]:
    """A problem for each field of ``body`` not in ``allowed``; raises unless ``body`` is
    a JSON object (``example`` shows one)."""
    if not isinstance(body, dict):
        raise ValidationError(
            f"the body must be a JSON object like {example}",
            [{"field": "body", "message": f"expected an object, got {_json_type(body)}"}],
        )
    return [
        {"field": key, "message": f"unknown field; allowed: {', '.join(allowed)}"}
        for key in body
        if key not in allowed
    ]


def _bulk_answer(changes: list[Changed]) -> dict[str, Any]:
    ids = [change.job.id for change in changes]
    cascaded = [job.id for change in changes for job in change.cascaded]
    return {
        "count": len(ids),
        "ids": ids[:MAX_BULK_IDS],
        "truncated": len(ids) > MAX_BULK_IDS,
        "cascaded": len(cascaded),
    }


async def job_logs(request: Request) -> Response:
    api: Api = request.app.api
    params = request.query_params
    problems = _unknown_query(params, ("tail", "follow"))
    tail = None
    if "tail" in params:
        text = params["tail"]
        if text.isdigit() and 0 <= int(text) <= MAX_TAIL:
            tail = int(text)
        else:
            problems.append(
                {"field": "tail", "message": f"expected an integer from 0 to {MAX_TAIL}"}
            )
    follow = params.get("follow", "0")
    if follow not in ("0", "1", "true", "false"):
        problems.append({"field": "follow", "message": "expected 1 or 0"})
    if problems:
        raise ValidationError("invalid query", problems)
    job = await api.store.get(request.path_params["job_id"], owner=_owner(request))
    path = _job_path(api, job.id, JOB_LOG_NAME)
    text, offset = _read_log(path, tail)
    if follow not in ("1", "true") or job.state.terminal:
        return PlainTextResponse(text)
    return StreamingResponse(
        _follow_log(api, job.id, path, text, offset), media_type="text/plain; charset=utf-8"
    )


async def job_artifact(request: Request) -> Response:
    api: Api = request.app.api
    job = await api.store.get(request.path_params["job_id"], owner=_owner(request))
    name = request.path_params["name"]
    listed = {artifact.name: artifact for artifact in job.artifacts}
    if not _safe_name(name) or name not in listed:
        raise NotFound(
            f"job {job.id} has no artifact {name!r}",
            {"id": job.id, "name": name, "artifacts": sorted(listed)},
        )
    directory = _job_path(api, job.id, ARTIFACTS_DIR_NAME)
    try:
        # O_NOFOLLOW: a symlink planted under the listed name is refused, never followed.
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        raise NotFound(
            f"artifact {name!r} of job {job.id} is no longer on disk", {"id": job.id}
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise NotFound(f"job {job.id} has no artifact {name!r}", {"id": job.id})
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return StreamingResponse(
        _file_chunks(fd),
        media_type=media_type,
        headers={
            "Content-Length": str(info.st_size),
            "X-Checksum-Sha256": listed[name].sha256,
        },
    )


# Issue 7: long polling's stream twin, statistics, metrics and the web page.


async def job_events(request: Request) -> Response:
    """Server-Sent Events: the job document now and at every change, then ``end``."""
    api: Api = request.app.api
    job_id = request.path_params["job_id"]
    owner = _owner(request)
    await api.store.get(job_id, owner=owner)  # a 404 before the stream starts

    async def stream() -> Any:
        yield "retry: 2000\n\n"
        sent = None
        keepalive = time.monotonic() + SSE_KEEPALIVE_SECONDS
        while True:
            with api.events.subscription(job_id) as changed:
                try:
                    job = await api.store.get(job_id, owner=owner)
                except NotFound:
                    return
                tag = _rendering(api, job)[2]
                if tag != sent:
                    sent = tag
                    data = json.dumps(_document(api, job), ensure_ascii=False)
                    yield f"event: job\nid: {tag}\ndata: {data}\n\n"
                    keepalive = time.monotonic() + SSE_KEEPALIVE_SECONDS
                if job.state.terminal:
                    yield "event: end\ndata: {}\n\n"
                    return
                if api.events.closing:  # the server stops; EventSource reconnects
                    return
                try:
                    patience = api.events.patience(keepalive - time.monotonic())
                    await asyncio.wait_for(changed, max(0.0, patience))
                except TimeoutError:
                    if time.monotonic() >= keepalive:
                        yield ": keepalive\n\n"
                        keepalive = time.monotonic() + SSE_KEEPALIVE_SECONDS

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def stats(request: Request) -> Response:
    api: Api = request.app.api
    found = {entry.task: entry for entry in await api.store.task_stats()}
    figures = await api.scheduler.task_figures()
    names = sorted(set(found) | {task.name for task in api.registry})
    return JSONDocument(
        {
            "tasks": [
                stats_document(name, found.get(name), api.registry, figures.get(name))
                for name in names
            ]
        }
    )


async def metrics_endpoint(request: Request) -> Response:
    api: Api = request.app.api
    store = api.store
    body = api.metrics.render(
        api.scheduler.view(), await store.state_counts(), (store.node, store.incarnation)
    )
    return Response(body, media_type=METRICS_CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return JSONDocument(request.app.api.openapi())


async def start_task(task: Task, request: Request) -> Response:
    """A task's own route (the tutorial's endpoints): the body is its args."""
    api: Api = request.app.api
    refuse_new_work(api)
    body = await _read_json(api, request)
    job, created = await _submit(api, request, task, body, 0, None, body)
    headers = _location(job)
    retry_after = _retry_after(job)
    if retry_after is not None:  # not when a repeated key names a finished job
        headers["Retry-After"] = retry_after
    return JSONDocument(
        {"message": "task accepted; processing in the background", "task_id": job.id},
        status_code=202 if created else 200,
        headers=headers,
    )


# -- the web page and its pictures -----------------------------------------------------

TIMELINE_JOBS = 200  # jobs whose attempts the timeline shows by default
MAX_TIMELINE_JOBS = 1000
SERIES_WINDOW = 3600  # seconds of task series by default, and buckets of
SERIES_BUCKET = 60
MAX_SERIES_WINDOW = 86400  # a day, in minutes at the finest: at most 1,440 buckets
PAGE_JOBS = 100  # jobs of each list (running, queued, recent) in the page's first paint
# The integer query parameters of the pictures' endpoints: name -> (default, lowest, highest).
TIMELINE_QUERY = {"limit": (TIMELINE_JOBS, 1, MAX_TIMELINE_JOBS)}
SERIES_QUERY = {
    "window": (SERIES_WINDOW, 60, MAX_SERIES_WINDOW),
    "bucket": (SERIES_BUCKET, 60, MAX_SERIES_WINDOW),
}


async def system_history(request: Request) -> Response:
    _query_integers(request, {})
    return JSONDocument(history_document(request.app.api.scheduler.history()))


async def timeline(request: Request) -> Response:
    (limit,) = _query_integers(request, TIMELINE_QUERY)
    spans = await request.app.api.store.recent_attempts(limit, owner=_owner(request))
    return JSONDocument(timeline_document(spans))


async def stats_history(request: Request) -> Response:
    window, bucket = _query_integers(request, SERIES_QUERY)
    return JSONDocument(await _series(request.app.api, window, bucket))


async def page(request: Request) -> Response:
    """The web page, carrying what its first paint shows when the caller may see it
    (an open server: a browser's page request carries no token)."""
    api: Api = request.app.api
    snapshot = None
    if principal_of(request.scope).allows("admin"):
        snapshot = _RENDER.encode(await _page_snapshot(api)).encode()
    return Response(
        dashboard.render_page(snapshot),
        media_type="text/html; charset=utf-8",
        headers=dashboard.SECURITY_HEADERS,
    )


async def _page_snapshot(api: Api) -> dict[str, Any]:
    """What the page's script reads from the API, read once, for the first paint."""
    running = await api.store.page(state=JobState.RUNNING, limit=PAGE_JOBS)
    queued = await api.store.page(state=JobState.QUEUED, limit=PAGE_JOBS)
    recent = await api.store.page(limit=PAGE_JOBS)
    spans = await api.store.recent_attempts(TIMELINE_JOBS)
    system = await _system(api)
    return {
        "system": system,
        "running": [_document(api, job) for job in running],
        "queued": [_document(api, job) for job in queued],
        "recent": [_document(api, job) for job in recent],
        "tasks": api.registry.names(),
        "history": history_document(api.scheduler.history()),
        "timeline": timeline_document(spans),
        "series": await _series(api, SERIES_WINDOW, SERIES_BUCKET),
        "metrics": api.metrics.render(
            api.scheduler.view(),
            await api.store.state_counts(),
            (api.store.node, api.store.incarnation),
        ).decode(),
    }


async def _series(api: Api, window: int, bucket: int) -> dict[str, Any]:
    now = utcnow()
    # Buckets on whole multiples of ``bucket`` since the epoch: they stay put between reads.
    start = (
        math.floor(now.timestamp() / bucket) * bucket - (math.ceil(window / bucket) - 1) * bucket
    )
    since = datetime.fromtimestamp(start, tz=now.tzinfo)
    found = await api.store.task_series(since, bucket)
    return series_document(found, since, now, bucket)


def _query_integers(request: Request, allowed: Mapping[str, tuple[int, int, int]]) -> list[int]:
    """The query's integers, each (default, lowest, highest) in ``allowed``, in that
    order; any other parameter, or a value out of bounds, is a 422 naming each."""
    params = request.query_params
    problems = _unknown_query(params, tuple(allowed))
    values = []
    for name, (default, lowest, highest) in allowed.items():
        text = params.get(name)
        if text is None:
            values.append(default)
        elif text.isdigit() and lowest <= int(text) <= highest:
            values.append(int(text))
        else:
            message = f"expected an integer from {lowest} to {highest}"
            problems.append({"field": name, "message": message})
    if problems:
        raise ValidationError("invalid query", problems)
    return values


def history_document(samples: Sequence[MachineSample]) -> dict[str, Any]:
    """``GET /api/v1/system/history``: the machine's samples, oldest first."""
    return {
        "interval": HISTORY_INTERVAL,
        "window": HISTORY_WINDOW,
        "samples": [
            {
                "at": format_timestamp(sample.at),
                "cpu": asdict(sample.cpu),
                "memory": asdict(sample.memory),
                "running": sample.running,
                "overload": sample.overload,
            }
            for sample in samples
        ],
    }


def timeline_document(spans: Sequence[AttemptSpan]) -> dict[str, Any]:
    """``GET /api/v1/timeline``: attempts by start time."""
    return {
        "now": format_timestamp(utcnow()),
        "attempts": [
            {
                "job_id": span.job_id,
                "task": span.task,
                "attempt": span.attempt,
                "started_at": format_timestamp(span.started_at),
                "finished_at": _time(span.finished_at),
                "outcome": span.outcome,
                "state": span.state.value,
                "node": span.node,
            }
            for span in spans
        ],
    }


def series_document(
    found: Mapping[str, Sequence[TaskBucket]], since: datetime, now: datetime, bucket: int
) -> dict[str, Any]:
    """``GET /api/v1/stats/history``: per task, its non-empty buckets, oldest first."""
    return {
        "since": format_timestamp(since),
        "now": format_timestamp(now),
        "bucket": bucket,
        "tasks": [
            {
                "task": task,
                "buckets": [
                    {
                        "start": format_timestamp(entry.start),
                        "finished": entry.finished,
                        "succeeded": entry.succeeded,
                        "failed": entry.failed,
                        "cancelled": entry.cancelled,
                        "duration_p50": entry.duration_p50,
                        "duration_p95": entry.duration_p95,
                    }
                    for entry in buckets
                ],
            }
            for task, buckets in sorted(found.items())
        ],
    }


# The API, in matching order: Starlette tries routes in order and each route passed
# costs a regex match, so the routes submitted to and polled most come first (the tasks'
# own routes, ``tutorial_routes``, precede them all); a path that fits several routes
# goes to the one whose method fits.  openapi.py describes every route.
routes: list[BaseRoute] = [
    Route("/api/v1/jobs", submit_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/api/v1/task-status/{task_id}", task_status, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/api/v1/jobs", list_jobs, methods=["GET"]),
    Route("/api/v1/jobs/cancel", cancel_jobs, methods=["POST"]),
    Route("/api/v1/jobs/retry", retry_jobs, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/tasks", list_tasks, methods=["GET"]),
    Route("/api/v1/system", system, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/retry", retry_job, methods=["POST"]),
    Route("/api/v1/jobs/{job_id}/logs", job_logs, methods=["GET"]),
    Route("/api/v1/jobs/{job_id}/artifacts/{name}", job_artifact, methods=["GET"]),
    Route("/api/v1/system", change_system, methods=["PATCH"]),
    Route("/api/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/api/v1/stats", stats, methods=["GET"]),
    Route("/metrics", metrics_endpoint, methods=["GET"]),
    Route("/api/v1/system/history", system_history, methods=["GET"]),
    Route("/api/v1/timeline", timeline, methods=["GET"]),
    Route("/api/v1/stats/history", stats_history, methods=["GET"]),
    Route("/", page, methods=["GET"]),
    *dashboard.routes(),
    Route("/openapi.json", openapi_json, methods=["GET"]),
]


def tutorial_routes(registry: Registry) -> list[BaseRoute]:
    """One submit route per task with a ``route`` (config.RESERVED_ROUTES keeps them off
    the API's paths, so their place in the list does not matter)."""
    return [
        Route(path, functools.partial(start_task, task), methods=["POST"])
        for path, task in registry.by_route().items()
    ]


# -- what the endpoints share ----------------------------------------------------------


def _document(api: Api, job: Job) -> dict[str, Any]:
    return job_document(job, api.scheduler.waiting_reason(job, utcnow()))


def _rendering(api: Api, job: Job, remember: bool = True) -> tuple[bytes, bytes, str]:
    """The job's document without waiting_reason, in the two halves around it, and the
    hash of the whole (the ETag).  The document depends on the Job's value alone, and a
    Job (frozen) equal to the one remembered is answered with what was rendered for it
    the first time: comparing costs ~1 us, rendering ~16 (issue 6: building and
    rendering the document were 12% of a poll's time)."""
    found = api.rendered.get(job.id)
    # Identity first: free, and the usual case while the store reuses decoded Jobs.
    if found is not None and (found[0] is job or found[0] == job):
        return found[1], found[2], found[3]
    before, after = _rendered_halves(job)
    tag = _version_of(_joined(before, b"null", after))
    if remember and len(before) + len(after) <= RENDERED_BYTES:
        if len(api.rendered) >= RENDERED_JOBS:
            del api.rendered[next(iter(api.rendered))]  # the oldest
        api.rendered[job.id] = (job, before, after, tag)
    return before, after, tag


def _answer(
    api: Api,
    job: Job,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    remember: bool = True,
) -> Response:
    """The job's document with its ETag and, while it is not finished, Retry-After:
    the document is the ETag's rendering with the waiting_reason put in, so one
    rendering serves both (issue 6: a submit rendered its document twice)."""
    before, after, tag = _rendering(api, job, remember)
    reason = api.scheduler.waiting_reason(job, utcnow())
    rendered_reason = b"null" if reason is None else _RENDER.encode(reason).encode()
    return Response(
        _joined(before, rendered_reason, after),
        status_code,
        {**(headers or {}), **_poll_headers(job, tag)},
        media_type=JSONDocument.media_type,
    )


async def _read_json(api: Api, request: Request) -> Any:
    limits, max_body_size = api.limits, api.max_body_size
    content_type = _header(request, b"content-type") or ""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON with 'Content-Type: application/json'",
            {"content_type": content_type or None},
        )
    declared = _header(request, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body_size:
        raise _too_large(max_body_size)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_size:
            raise _too_large(max_body_size)
    try:
        value = _PARSE.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        # Too deep for the parser itself (and so far past max_json_depth).
        raise ApiError(
            400,
            "malformed_json",
            "the body's JSON is nested too deeply "
            f"(the limit, max_json_depth, is {limits.max_json_depth})",
            {"limit": "max_json_depth", "value": limits.max_json_depth},
        ) from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8", str(exc)) from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            "malformed_json",
            f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            {"line": exc.lineno, "column": exc.colno},
        ) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ApiError(400, "malformed_json", f"the body's JSON is unusable: {exc}") from None
    if not _within_limits(body, limits):
        check_json_limits(value, limits)
    return value


async def _submit(
    api: Api,
    request: Request,
    task: Task,
    args: Any,
    priority: int,
    options: dict[str, Any] | None = None,
    body: Any = None,
) -> tuple[Job, bool]:
    """Validate and store a job; (job, created).  created is False when an
    Idempotency-Key named an earlier submit of the same body."""
    options = options or {}
    limits = api.limits
    owner = principal_of(request.scope).name
    key = _idempotency_key(api, request, body, owner)
    validated = task.validate(args)
    problem = api.scheduler.gpu_problem(task)
    if problem is not None:
        raise ValidationError(problem, {"task": task.name, "gpus": task.settings.gpus})
    size = len(dump_json(validated).encode())
    if size > limits.max_args_size:
        raise ApiError(
            413,
            "args_too_large",
            f"the job's args take {size} bytes as JSON; the limit (max_args_size) is "
            f"{limits.max_args_size} bytes: pass a reference (a path, a URL) instead",
            {"limit": "max_args_size", "value": limits.max_args_size, "size": size},
        )
    if limits.max_queued is not None:
        queued = (await api.store.active_counts())[JobState.QUEUED.value]
        if queued >= limits.max_queued:
            raise ApiError(
                503,
                "queue_full",
                f"{queued} jobs are queued, the limit (max_queued) is {limits.max_queued}; "
                "retry later",
                {"limit": "max_queued", "value": limits.max_queued, "queued": queued},
                {"Retry-After": RETRY_LATER},
            )
    now = utcnow()
    max_retries = options.get("max_retries", task.settings.max_retries)
    run_after = options.get("run_at")
    if "delay" in options:
        run_after = now + timedelta(seconds=options["delay"])
    new = NewJob(
        task.name,
        validated,
        priority,
        max_retries,
        timeout=options.get("timeout"),
        run_after=run_after,
        depends_on=tuple(options.get("depends_on", ())),
        idempotency=key,
        owner=owner,
    )
    change, created = await api.store.submit(new, new_job_id(), now, owner=_owner(request))
    job = change.job
    if created:
        # A job not due yet needs no tick now: the queue head leaves it out until
        # run_after, and the scheduler's poll_interval tick picks it up from then.
        if run_after is None or run_after <= now:
            api.scheduler.wake()
        api.events.transition(job, None)
        if job.state is JobState.CANCELLED:  # a dependency had already failed
            api.events.transition(job, JobState.QUEUED, reason=job.reason)
    return job, created


def _idempotency_key(
    api: Api, request: Request, body: Any, owner: str | None
) -> IdempotencyKey | None:
    text = _header(request, IDEMPOTENCY_HEADER.encode())
    if text is None:
        return None
    if not (1 <= len(text) <= 255 and text.isascii() and text.isprintable()):
        raise ValidationError(
            "invalid Idempotency-Key header",
            [
                {
                    "field": "Idempotency-Key",
                    "message": "expected 1 to 255 printable ASCII characters "
                    "(a UUID is a good choice)",
                }
            ],
        )
    canonical = json.dumps(
        {"path": request.url.path, "body": body}, sort_keys=True, separators=(",", ":")
    )
    return IdempotencyKey(
        owner or ANONYMOUS_SCOPE,  # keys are per client: one token cannot see another's
        text,
        hashlib.sha256(canonical.encode()).hexdigest(),
        api.idempotency_window,
    )


async def _long_poll(
    api: Api, job_id: str, baseline: str | None, wait: float, owner: str | None
) -> Job:
    """The job as soon as its version differs from ``baseline`` (the client's
    If-None-Match, else the version when the request came), when it is finished, or
    after ``wait`` seconds.  Reads the row only when the job's events say it changed."""
    deadline = time.monotonic() + wait
    while True:
        with api.events.subscription(job_id) as changed:
            # After subscribing: no change is missed.
            job = await api.store.get(job_id, owner=owner)
            tag = _rendering(api, job)[2]
            baseline = baseline or tag
            remaining = deadline - time.monotonic()
            if tag != baseline or job.state.terminal or remaining <= 0 or api.events.closing:
                return job
            try:
                await asyncio.wait_for(changed, api.events.patience(remaining))
            except TimeoutError:
                # On a shared database another node's change may come without a notice
                # here: read again every recheck, until the wait is over.
                if time.monotonic() >= deadline:
                    return job


async def _system(api: Api) -> dict[str, Any]:
    await api.scheduler.starts_settled()  # a job shown running in the store is in the view
    view = api.scheduler.view()
    nodes = (
        [local_node(view, api.store.node)]
        if api.node_timeout is None
        else [node_document(node) for node in await api.store.nodes(api.node_timeout)]
    )
    return system_document(view, await api.store.active_counts(), api.shutdown.document(), nodes)


def node_document(node: NodeRecord) -> dict[str, Any]:
    """One node incarnation in ``GET /api/v1/system``'s ``nodes``."""
    published = node.resources
    return {
        "name": node.name,
        "incarnation": node.incarnation,
        "alive": node.alive,
        "leader": node.leader,
        "started_at": format_timestamp(node.started_at),
        "last_heartbeat": format_timestamp(node.heartbeat_at),
        "heartbeat_age": round(node.heartbeat_age, 3),
        "dead_at": None if node.dead_at is None else format_timestamp(node.dead_at),
        "url": node.url,
        "capacity": published.get("capacity"),
        "free": published.get("free"),
        "max_jobs": published.get("max_jobs"),
        "running": node.running,
        "cordoned": node.cordoned,
    }


def local_node(view: SystemView, name: str) -> dict[str, Any]:
    """The one server of a SQLite database, as a node: alive while it answers."""
    return {
        "name": name,
        "incarnation": name,
        "alive": True,
        "leader": True,
        "started_at": None,
        "last_heartbeat": None,
        "heartbeat_age": None,
        "dead_at": None,
        "url": None,
        "capacity": asdict(view.capacity),
        "free": asdict(view.free),
        "max_jobs": view.max_jobs,
        "running": len(view.running),
        "cordoned": False,
    }


def refuse_new_work(api: Api) -> None:
    """While the server drains, refuse what would add work (a submit, a retry): it would
    not run before the stop.  503 with Retry-After: a restarted server, or another one
    behind the same address, takes it."""
    draining = api.shutdown.document()
    if draining is not None:
        raise ApiError(
            503,
            "draining",
            "the server is shutting down: it finishes its running jobs and accepts no new "
            f"work; retry in {RETRY_LATER} s or more (a restarted server will take it)",
            draining,
            {"Retry-After": RETRY_LATER},
        )


def _job_path(api: Api, job_id: str, *parts: str) -> Path:
    if api.jobs_dir is None or not _looks_like_job_id(job_id):
        raise NotFound(f"no job with id {job_id!r}", {"id": job_id})
    return api.jobs_dir.joinpath(job_id, *parts)


async def _follow_log(
    api: Api, job_id: str, path: Path, first: str, offset: int
) -> AsyncIterator[bytes]:
    yield first.encode()
    while True:
        done = (await api.store.get(job_id)).state.terminal
        chunk, offset = _read_from(path, offset)
        if chunk:
            yield chunk
        if done or api.events.closing:  # the server stops: it must not wait for a reader
            return
        await asyncio.sleep(FOLLOW_POLL)


def job_document(job: Job, waiting_reason: str | None) -> dict[str, Any]:
    document, after = _document_halves(job)
    document["waiting_reason"] = waiting_reason
    document.update(after)
    return document


def _document_halves(job: Job) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's document before and after its waiting_reason, which alone depends on
    the scheduler rather than the job."""
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
    }, {
        "run_after": _time(job.run_after),
        "cancel_requested": job.cancel_requested,
        "exit_code": job.exit_code,
        "peak_rss": job.peak_rss,
        "cpu_seconds": job.cpu_seconds,
        # --- lifecycle (issue 4) ---
        "timeout": job.timeout,
        "depends_on": list(job.depends_on),
        "progress": _progress(job),
        "artifacts": [{"name": a.name, "size": a.size, "sha256": a.sha256} for a in job.artifacts],
        "history": [
            {
                "attempt": a.attempt,
                "started_at": format_timestamp(a.started_at),
                "finished_at": _time(a.finished_at),
                "outcome": a.outcome,
                "error": None if a.error is None else {"type": a.error_type, "message": a.error},
                "exit_code": a.exit_code,
                "node": a.node,  # the node that ran it ("local" on SQLite)
            }
            for a in job.history
        ],
        "owner": job.owner,
        "schedule": None
        if job.schedule is None
        else {"name": job.schedule, "slot": _time(job.schedule_slot)},
    }


def _rendered_halves(job: Job) -> tuple[bytes, bytes]:
    """The rendered document (as a body is) cut around its waiting_reason: ``{"id":...,
    "reason":...`` and ``"run_after":...}``; ``_joined`` puts a rendered reason between."""
    before, after = _document_halves(job)
    return _RENDER.encode(before).encode()[:-1], _RENDER.encode(after).encode()[1:]


def _joined(before: bytes, rendered_reason: bytes, after: bytes) -> bytes:
    return b"".join((before, b',"waiting_reason":', rendered_reason, b",", after))


def _progress(job: Job) -> dict[str, Any] | None:
    if job.progress is None:
        return None
    return {
        "fraction": job.progress.fraction,
        "message": job.progress.message,
        "updated_at": format_timestamp(job.progress.updated_at),
    }


def submit_options(
    body: dict[str, Any], problems: list[dict[str, str]], max_retries_limit: int
) -> dict[str, Any]:
    """The optional lifecycle fields of a submit body, checked; problems are appended."""
    options: dict[str, Any] = {}

    def number(field: str) -> float | None:
        value = body[field]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    if "max_retries" in body:
        value = body["max_retries"]
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            if value <= max_retries_limit:
                options["max_retries"] = value
            else:
                problems.append(
                    {
                        "field": "max_retries",
                        "message": f"at most {max_retries_limit} (the server's max_retries_limit)",
                    }
                )
        else:
            problems.append({"field": "max_retries", "message": "expected an integer >= 0"})
    if "timeout" in body:
        seconds = number("timeout")
        if seconds is None or not 0 < seconds <= MAX_TIMEOUT:
            problems.append(
                {"field": "timeout", "message": f"expected seconds, > 0 and <= {MAX_TIMEOUT:g}"}
            )
        else:
            options["timeout"] = seconds
    if "run_at" in body and "delay" in body:
        problems.append({"field": "delay", "message": "give run_at or delay, not both"})
    elif "delay" in body:
        seconds = number("delay")
        if seconds is None or not 0 <= seconds <= MAX_DELAY:
            problems.append(
                {"field": "delay", "message": f"expected seconds from 0 to {MAX_DELAY:g}"}
            )
        else:
            options["delay"] = seconds
    elif "run_at" in body:
        moment = _parse_run_at(body["run_at"])
        if moment is None:
            problems.append(
                {
                    "field": "run_at",
                    "message": "expected an ISO 8601 time with a UTC offset, like "
                    '"2030-01-31T03:00:00Z" or "2030-01-31T04:00:00+01:00"',
                }
            )
        elif moment - utcnow() > timedelta(seconds=MAX_DELAY):
            problems.append({"field": "run_at", "message": "at most 366 days ahead"})
        else:
            options["run_at"] = moment
    if "depends_on" in body:
        value = body["depends_on"]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append({"field": "depends_on", "message": "expected a list of job ids"})
        elif len(value) > MAX_DEPENDENCIES:
            problems.append(
                {"field": "depends_on", "message": f"at most {MAX_DEPENDENCIES} job ids"}
            )
        elif len(set(value)) != len(value):
            problems.append({"field": "depends_on", "message": "a job id is listed twice"})
        elif bad := [item for item in value if not _looks_like_job_id(item)]:
            problems.append({"field": "depends_on", "message": f"not a job id: {bad[0]!r}"})
        else:
            options["depends_on"] = value
    return options


def _parse_run_at(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment


def _read_log(path: Path, tail: int | None) -> tuple[str, int]:
    """The log (or its last ``tail`` lines) and the number of bytes read, where a follow
    goes on from."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "", 0
    text = data.decode(errors="replace")
    if tail is not None:
        text = "".join(text.splitlines(keepends=True)[-tail:]) if tail else ""
    return text, len(data)


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            data = file.read(1 << 20)
    except FileNotFoundError:
        return b"", offset
    return data, offset + len(data)


def _safe_name(name: str) -> bool:
    """One plain file name: no separators, no '.'/'..', no NUL, not hidden-absolute."""
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
    )


async def _file_chunks(fd: int) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(os.read, fd, 1 << 20):
            yield chunk
    finally:
        os.close(fd)


def job_version(job: Job) -> str:
    """A short tag that changes whenever the job document does (state, progress, flags,
    attempts…), except ``waiting_reason``, which the scheduler rewrites without an event:
    a hash of the document without it, rendered as a body is.  Sent as the ETag; a
    long-polling client sends it back in If-None-Match.  (``_rendering`` gives the
    same, remembered.)"""
    return _version_of(_RENDER.encode(job_document(job, None)).encode())


def _version_of(rendered: bytes) -> str:
    return f'"{hashlib.blake2b(rendered, digest_size=8).hexdigest()}"'


def _poll_headers(job: Job, tag: str) -> dict[str, str]:
    """The ETag (``tag``); Retry-After (seconds) while the job is not finished: when a
    queued retry is due, else 1."""
    headers = {"ETag": tag}
    retry_after = _retry_after(job)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return headers


def _retry_after(job: Job) -> str | None:
    if job.state.terminal:
        return None
    delay = 1
    if job.run_after is not None:
        due = (job.run_after - utcnow()).total_seconds()
        delay = int(min(MAX_WAIT_SECONDS, max(1, due)))
    return str(delay)


def _wait_seconds(request: Request) -> float | None:
    if not request.scope["query_string"]:  # a plain poll: no query to parse
        return None
    params = request.query_params
    # Refused like the listing's and the logs' unknown parameters: a misspelt ``wiat``
    # silently answering at once would pass for a long poll that found a change.
    problems = _unknown_query(params, ("wait",))
    text = params.get("wait")
    wait = None
    if text is not None:
        try:
            wait = float(text)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT_SECONDS:  # also rejects nan
            message = f"expected a number of seconds from 0 to {MAX_WAIT_SECONDS}"
            problems.append({"field": "wait", "message": message})
    if problems:
        raise ValidationError("invalid query", problems)
    return wait


def _unknown_query(params: Mapping[str, str], allowed: tuple[str, ...]) -> list[dict[str, str]]:
    """A problem for each query parameter not in ``allowed``."""
    return [
        {"field": key, "message": "unknown query parameter"}
        for key in sorted(set(params) - set(allowed))
    ]


def stats_document(
    name: str,
    stats: TaskStats | None,
    registry: Registry,
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One task's entry in ``GET /api/v1/stats``; ``figures`` is the scheduler's view of
    the task (``task_figures``): what admission really reserves, beside the config."""
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
        "learned_memory": figures["learned"]["memory"] if figures else None,
        "scheduled_with": dict(figures["scheduled_with"]) if figures else None,
    }


def system_document(
    view: SystemView,
    jobs: Mapping[str, int],
    draining: Mapping[str, str] | None = None,
    nodes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``GET /api/v1/system``: the scheduler's view, the active jobs by state, whether
    the server is draining (``Shutdown.document``) and the nodes (``node_document``)."""
    machine = view.machine
    return {
        "draining": None if draining is None else dict(draining),
        "capacity": asdict(view.capacity),
        "reserved": asdict(view.reserved),
        "free": asdict(view.free),
        "machine": {
            "cpu_capacity": machine.cpu_capacity,
            "cpu_idle": machine.cpu_idle,
            "memory_capacity": machine.memory_capacity,
            "memory_available": machine.memory_available,
            "memory_pressure": machine.memory_pressure,
            "cpu_pressure": machine.cpu_pressure,
            "sources": dict(machine.sources),
        },
        # Every reading admission uses, with where it came from.
        "signals": asdict(view.signals),
        "overload": view.overload,
        "held": list(view.held),
        "settings": asdict(view.settings),
        "memory_limits": view.memory_limits,
        "gpus": None if view.gpus is None else [asdict(gpu) for gpu in view.gpus],
        "max_jobs": view.max_jobs,
        "fork_server": None if view.fork_server is None else dict(view.fork_server),
        "running": [asdict(job) for job in view.running],
        "queue_head": [asdict(job) for job in view.queue_head],
        "jobs": jobs,
        "nodes": [dict(node) for node in nodes],
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
    elif job.state is JobState.RUNNING and job.progress is not None:
        # Celery's custom states carry their meta in ``info``; so does our progress.
        body["info"] = {"fraction": job.progress.fraction, "message": job.progress.message}
    return body


def _owner(request: Request) -> str | None:
    """The owner a request is restricted to: its token's name, or None for an admin token
    (or an open server without tokens)."""
    return principal_of(request.scope).owner_filter


def check_json_limits(value: Any, limits: InputLimits) -> None:
    """Walk a parsed body once (iteratively: no recursion limit to hit) and refuse the
    first string, array, object or nesting level past its configured limit (422)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if len(item) > limits.max_string_length:
                raise _over_limit("max_string_length", limits.max_string_length, "characters")
        elif isinstance(item, list | dict):
            if depth > limits.max_json_depth:
                raise _over_limit("max_json_depth", limits.max_json_depth, "levels of nesting")
            if len(item) > limits.max_array_length:
                raise _over_limit("max_array_length", limits.max_array_length, "items")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _within_limits(body: bytes | bytearray, limits: InputLimits) -> bool:
    """True when ``body`` is too short to break any limit ``check_json_limits`` checks, so
    its JSON need not be walked (a submit's body usually is): a string of n characters
    takes at least n bytes, an array or object of n items at least 2n, and every level
    of nesting an opening bracket."""
    size = len(body)
    return (
        size <= limits.max_string_length
        and size <= 2 * limits.max_array_length
        and body.count(b"[") + body.count(b"{") <= limits.max_json_depth
    )


def _header(request: Request, name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), as ``request.headers.get`` gives
    it, without building a Headers object for each request."""
    headers: list[tuple[bytes, bytes]] = request.scope["headers"]
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def _over_limit(name: str, value: int, unit: str) -> ApiError:
    return ApiError(
        422,
        "limit_exceeded",
        f"the body exceeds {name} = {value} {unit}",
        {"limit": name, "value": value},
    )


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


# What json.loads(body, parse_constant=_reject_constant) does, with the decoder built once.
_PARSE = json.JSONDecoder(parse_constant=_reject_constant)


def _looks_like_job_id(text: str) -> bool:
    return len(text) == 26 and text.isascii() and text.isalnum()


async def _on_jobserver_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, JobServerError)
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc, exc.headers)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    if status == 503:
        log.error("storage error on %s %s: %s", request.method, request.url.path, exc.details)
        return error_response(status, exc, {"Retry-After": RETRY_LATER})
    return error_response(status, exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names only the first route on the path; a path served by
        # several routes (GET and POST /api/v1/jobs) allows the methods of all of them.
        headers = {**(headers or {}), "Allow": ", ".join(sorted(_allowed_methods(request)))}
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {
        404: f"no route for {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    error = JobServerError(
        message.get(exc.status_code, str(exc.detail)), code=codes.get(exc.status_code, "http_error")
    )
    return error_response(exc.status_code, error, headers)


def _allowed_methods(request: Request) -> set[str]:
    """The methods of the routes whose path matches the most literally: on
    /api/v1/jobs/cancel those of that path, not of /api/v1/jobs/{job_id}."""
    matching = [
        route
        for route in request.app.router.routes
        if isinstance(route, Route) and route.methods
        if route.matches(request.scope)[0] is not Match.NONE
    ]
    fewest = min((len(route.param_convertors) for route in matching), default=0)
    return {
        method
        for route in matching
        if len(route.param_convertors) == fewest
        for method in route.methods or ()
    }


async def _on_unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        500, JobServerError("internal error; see the server log", code="internal_error")
    )
