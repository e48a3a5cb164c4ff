"""The Python client: submit jobs to a jobserver and wait for their results over HTTP.

    from jobserver.client import Client

    with Client("http://127.0.0.1:8000", token="...") as client:
        job = client.submit("run_long_analysis", dataset_id="x", complexity=3)
        result = job.wait(timeout=600)     # the result, or raises JobFailed

``AsyncClient`` / ``AsyncJob`` are the same API for asyncio (``await job.wait()``).

Waiting uses the server's long polling (``GET /api/v1/jobs/{id}?wait=30`` with the last
ETag in If-None-Match): the server answers as soon as the job changes, so a job that runs
ten minutes costs about twenty requests, not six hundred.

Exceptions (all ``errors.JobServerError``, so ``.code``, ``.message``, ``.details``):

    ClientError        the server refused the request (``.status``: 4xx/5xx) or could not
                       be reached (``.status`` None, code ``unreachable``)
    JobFailed          the job ended ``failed``; ``.error`` is its error document
    └── JobCancelled   the job ended ``cancelled``
    WaitTimeout        ``wait(timeout=...)`` ran out first (also a ``TimeoutError``)

This module only speaks HTTP: it works against a server on another box.  Every operation
of the HTTP API has a method here (the CLI is built on it).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypedDict, Unpack

import httpx

from jobserver.errors import JobServerError

__all__ = [
    "AsyncClient",
    "AsyncJob",
    "Client",
    "ClientError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobFilter",
    "SubmitOptions",
    "WaitTimeout",
]

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
LONG_POLL_SECONDS = 30.0  # the server allows up to 60
_NETWORK_SLACK = 10.0  # the HTTP timeout beyond the server's wait


class ClientError(JobServerError):
    """A request the server answered with an error, or could not answer at all."""

    def __init__(self, message: str, details: Any = None, *, code: str, status: int | None) -> None:
        super().__init__(message, details, code=code)
        self.status = status


class JobFailed(JobServerError):
    """The job ended without a result; ``error`` is its error document
    (``{"type", "message", "traceback"}``) and ``job`` the whole job document."""

    code = "job_failed"

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.error: dict[str, Any] = job.get("error") or {
            "type": job["state"].capitalize(),
            "message": job.get("reason") or job["state"],
            "traceback": None,
        }
        super().__init__(
            f"job {job['id']} ({job['task']}) {job['state']}: "
            f"{self.error.get('type')}: {self.error.get('message')}",
            self.error,
        )


class JobCancelled(JobFailed):
    code = "job_cancelled"


class WaitTimeout(JobServerError, TimeoutError):
    code = "wait_timeout"


# -- what both clients share: requests and their answers -------------------------------


def _headers(token: str | None) -> dict[str, str]:
    headers = {"Accept": "application/json", "User-Agent": "jobserver-client"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _answer(response: httpx.Response) -> Any:
    """The JSON body of a successful response; a ``ClientError`` from the error envelope."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success and body is not None:
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {"code": "http_error", "message": f"HTTP {response.status_code}"}
    raise ClientError(
        f"{response.request.method} {response.request.url.path}: "
        f"{error.get('message') or response.reason_phrase}",
        error.get("details"),
        code=str(error.get("code") or "http_error"),
        status=response.status_code,
    )


def _unreachable(url: str, exc: httpx.HTTPError) -> ClientError:
    return ClientError(
        f"cannot reach the jobserver at {url}: {exc}; is it running?",
        str(exc),
        code="unreachable",
        status=None,
    )


def _outcome(document: dict[str, Any]) -> Any:
    """The result of a finished job, or its failure raised."""
    state = document["state"]
    if state == "succeeded":
        return document.get("result")
    if state == "cancelled":
        raise JobCancelled(document)
    raise JobFailed(document)


class SubmitOptions(TypedDict, total=False):
    """The options of ``submit_job`` beside the task and its arguments (None: the
    server's default)."""

    priority: int
    delay: float | None
    run_at: datetime | str | None
    depends_on: Sequence[str]
    max_retries: int | None
    timeout: float | None
    idempotency_key: str | None


class JobFilter(TypedDict, total=False):
    """Which jobs ``cancel_jobs``/``retry_jobs`` act on: every criterion given must hold
    (give at least one, or ``all=True``)."""

    task: str | None
    state: str | Sequence[str] | None
    older_than: float | None
    before: datetime | str | None
    all: bool


def _submission(
    task: str, args: dict[str, Any], options: SubmitOptions
) -> tuple[dict[str, Any], dict[str, str]]:
    """The body and headers of a submit: options left at None are the server's defaults."""
    if not isinstance(task, str) or not task:
        raise ValueError("task must be the name of a registered task")
    body: dict[str, Any] = {"task": task, "args": args, "priority": options.get("priority", 0)}
    run_at = options.get("run_at")
    if isinstance(run_at, datetime):
        if run_at.tzinfo is None:
            raise ValueError("run_at needs a time zone (e.g. datetime.now(UTC))")
        run_at = run_at.isoformat()
    optional = {
        "delay": options.get("delay"),
        "run_at": run_at,
        "max_retries": options.get("max_retries"),
        "timeout": options.get("timeout"),
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if options.get("depends_on"):
        body["depends_on"] = list(options.get("depends_on", ()))
    key = options.get("idempotency_key")
    return body, ({"Idempotency-Key": key} if key else {})


def _bulk_body(match: JobFilter) -> dict[str, Any]:
    """The filter of a bulk cancel or retry (the server refuses one with no criterion)."""
    body: dict[str, Any] = {
        name: value
        for name, value in match.items()
        if value is not None and name in ("task", "older_than")
    }
    state = match.get("state")
    if state is not None:
        body["state"] = state if isinstance(state, str) else list(state)
    before = match.get("before")
    if before is not None:
        body["before"] = before.isoformat() if isinstance(before, datetime) else before
    if match.get("all"):
        body["all"] = True
    return body


def _logs_params(tail: int | None, follow: bool) -> dict[str, Any]:
    params: dict[str, Any] = {} if tail is None else {"tail": tail}
    if follow:
        params["follow"] = 1
    return params


# No read timeout when following a log: the stream is quiet while the job is.
_FOLLOW_TIMEOUT = httpx.Timeout(30, read=None)


class _Download:
    """An artifact written to ``path`` as it arrives, checked against the server's
    SHA-256 at the end (a short or corrupted copy raises and is removed)."""

    def __init__(self, response: httpx.Response, path: Path) -> None:
        self.path = path
        self.expected = response.headers.get("x-checksum-sha256")
        self.digest = hashlib.sha256()
        self.file = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.file.write(chunk)

    def close(self, complete: bool) -> Path:
        self.file.close()
        if complete and self.expected in (None, self.digest.hexdigest()):
            return self.path
        self.path.unlink(missing_ok=True)
        if not complete:
            raise ClientError(
                f"the download of {self.path.name} was interrupted",
                None,
                code="unreachable",
                status=None,
            )
        raise ClientError(
            f"{self.path.name}: the downloaded bytes do not match the server's SHA-256",
            {"expected": self.expected, "got": self.digest.hexdigest()},
            code="checksum_mismatch",
            status=None,
        )


def _list_params(state: str | None, task: str | None, limit: int) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if state is not None:
        params["state"] = state
    if task is not None:
        params["task"] = task
    return params


class _JobView:
    """The fields of a job document, for both ``Job`` and ``AsyncJob``."""

    document: dict[str, Any]
    version: str | None

    @property
    def id(self) -> str:
        return str(self.document["id"])

    @property
    def task(self) -> str:
        return str(self.document["task"])

    @property
    def state(self) -> str:
        return str(self.document["state"])

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def result(self) -> Any:
        return self.document.get("result")

    @property
    def error(self) -> dict[str, Any] | None:
        return self.document.get("error")

    @property
    def progress(self) -> dict[str, Any] | None:
        """``{"fraction", "message", "updated_at"}`` where the server reports progress."""
        return self.document.get("progress")

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        """``{"name", "size", "sha256"}`` of each file the job left (see ``download``)."""
        return list(self.document.get("artifacts") or [])

    def _path(self, *parts: str) -> str:
        return "/".join((f"/api/v1/jobs/{self.id}", *parts))

    def _update(self, response: httpx.Response) -> None:
        self.document = _answer(response)
        self.version = response.headers.get("etag")

    def _poll_request(self, deadline: float | None) -> tuple[dict[str, Any], dict[str, str], float]:
        """Query, headers and HTTP timeout for the next long poll."""
        wait = LONG_POLL_SECONDS
        if deadline is not None:
            wait = max(0.0, min(wait, deadline - time.monotonic()))
        headers = {"If-None-Match": self.version} if self.version else {}
        return {"wait": f"{wait:.3f}"}, headers, wait + _NETWORK_SLACK

    def _timed_out(self, timeout: float | None) -> WaitTimeout:
        return WaitTimeout(
            f"job {self.id} is still {self.state} after {timeout} s",
            {"id": self.id, "state": self.state},
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.task} {self.state}>"


# -- the blocking client ---------------------------------------------------------------


class Client:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url, headers=_headers(token), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    @contextlib.contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response; an error answer raises ``ClientError`` before any byte."""
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    _answer(response)
                yield response
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    def submit(self, task: str, /, **args: Any) -> Job:
        """Submit ``task`` with keyword arguments; the job is stored when this returns."""
        return self.submit_job(task, args)

    def submit_job(self, task: str, args: dict[str, Any], **options: Unpack[SubmitOptions]) -> Job:
        """Submit with an argument dict and the options of ``POST /api/v1/jobs``: a
        priority (-1000..1000, higher runs first), ``delay`` seconds or ``run_at``,
        ``depends_on`` job ids, ``max_retries``, ``timeout`` seconds, and an
        ``idempotency_key`` (the same key and body return the original job)."""
        body, headers = _submission(task, args, options)
        return Job(self, self.request("POST", "/api/v1/jobs", json=body, headers=headers))

    def job(self, job_id: str) -> Job:
        return Job(self, self.request("GET", f"/api/v1/jobs/{job_id}"))

    def jobs(
        self, *, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        """The newest jobs first, optionally of one state and/or task."""
        body = _answer(self.request("GET", "/api/v1/jobs", params=_list_params(state, task, limit)))
        return [Job.from_document(self, document) for document in body["jobs"]]

    def tasks(self) -> list[dict[str, Any]]:
        """The registered tasks: name, parameters (with types), resources, limits."""
        tasks: list[dict[str, Any]] = _answer(self.request("GET", "/api/v1/tasks"))["tasks"]
        return tasks

    def stats(self) -> list[dict[str, Any]]:
        """Per task: counts by state, success rate, p50/p95 duration, peak memory."""
        tasks: list[dict[str, Any]] = _answer(self.request("GET", "/api/v1/stats"))["tasks"]
        return tasks

    def cancel_jobs(self, **match: Unpack[JobFilter]) -> dict[str, Any]:
        """Cancel every queued or running job the filter selects (give at least one
        criterion, or ``all=True``); ``{"count", "ids", "truncated", "cascaded"}``."""
        return self._bulk("cancel", match)

    def retry_jobs(self, **match: Unpack[JobFilter]) -> dict[str, Any]:
        """Run again every failed or cancelled job the filter selects; as ``cancel_jobs``."""
        return self._bulk("retry", match)

    def _bulk(self, verb: str, match: JobFilter) -> dict[str, Any]:
        response = self.request("POST", f"/api/v1/jobs/{verb}", json=_bulk_body(match))
        answer: dict[str, Any] = _answer(response)
        return answer


class Job(_JobView):
    """A submitted job as last seen; ``refresh()`` reads it again."""

    def __init__(self, client: Client, response: httpx.Response) -> None:
        self._client = client
        self._update(response)

    @classmethod
    def from_document(cls, client: Client, document: dict[str, Any]) -> Job:
        job = cls.__new__(cls)
        job._client, job.document, job.version = client, document, None
        return job

    def refresh(self) -> Job:
        self._update(self._client.request("GET", f"/api/v1/jobs/{self.id}"))
        return self

    def cancel(self) -> Job:
        """Cancel: a queued job at once, a running one when its process has stopped."""
        self._update(self._client.request("POST", f"/api/v1/jobs/{self.id}/cancel"))
        return self

    def retry(self) -> Job:
        """Run a failed or cancelled job again, as a new attempt."""
        self._update(self._client.request("POST", self._path("retry")))
        return self

    def logs(self, tail: int | None = None) -> str:
        """The job's log (stdout and stderr) so far; ``tail``: only the last lines."""
        response = self._client.request("GET", self._path("logs"), params=_logs_params(tail, False))
        if not response.is_success:
            _answer(response)
        return response.text

    def follow_logs(self, tail: int | None = None) -> Iterator[str]:
        """The log as it is written, until the job ends."""
        with self._client.stream(
            "GET", self._path("logs"), params=_logs_params(tail, True), timeout=_FOLLOW_TIMEOUT
        ) as response:
            yield from response.iter_text()

    def download(self, name: str, path: str | Path | None = None) -> Path:
        """Save the artifact ``name`` to ``path`` (default: ``name`` in the current
        directory), checked against its SHA-256; returns the path."""
        target = Path(name if path is None else path)
        with self._client.stream("GET", self._path("artifacts", name)) as response:
            download = _Download(response, target)
            complete = False
            try:
                for chunk in response.iter_bytes():
                    download.write(chunk)
                complete = True
            finally:
                download.close(complete)
        return target

    def wait(
        self,
        timeout: float | None = None,
        on_change: Callable[[Job], None] | None = None,
    ) -> Any:
        """Block until the job ends; return its result, or raise ``JobFailed`` /
        ``JobCancelled`` with its error, or ``WaitTimeout`` after ``timeout`` seconds.
        ``on_change`` is called with the job after every change seen (state, progress)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(timeout)
            before = self.version
            params, headers, http_timeout = self._poll_request(deadline)
            response = self._client.request(
                "GET", f"/api/v1/jobs/{self.id}", params=params, headers=headers,
                timeout=http_timeout,
            )  # fmt: skip
            self._update(response)
            if on_change is not None and self.version != before:
                on_change(self)
        return _outcome(self.document)


# -- the asyncio client ----------------------------------------------------------------


class AsyncClient:
    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        token: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=_headers(token), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc

    async def submit(self, task: str, /, **args: Any) -> AsyncJob:
        return await self.submit_job(task, args)

    async def submit_job(
        self, task: str, args: dict[str, Any], **options: Unpack[SubmitOptions]
    ) -> AsyncJob:
        body, headers = _submission(task, args, options)
        return AsyncJob(
            self, await self.request("POST", "/api/v1/jobs", json=body, headers=headers)
        )

    async def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, await self.request("GET", f"/api/v1/jobs/{job_id}"))

    async def jobs(
        self, *, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[AsyncJob]:
        params = _list_params(state, task, limit)
        body = _answer(await self.request("GET", "/api/v1/jobs", params=params))
        return [AsyncJob.from_document(self, document) for document in body["jobs"]]

    async def tasks(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = _answer(await self.request("GET", "/api/v1/tasks"))["tasks"]
        return tasks

    async def stats(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = _answer(await self.request("GET", "/api/v1/stats"))["tasks"]
        return tasks

    async def cancel_jobs(self, **match: Unpack[JobFilter]) -> dict[str, Any]:
        return await self._bulk("cancel", match)

    async def retry_jobs(self, **match: Unpack[JobFilter]) -> dict[str, Any]:
        return await self._bulk("retry", match)

    async def _bulk(self, verb: str, match: JobFilter) -> dict[str, Any]:
        response = await self.request("POST", f"/api/v1/jobs/{verb}", json=_bulk_body(match))
        answer: dict[str, Any] = _answer(response)
        return answer

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                if not response.is_success:
                    await response.aread()
                    _answer(response)
                yield response
        except httpx.HTTPError as exc:
            raise _unreachable(self.url, exc) from exc


class AsyncJob(_JobView):
    def __init__(self, client: AsyncClient, response: httpx.Response) -> None:
        self._client = client
        self._update(response)

    @classmethod
    def from_document(cls, client: AsyncClient, document: dict[str, Any]) -> AsyncJob:
        job = cls.__new__(cls)
        job._client, job.document, job.version = client, document, None
        return job

    async def refresh(self) -> AsyncJob:
        self._update(await self._client.request("GET", f"/api/v1/jobs/{self.id}"))
        return self

    async def cancel(self) -> AsyncJob:
        self._update(await self._client.request("POST", f"/api/v1/jobs/{self.id}/cancel"))
        return self

    async def retry(self) -> AsyncJob:
        self._update(await self._client.request("POST", self._path("retry")))
        return self

    async def logs(self, tail: int | None = None) -> str:
        params = _logs_params(tail, False)
        response = await self._client.request("GET", self._path("logs"), params=params)
        if not response.is_success:
            _answer(response)
        return response.text

    async def follow_logs(self, tail: int | None = None) -> AsyncIterator[str]:
        async with self._client.stream(
            "GET", self._path("logs"), params=_logs_params(tail, True), timeout=_FOLLOW_TIMEOUT
        ) as response:
            async for text in response.aiter_text():
                yield text

    async def download(self, name: str, path: str | Path | None = None) -> Path:
        target = Path(name if path is None else path)
        async with self._client.stream("GET", self._path("artifacts", name)) as response:
            download = _Download(response, target)
            complete = False
            try:
                async for chunk in response.aiter_bytes():
                    download.write(chunk)
                complete = True
            finally:
                download.close(complete)
        return target

    async def wait(
        self,
        timeout: float | None = None,
        on_change: Callable[[AsyncJob], None] | None = None,
    ) -> Any:
        """As ``Job.wait``, without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(timeout)
            before = self.version
            params, headers, http_timeout = self._poll_request(deadline)
            response = await self._client.request(
                "GET", f"/api/v1/jobs/{self.id}", params=params, headers=headers,
                timeout=http_timeout,
            )  # fmt: skip
            self._update(response)
            if on_change is not None and self.version != before:
                on_change(self)
        return _outcome(self.document)
